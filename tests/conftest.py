import json
import os
import sys
from pathlib import Path

import pytest
import torch
# Triton (loaded by torch._dynamo) segfaults when it is imported after TensorFlow in one
# process; the evaluator tests import TensorFlow, so load torch's side first.
import torch._dynamo  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("UDIT_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"

# Tolerances from golden/README.md: one forward pass, and a chain of ten model calls.
SINGLE_CALL_TOL = 1e-5
SAMPLING_TOL = 1e-4


def assert_rel_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} exceeds {tol:g} x {scale:.3e}"


@pytest.fixture(scope="session")
def manifest():
    path = GOLDEN / "state_dict_manifest.json"
    assert path.exists(), f"golden manifest not found at {path}; set UDIT_SHARED to the shared/ folder"
    return json.loads(path.read_text())


def load_golden(kind):
    path = GOLDEN / f"{kind}_tiny_golden.pt"
    assert path.exists(), f"golden vectors not found at {path}; set UDIT_SHARED to the shared/ folder"
    return torch.load(path, weights_only=True)


def golden_model(golden):
    """The golden file's model with its weights, label dropout off (as the vectors were recorded)."""
    from models import DiT, U_DiT
    cls = {"udit": U_DiT, "dit": DiT}[golden["kind"]]
    model = cls(input_size=golden["input_size"], num_classes=golden["num_classes"], **json.loads(golden["config"]))
    model.load_state_dict(golden["state_dict"], strict=True)
    for embedder in model.label_embedders():
        embedder.dropout_prob = 0.0  # the table keeps its null row
    return model


def tiny_udit(**overrides):
    """A small random U-DiT (16x16 input, 10 classes) with non-zero output layers."""
    from models import U_DiT
    kwargs = dict(input_size=16, hidden_size=32, num_heads=2, depth=[1, 1, 1, 1, 1], num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = U_DiT(**kwargs)
    randomize(model)
    return model


def randomize(model, seed=0):
    """Replace the zero init by random weights so that every path reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale") or name == "pos_embed":
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def make_image_folder(root, classes=2, per_class=8, size=40, seed=0):
    """A small ImageFolder of random-coloured PNGs (sizes vary to exercise the centre crop)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = Path(root) / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = size + int(rng.integers(0, 9)), size + int(rng.integers(0, 9))
            arr = np.clip(rng.normal(60 + 120 * c, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"img_{i}.png")
    return Path(root)


def make_tiny_vae(folder, scaling_factor=0.18215):
    """A random diffusers AutoencoderKL with the SD VAE's interface (4 latent channels, factor 8)."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, scaling_factor=scaling_factor,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(folder)
    return Path(folder)


TINY_UDIT_KWARGS = '{"hidden_size": 16, "num_heads": 2, "depth": [1, 1, 1, 1, 1]}'


def script_env(**extra):
    """The environment of every script a test launches: one thread, unbuffered output.

    Results compared byte for byte must come from runs with the same settings: oneDNN picks
    its kernels by thread count, so a result computed with 1 thread can differ in the last
    bit from one computed with 2 (seen on AMD EPYC). Tests that compare bytes therefore run
    every compared job as a subprocess with this environment, never one of them in the
    pytest process, whose thread count depends on the machine.
    """
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_script(args, timeout=300, expect=0, env=None):
    """Run a command from the repository root; assert its exit status, return its output."""
    import subprocess
    proc = subprocess.run([str(a) for a in args], cwd=ROOT, env=script_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect}) from {args}:\n{out[-4000:]}"
    return out


def torchrun(script, *args, nproc=2, **kwargs):
    return run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       script, *args], **kwargs)


def launch_two_nodes(script, args, cwds, timeout=300):
    """(exit status, output) of each of two torchrun "nodes" on localhost, one process each, node i in cwds[i]."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(ROOT / script), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=script_env())
             for node, cwd in enumerate(cwds)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs)]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Images (64 px, 2 classes), a 32-px copy for pixel space, and a tiny VAE folder."""
    root = tmp_path_factory.mktemp("data")
    return {"images": make_image_folder(root / "images", size=64),
            "small_images": make_image_folder(root / "small_images", size=16),
            "vae": make_tiny_vae(root / "vae")}
