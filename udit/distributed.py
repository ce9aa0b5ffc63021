"""torch.distributed set-up that works for one process, one node or several nodes."""

import hashlib
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from udit.cli import ActionableError, raised_on_every_process


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


def parse_on_every_process(prog, parse):
    """parse() (the command line and every check before work starts), agreed on by every process of a launch.

    A process of a multi-node launch whose checks fail on its own node (a --resume or
    --data-path folder missing there) used to exit before joining the process group, and
    the others waited in init_process_group until it timed out (30 minutes), with no line
    on their node. Here that process joins the group anyway (its own line is already
    printed), every process learns which failed, and each exits 2 with one line.
    Returns parse()'s result; alone (no torchrun / accelerate launch) it is just parse().
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return parse()
    try:
        result, failed = parse(), False
    except SystemExit as stop:
        if stop.code in (0, None):  # --help
            raise
        result, failed = None, True
    init_distributed()
    reports = all_gather_objects((failed, socket.gethostname()))
    refused = [(rank, host) for rank, (bad, host) in enumerate(reports) if bad]
    if refused:
        if not failed:
            where = ", ".join(f"rank {rank} on {host}" for rank, host in refused[:4])
            sys.stderr.write(f"{prog}: error: the command line was refused by {where} (its own line there says why: "
                             f"a path missing on that node, say); fix it there and launch again\n")
            sys.stderr.flush()
        barrier()  # every line is out before the launcher sees a process exit
        cleanup()
        raise SystemExit(2)
    return result


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


def parameter_digest(module):
    """SHA-256 of a module's parameters, bytes in order: equal on every rank iff the weights are bitwise equal."""
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


def broadcast_object(obj, src=0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class FolderNotShared(ActionableError):
    """A folder that every process must see (samples, features, an experiment) differs between nodes."""


class FailedOnRankZero(ActionableError):
    """Raised on the other processes when rank 0 could not prepare a shared folder (its message follows)."""


# How long a process waits for rank 0's token to appear: network file systems cache directory
# listings for a few seconds, so a file just written on one node can take that long on another.
TOKEN_WAIT_S = 5.0


def open_shared_folder(folder, flag, prepare=None):
    """Rank 0 runs prepare() (create `folder`, check what it holds); then every process checks it sees that folder.

    Rank 0 writes a file with a random token into `folder`; every process reads it back.
    A process on a node whose `folder` is missing, or is another copy (an older run's
    folder on a local disk), cannot: without this check it would fail with a bare
    FileNotFoundError while the others wait in a collective, or fill its own copy so that
    rank 0 finds images missing on every rerun. Raises, on every process with the same
    one line: FolderNotShared naming the processes and hosts that do not share it and the
    fix; FailedOnRankZero (rank 0: the original error) when prepare() failed.
    """
    folder = Path(folder)
    multi = dist.is_initialized() and dist.get_world_size() > 1
    if not multi:
        if prepare is not None:
            prepare()
        return
    rank = dist.get_rank()
    outcome = None
    if rank == 0:
        try:
            if prepare is not None:
                prepare()
            folder.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(8)
            (folder / f".shared-check-{token}").write_text(token)
            outcome = ("ok", token)
        except Exception as err:  # the others must hear of any failure, or they wait in broadcast_object
            status = (err.exit_status if isinstance(err, ActionableError) else 2 if isinstance(err, ValueError) else 1)
            broadcast_object(("failed", str(err).splitlines()[0] if str(err) else type(err).__name__, status))
            raise raised_on_every_process(err)
    outcome = broadcast_object(outcome)
    if outcome[0] == "failed":
        error = FailedOnRankZero(f"rank 0 failed to prepare {flag} {folder}: {outcome[1]}")
        error.exit_status = outcome[2]
        raise raised_on_every_process(error)
    token = outcome[1]
    path, deadline = folder / f".shared-check-{token}", time.monotonic() + TOKEN_WAIT_S
    while not (seen := _holds(path, token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    reports = all_gather_objects((rank, socket.gethostname(), seen, folder.is_dir()))
    if rank == 0:
        path.unlink(missing_ok=True)
    blind = [r for r in reports if not r[2]]
    if blind:
        where = "; ".join(f"rank {r} on {host} ({'another copy of it' if is_dir else 'no such folder there'})"
                          for r, host, _, is_dir in blind[:4]) + (f"; {len(blind) - 4} more" if len(blind) > 4 else "")
        raise raised_on_every_process(FolderNotShared(
            f"{flag} {folder} is not one folder shared by every process: {where} cannot see the file rank 0 on "
            f"{reports[0][1]} wrote there; put it on a file system every node mounts at the same path (or pass "
            f"that path), or run on one node"))


def _holds(path, token):
    try:
        return path.read_text() == token
    except OSError:  # no such file or folder on this node
        return False


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
