"""Released checkpoints: the table, the local cache, and `find_model` (a state dict from a name or a path).

`find_model(name_or_path)` returns a state dict ready for `load_state_dict`: from a local
file (a train.py checkpoint, whose EMA weights are preferred; a plain state dict; a
.safetensors file) or a released name, downloaded into the cache the first time. Every
load uses torch.load(weights_only=True): a checkpoint can never run code.

A cache entry is used only if it is a complete file (`is_complete_checkpoint`): a link
whose target was cleaned, or a file cut short, is fetched again, never reported as a
network fault.
"""

import json
import os
import re
import struct
import sys
import zipfile
from pathlib import Path

from udit.checkpoint import CheckpointError, load_checkpoint, model_state_dict
from udit.cli import ActionableError
from udit.hub import download_url, hub_unreachable_reason

UDIT_REPO = "yuchuantian/U-DiT"
DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"

# name -> what it is; FIDs are the papers' (ImageNet 256 unless stated, no guidance).
RELEASED = {
    "DiT-XL-2-256x256.pt": dict(model="DiT-XL/2", image_size=256, note="DiT release, 7M iterations"),
    "DiT-XL-2-512x512.pt": dict(model="DiT-XL/2", image_size=512, note="DiT release, 3M iterations"),
    "U-DiT-S-400K": dict(model="U-DiT-S", image_size=256, iterations=400_000, note="FID 31.51"),
    "U-DiT-B-400K": dict(model="U-DiT-B", image_size=256, iterations=400_000, note="FID 16.64 (4.26 with cfg 1.5)"),
    "U-DiT-L-400K": dict(model="U-DiT-L", image_size=256, iterations=400_000, note="FID 10.08 (3.37 with cfg 1.5)"),
    "U-DiT-B-1M": dict(model="U-DiT-B", image_size=256, iterations=1_000_000, note="FID 12.87"),
    "U-DiT-L-1M": dict(model="U-DiT-L", image_size=256, iterations=1_000_000, note="FID 7.54"),
}
ITERATION_TOKENS = {400_000: ("400k", "400000"), 1_000_000: ("1m", "1000k", "1000000")}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class DownloadError(ActionableError):
    """A released checkpoint that could not be fetched; says what to fetch by hand and where to put it."""


def cache_dir():
    return Path(os.environ.get("UDIT_CACHE_DIR", Path.home() / ".cache" / "udit")) / "checkpoints"


def cached_path(name):
    suffix = "" if name.endswith(WEIGHT_SUFFIXES) else ".pt"
    return cache_dir() / f"{name}{suffix}"


def is_complete_checkpoint(path):
    """Whether `path` (links followed) is a whole checkpoint file, judged from its ends, not read in full.

    torch.save writes a zip archive, whose central directory sits at the end: a file cut
    short has none. A .safetensors file is 8 bytes of header length, the JSON header, then
    exactly the bytes its last tensor ends at. A raw pickle (torch < 1.6) has no such
    structure and is taken as it is; loading it names a truncation.
    """
    path = Path(path)
    if not path.is_file():  # missing, or a link whose target is gone
        return False
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                return False
            try:
                header = json.loads(f.read(struct.unpack("<Q", head)[0]))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, struct.error):
                return False
            return path.stat().st_size == 8 + struct.unpack("<Q", head)[0] + end
    if head.startswith(b"PK\x03\x04"):
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile:
            return False
        return True
    return head[:1] == b"\x80"


def match_release(name, files):
    """The file of the U-DiT repository that holds release `name` (model and iteration count)."""
    info = RELEASED[name]
    size = info["model"].split("-")[-1].lower()
    model_re = re.compile(rf"u[-_]?dit[-_]?{size}(?![a-z])")
    iters_re = re.compile(rf"(?<![0-9])({'|'.join(ITERATION_TOKENS[info['iterations']])})(?![0-9a-z])")
    hits = [f for f in files if f.lower().endswith(WEIGHT_SUFFIXES)
            and model_re.search(Path(f).name.lower()) and iters_re.search(Path(f).name.lower())]
    if len(hits) != 1:
        what = "no file" if not hits else f"several files ({', '.join(hits)})"
        raise DownloadError(f"{what} in {UDIT_REPO} matches {name} ({info['model']} at {info['iterations']:,} "
                            f"iterations); files there: {', '.join(files) or 'none'}")
    return hits[0]


def list_repo_files():
    from huggingface_hub import list_repo_files as hub_list
    reason = hub_unreachable_reason()
    if reason:
        raise DownloadError(f"cannot reach https://huggingface.co/{UDIT_REPO} ({reason})")
    try:
        return hub_list(UDIT_REPO)
    except Exception as err:  # offline, DNS, HTTP errors: all mean the same to the user
        raise DownloadError(f"cannot list https://huggingface.co/{UDIT_REPO} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _fetch_udit(name, target):
    """Download release `name` into the hub's folder and point `target` at it (replacing any old entry)."""
    from huggingface_hub import hf_hub_download
    filename = match_release(name, list_repo_files())
    local_dir = cache_dir() / "U-DiT"
    # The hub trusts its own metadata, not the file: a file cut short would be kept as it is.
    if (local_dir / filename).exists() and not is_complete_checkpoint(local_dir / filename):
        (local_dir / filename).unlink()
    path = Path(hf_hub_download(UDIT_REPO, filename, local_dir=local_dir)).resolve()
    link = target.with_name(f".{target.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(path)  # the release keeps its own file name; ours points at it
    os.replace(link, target)  # over a dangling link or a partial file alike


def download(name):
    """Local path of released checkpoint `name`, fetched into the cache unless a complete copy is there."""
    if name not in RELEASED:
        raise DownloadError(f"unknown released checkpoint {name!r}; released: {', '.join(RELEASED)}")
    target = cached_path(name)
    if is_complete_checkpoint(target):
        return target
    source = (DIT_URL.format(name=name) if name.startswith("DiT")
              else f"https://huggingface.co/{UDIT_REPO}/tree/main (the {RELEASED[name]['model']} file at "
                   f"{RELEASED[name]['iterations']:,} iterations)")
    stale = " (replacing an incomplete cache entry)" if target.is_symlink() or target.exists() else ""
    print(f"downloading {name} into {target}{stale} ...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    if stale:  # gone before anything can fail: "put it at TARGET" must work (cp refuses a dangling link)
        target.unlink()
    try:
        if name.startswith("DiT"):
            download_url(DIT_URL.format(name=name), target)
        else:
            _fetch_udit(name, target)
    except DownloadError as err:
        raise DownloadError(f"{err}. Download {source} by hand and put it at {target}, "
                            f"or pass that file's path in place of the name") from None
    except Exception as err:
        # Only the error itself says what went wrong (network, disk, permissions): no guess at "offline".
        raise DownloadError(f"could not download {name} ({type(err).__name__}: {err}); download "
                            f"{source} by hand and put it at {target}, or pass that file's path in place of the name") from None
    if not is_complete_checkpoint(target):
        raise DownloadError(f"the download of {name} into {target} is incomplete (cut short); download {source} "
                            f"by hand and put it there, or pass that file's path in place of the name")
    return target


def resolve_checkpoint(name_or_path):
    """A local path for a file path or a released name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if name_or_path in RELEASED:
        return download(name_or_path)
    raise CheckpointError(f"{name_or_path}: neither a file nor a released checkpoint "
                          f"({', '.join(RELEASED)}); check the path")


def find_model(name_or_path):
    """State dict for sampling: the EMA weights of a training checkpoint, else its model weights."""
    return model_state_dict(load_checkpoint(resolve_checkpoint(name_or_path)))
