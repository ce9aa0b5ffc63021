"""Train U-DiT or DiT with torchrun (DDP): one process, one node or several nodes.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --feature-path imagenet_feature --model U-DiT-B
"""

import sys

from udit.cli import run_guarded
from udit.distributed import cleanup
from udit.trainer import DDPBackend, check_args, train, training_parser


def main(argv=None):
    parser = training_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                        help="bf16: autocast with fp32 master weights; tf32: TF32 matmuls on Ampere+")
    args = parser.parse_args(argv)
    check_args(parser, args)
    backend = DDPBackend(args.precision)
    try:
        return run_guarded("train.py", lambda: train(args, backend))
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
