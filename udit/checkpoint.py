"""Checkpoints: atomic writes, loads that can never run code, clear mismatch errors."""

import argparse
import errno
import json
import os
import pathlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from udit.distributed import parameter_digest


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def check_recorded_weights(args, key, module, source):
    """Record the SHA-256 of a frozen network's weights as args.<key>; on resume, refuse other weights.

    For the networks a run reads through a path it may change on resume (--vae-path,
    --encoder-weights: the file may sit elsewhere on another machine) or through a file
    that can be rewritten (--encoder FILE): a flag names a file, not its content, and other
    weights would change the latents or the alignment target without a word. args is saved
    with every checkpoint, so a resumed run compares against what the experiment recorded
    (runs from before the digest was recorded are not checked). Raises CheckpointError (exit
    2) naming `source`, the flag to fix.
    """
    digest, recorded = parameter_digest(module), getattr(args, key, None)
    if recorded and digest != recorded:
        raise CheckpointError(f"{source}: not the weights this experiment was trained with (SHA-256 {digest[:12]}, "
                              f"the checkpoint records {recorded[:12]}); resume with the files it was trained with, "
                              f"or start a new experiment with --ckpt to change them")
    setattr(args, key, digest)


def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, fsync, then rename over it.

    A crash or a full disk leaves the previous file at `path` intact and no partial file
    under a final name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    existed = path.exists()
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            # Only what is true of this file: the caller knows what else there is to resume from.
            kept = "; the earlier file there is intact" if existed else ""
            raise OSError(errno.ENOSPC, f"disk full while writing {path} (no partial file is left{kept})") from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# The original U-DiT, DiT, fast-DiT and SiT train.py save their settings as an argparse.Namespace
# (paths sometimes as pathlib objects): plain data, allowed for the duration of a load only
# (never process-wide).
PLAIN_DATA_CLASSES = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]
# Wrappers whose state dicts prefix every key: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def load_checkpoint(path, mmap=False):
    """torch.load with weights_only=True: tensors, plain containers and Namespaces, never code.

    A saved `args` Namespace (the original trainers' format) is returned as a dict.
    mmap=True maps the tensors instead of reading them (cheap when only `args` is needed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (PK..); files of torch < 1.6 are raw pickles (protocol 2+: 0x80).
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(f"{path}: not a checkpoint (a file written by torch.save, or a .safetensors file)")
    try:
        with torch.serialization.safe_globals(PLAIN_DATA_CLASSES):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain "
                              f"containers, which could run code ({unpickling_reason(err)}); only load "
                              f"checkpoints you trust, re-saved as a state dict") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(err).splitlines()[0]})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = {k: str(v) if isinstance(v, pathlib.PurePath) else v
                              for k, v in vars(checkpoint["args"]).items()}
    return checkpoint


def unpickling_reason(err):
    """The line of torch's weights-only error that names the refused object, without terminal escapes."""
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in str(err).splitlines()]
    named = [line for line in lines if "GLOBAL" in line or "WeightsUnpickler error" in line]
    reason = (named or lines or [""])[0]
    return reason.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")


def model_state_dict(checkpoint):
    """The weights to sample with: `ema` of a training checkpoint, else `model`, else the dict itself.

    Keys saved through a wrapper (`module.` from DDP, `_orig_mod.` from torch.compile) lose
    the prefix.
    """
    source = weights_source(checkpoint)
    if source != "bare":
        checkpoint = checkpoint[source]
    for prefix in WRAPPER_PREFIXES:
        if checkpoint and all(k.startswith(prefix) for k in checkpoint):
            checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items()}
    return checkpoint


# SiT's train.py (Ma et al. 2024, willisma/SiT) records its transport in `args`: path_type
# (Linear, GVP, VP) and prediction (velocity, score, noise). Only its default, the linear
# path with velocity prediction, is our flow objective (udit/objectives.py states the
# conversion of its time direction).
SIT_TRANSPORT = ("Linear", "velocity")


def recorded_objective(saved, source):
    """(objective, time convention) that a checkpoint's saved `args` record.

    Ours record `objective` ("ddpm" or "flow", convention None). SiT's train.py records
    path_type and prediction: Linear + velocity is ("flow", "sit"), time running from
    noise at t = 0 to data at t = 1. No record (DiT, fast-DiT and U-DiT trainers, raw
    state dicts, releases): ("ddpm", None). Raises CheckpointError (one line) for a
    transport we cannot sample (another path or prediction, REPA's lower-case names).
    """
    if "objective" in saved:
        return saved["objective"], None
    transport = (saved.get("path_type"), saved.get("prediction"))
    if transport == SIT_TRANSPORT:
        return "flow", "sit"
    if transport != (None, None) or str(saved.get("model", "")).startswith("SiT-"):
        what = (f"trained with path_type {transport[0]!r} and prediction {transport[1]!r}" if transport != (None, None)
                else f"the SiT model {saved['model']!r} records no path_type or prediction")
        raise CheckpointError(f"{source}: {what}; only SiT's train.py default (--path-type Linear --prediction "
                              f"velocity) can be sampled here, as a flow model")
    return "ddpm", None


def dit_name(model):
    """Our name of a SiT-X/p network (the same layout and state-dict keys as DiT-X/p); other names unchanged."""
    return "DiT-" + model.removeprefix("SiT-") if model.startswith("SiT-") else model


def learned_variance(state_dict):
    """Whether the weights' output layer has 2 C channels (learned variance) or C; None when it cannot tell.

    C: the input channels of the patch embedding. DiT / SiT: final_layer.linear has p^2
    C_out rows for a p x p patch of C inputs; U-DiT: final_layer.out_proj has C_out.
    """
    embed = state_dict.get("x_embedder.proj.weight")
    if embed is None:
        return None
    if "final_layer.linear.bias" in state_dict:
        out, unit = state_dict["final_layer.linear.bias"].shape[0], embed[0].numel()
    elif "final_layer.out_proj.bias" in state_dict:
        out, unit = state_dict["final_layer.out_proj.bias"].shape[0], embed.shape[1]
    else:
        return None
    return {unit: False, 2 * unit: True}.get(out)


def weights_source(checkpoint):
    """Which weights model_state_dict takes: "ema", "model" (raw), "state_dict", or "bare" (the file is the state dict)."""
    if isinstance(checkpoint, dict):
        for key in ("ema", "model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                return key
    return "bare"


def load_weights(model, state_dict, source, skip_mis_shaped=False):
    """load_state_dict(strict) with an error that names missing, unexpected and mis-shaped keys.

    skip_mis_shaped: keys present in both with another shape keep the model's own values
    (fine-tuning across objectives: the output layer); returns their names.
    """
    own = model.state_dict()
    if skip_mis_shaped:
        skipped = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        load_weights(model, {**state_dict, **{k: own[k] for k in skipped}}, source)
        return skipped
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mis_shaped:
        def show(keys):
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        parts = [f"{len(keys)} {what} ({show(keys)})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("with another shape", mis_shaped)) if keys]
        raise CheckpointError(f"{source}: weights are for another architecture: {'; '.join(parts)}; "
                              f"check --model, --image-size, --num-classes and --model-kwargs")
    model.load_state_dict(state_dict, strict=True)
    return []


def check_model_kwargs(model, kwargs):
    """ValueError (one line) for a --model-kwargs value of the wrong JSON type for the network's keyword.

    The type comes from the keyword's default in U_DiT / DiT: a flag (learn_sigma) takes
    true or false, a name (attn_type) a string, a number (hidden_size) a number or, for
    the per-level U-DiT keywords (depth, down_factor), a list of them. Without this check
    "learn_sigma": "false" is a non-empty string, truthy: learned variance stays on
    silently. Keywords the network does not take are left to its constructor.
    """
    import inspect
    from models import DiT, U_DiT
    family = U_DiT if model.startswith("U-DiT") else DiT
    defaults = {k: p.default for k, p in inspect.signature(family.__init__).parameters.items()}

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    for key, value in kwargs.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        elif isinstance(default, (int, float, tuple)):
            ok = is_number(value) or (isinstance(value, list) and value and all(is_number(v) for v in value))
            want = "a number or a list of numbers"
        else:
            continue
        if not ok:
            raise ValueError(f"model keyword {key!r} of {model} must be {want} (JSON), got {json.dumps(value)}")


def build_model(config):
    """The network described by a checkpoint's `args` (or the trainer's config dict)."""
    from models import U_DiT, create_model
    check_model_kwargs(config["model"], config.get("model_kwargs", {}))
    kwargs = dict(input_size=config["latent_size"], num_classes=config["num_classes"],
                  in_channels=config["in_channels"], **config.get("model_kwargs", {}))
    for key in ("class_dropout_prob", "learn_sigma"):
        if key in config:
            kwargs.setdefault(key, config[key])
    try:
        model = create_model(config["model"], **kwargs)
    except TypeError as err:
        raise ValueError(f"model keywords {config.get('model_kwargs', {})} do not fit {config['model']} ({err})") from None
    if isinstance(model, U_DiT) and "label_dropout" in config:
        model.label_dropout = config["label_dropout"]
    return model
