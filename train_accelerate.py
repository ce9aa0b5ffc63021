"""Train U-DiT or DiT through Hugging Face Accelerate (fp16 / bf16 mixed precision).

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_accelerate.py \\
        --feature-path imagenet_feature --model U-DiT-B

The training loop is the one of train.py (udit/trainer.py); only the backend differs.
"""

import sys

import torch
from accelerate import Accelerator

from udit.cli import run_guarded
from udit.distributed import parse_on_every_process
from udit.trainer import parse_training_args, train, training_parser


class AccelerateBackend:
    """Accelerate's process group, model wrapping, autocast and gradient scaling."""

    def __init__(self):
        # Without a GPU, several launched processes train together on CPU (gloo).
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.local_rank = self.accelerator.local_process_index

    def prepare(self, model, opt):
        return self.accelerator.prepare(model, opt)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clip_grad_norm(self, parameters, max_norm=None):
        """Total L2 norm of the unscaled gradients (before clipping); scaled down to max_norm if above it.

        With fp16 the gradients are unscaled first (GradScaler then steps without unscaling
        again and still skips a step whose gradients overflowed).
        """
        if max_norm is None:
            self.accelerator.unscale_gradients()
            return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=True)
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def extra_state(self):
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict()} if scaler is not None else {}

    def load_extra_state(self, state):
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])


def build_parser():
    return training_parser(__doc__.strip().splitlines()[0], prog="train_accelerate.py")


def main(argv=None):
    parser = build_parser()
    args = parse_on_every_process("train_accelerate.py", lambda: parse_training_args(parser, argv))
    backend = AccelerateBackend()
    args.precision = backend.accelerator.mixed_precision
    try:
        return run_guarded("train_accelerate.py", lambda: train(args, backend))
    finally:
        backend.accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
