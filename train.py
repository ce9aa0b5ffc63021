"""Train U-DiT or DiT with torchrun (DDP): one process, one node or several nodes.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --feature-path imagenet_feature --model U-DiT-B
"""

import sys

import torch

from udit.cli import run_guarded
from udit.distributed import cleanup, parse_on_every_process
from udit.trainer import DDPBackend, parse_training_args, train, training_parser


def build_parser():
    parser = training_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                        help="bf16: autocast with fp32 master weights; tf32: TF32 matmuls on Ampere+")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each step's forward and backward from a CUDA graph: removes the per-kernel "
                             "launch cost that bounds U-DiT's thin layers (needs CUDA; fixed batch shapes)")
    return parser


def parse(parser, argv):
    args = parse_training_args(parser, argv)
    if args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph needs a CUDA device")
    return args


def main(argv=None):
    parser = build_parser()
    args = parse_on_every_process("train.py", lambda: parse(parser, argv))
    backend = DDPBackend(args.precision, cuda_graph=args.cuda_graph)
    try:
        return run_guarded("train.py", lambda: train(args, backend))
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
