"""A quick reachability check of the Hugging Face hub, so offline runs fail at once."""

import os
import socket

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
