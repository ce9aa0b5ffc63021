"""torch.distributed set-up that works for one process, one node or several nodes."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(require_cuda=False):
    """Join the process group described by torchrun's environment, or run alone.

    The device comes from LOCAL_RANK (the GPU index on this node), never from the
    global rank, so multi-node runs use the right GPUs. NCCL on GPUs, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if require_cuda and not torch.cuda.is_available():
        raise RuntimeError("this script needs a GPU, and CUDA is not available")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank, local_rank, world_size, device)


def configure_matmul_precision(precision, device):
    """TF32 matmuls and convolutions on GPUs for --precision tf32 and bf16 (fp32 keeps full precision)."""
    if torch.device(device).type == "cuda":
        tf32 = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor):
    """Mean of `tensor` over all processes (the tensor itself when alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_module(module, src=0):
    """Copy rank src's parameters and buffers to every process, in place."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def all_gather_objects(obj):
    """List of `obj` from every rank, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
