"""Network helpers: a quick hub reachability check (offline runs fail at once) and URL downloads."""

import os
import socket
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

HUB_HOST = "huggingface.co"


def hub_unreachable_reason(timeout=5.0):
    """None when the hub can be reached; otherwise why not (huggingface_hub would retry for ~25 s first)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError as err:
        return str(err)
    return None


def download_url(url, target, timeout=60):
    """Fetch `url` into `target` with a progress bar; a failed download leaves no file behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target
