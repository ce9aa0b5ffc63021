"""List or prefetch the released U-DiT and DiT checkpoints (the table and cache live in udit/releases.py).

    python download.py --list                 # what exists, and what is already here
    python download.py U-DiT-B-400K DiT-XL-2-256x256.pt   # prefetch

In code, as in DiT: `from download import find_model` (or `udit.releases.find_model`).
"""

import sys

from udit.cli import ArgumentParser
from udit.releases import RELEASED, UDIT_REPO, DownloadError, cache_dir, cached_path, download, find_model, \
    is_complete_checkpoint, list_repo_files

__all__ = ["find_model"]


def main(argv=None):
    p = ArgumentParser(prog="download.py", description="List or prefetch the released U-DiT and DiT checkpoints.")
    p.add_argument("names", nargs="*", help="released names to download into the cache")
    p.add_argument("--list", action="store_true", help="show the released checkpoints and which are cached")
    args = p.parse_args(argv)
    if args.list or not args.names:
        print(f"cache: {cache_dir()}")
        for name, info in RELEASED.items():
            status = "cached" if is_complete_checkpoint(cached_path(name)) else "not downloaded"
            print(f"  {name:<22} {info['model']:<9} {info['image_size']} px  {info['note']:<30} {status}")
        try:
            print(f"files in {UDIT_REPO}: {', '.join(list_repo_files())}")
        except DownloadError as err:
            print(f"({err}; the U-DiT files cannot be listed offline)")
    for name in args.names:
        if name not in RELEASED:
            p.exit(2, f"download.py: error: unknown released checkpoint {name!r}; released: {', '.join(RELEASED)}\n")
        try:
            print(f"{name}: {download(name)}")
        except DownloadError as err:
            p.exit(1, f"download.py: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
