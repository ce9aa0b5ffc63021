"""One call for a lent GPU: correctness on the device, then the speed figures of bench.py.

    python bench/gpu_check.py --out $OUT --golden .golden --deadline-s 420 [--stages ...]

(../shared does not travel to a lent machine: copy shared/golden into an ignored folder
such as .golden and carry it; diffusers, if the machine lacks it, travels as a wheel;
bench/RESULTS.md has the exact commands.)

Each stage is a subprocess under what is left of the deadline, so that a stage that fails
or runs out of time still leaves the earlier ones' results and logs in OUT:

- correctness: the golden vectors on the device in strict fp32 (forward in train, eval
  and guided form, loss, and the 10-step DDPM, DDIM and guided DDPM loops with the
  golden noise), the drift of bf16 autocast from them, and of bf16 guided DDIM samples
  from fp32 ones on U-DiT-B -> gpu_correctness.json;
- graphs: bench.py, U-DiT-B/L against DiT-B/2, L/2, XL/2, bf16, batch 32, every step
  replayed from a CUDA graph, with 250-step guided sampling -> gpu_graphs.json;
- sample-graph: sample_ddp.py with and without --cuda-graph, compared value by value;
- train-graph: train.py with and without --cuda-graph (U-DiT-B, bf16, batch 32, random
  features): steps/s and losses of both runs -> gpu_train_graph.json;
- profile: the kernels of a U-DiT-B training step (-> profile.txt), depthwise
  convolutions in channels-last against NCHW layout, and the graph-replayed U-DiT-B
  step with the model's spatial convolutions in each layout;
- eager, eager-sampling: bench.py without graphs (eager: with the time per kernel kind,
  --breakdown) -> gpu_eager*.json;
- blocks: bench.py with every transformer block compiled -> gpu_blocks.json;
- alignment: bench.py, U-DiT-B and DiT-B/2 with and without REPA / U-REPA against a
  random DINOv2-B, bf16, batch 32, graph-replayed -> gpu_alignment.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from diffusion import create_diffusion  # noqa: E402
import models  # noqa: E402
from conftest import golden_model  # noqa: E402
from models import create_model  # noqa: E402
from udit.cuda_graphs import capture  # noqa: E402
from udit.cli import ArgumentParser, output_dir, positive_float  # noqa: E402

# Strict fp32 tolerances of ../shared/golden/README.md: one forward, and 10 chained calls.
FORWARD_TOL, LOOP_TOL = 1e-5, 1e-4


def rel(out, ref):
    """Max absolute error over the reference's max magnitude."""
    return ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()


def rel_l2(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def with_random_outputs(model):
    """Give the zero-initialised layers small random weights, so that every path reaches the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


def golden_errors(g, device, autocast):
    """Relative errors of every golden forward and loop on `device` (CPU-generated noise, as the reference drew it)."""
    model = golden_model(g).to(device)
    x, t, y, x0, noise = (g[k].to(device) for k in ("x", "t", "y", "x0", "noise"))
    xc, tc, yc = (g[k].to(device) for k in ("x_cfg", "t_cfg", "y_cfg"))
    z = g["z_10"].to(device)
    half = len(yc) // 2
    cfg_noise = torch.cat([g["z_10"][:half]] * 2).to(device)
    diffusion, loop = create_diffusion(""), create_diffusion("10")

    def cpu_noise(x):
        return torch.randn(x.shape).to(x.device)

    errors = {}
    with torch.no_grad(), autocast:
        errors["train"] = rel(model.train()(x, t, y), g["out_train"])
        errors["loss"] = rel(diffusion.training_losses(model, x0, t, {"y": y}, noise)["loss"], g["loss"])
        model.eval()
        errors["eval"] = rel(model(x, t, y), g["out_eval"])
        errors["cfg"] = rel(model.forward_with_cfg(xc, tc, yc, g["cfg_scale"]), g["out_cfg"])
        torch.manual_seed(g["ddpm_seed_10"])
        errors["ddpm_10"] = rel(loop.p_sample_loop(model.forward, z.shape, z, clip_denoised=False,
                                                   model_kwargs={"y": y}, step_noise=cpu_noise), g["ddpm_10"])
        errors["ddim_10"] = rel(loop.ddim_sample_loop(model.forward, z.shape, z, clip_denoised=False,
                                                      model_kwargs={"y": y}), g["ddim_10"])
        torch.manual_seed(g["ddpm_cfg_seed_10"])
        errors["ddpm_cfg_10"] = rel(loop.p_sample_loop(
            model.forward_with_cfg, cfg_noise.shape, cfg_noise, clip_denoised=False,
            model_kwargs={"y": yc, "cfg_scale": g["cfg_scale"]}, step_noise=cpu_noise), g["ddpm_cfg_10"])
    return errors


def bf16_sampling_drift(device, steps=50, n=16):
    """Relative L2 distance of bf16-autocast guided DDIM samples from fp32 ones (U-DiT-B, random weights).

    The zero-initialised output layers are given small random weights so that every path
    contributes; the same noise and labels feed both runs.
    """
    torch.manual_seed(0)
    model = with_random_outputs(create_model("U-DiT-B")).to(device).eval()
    z = torch.randn(n, 4, 32, 32, device=device)
    y = torch.cat([torch.randint(0, 1000, (n,), device=device), torch.full((n,), 1000, device=device)])
    diffusion = create_diffusion(f"ddim{steps}")
    samples = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        def model_fn(x, t, **kw):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                return model.forward_with_cfg(x, t, **kw).float()
        with torch.no_grad():
            samples[name] = diffusion.ddim_sample_loop(model_fn, (2 * n, 4, 32, 32), torch.cat([z, z]),
                                                       clip_denoised=False,
                                                       model_kwargs={"y": y, "cfg_scale": 1.5})[:n]
    return {f"udit_b_ddim{steps}_cfg1.5_bf16_vs_fp32_rel_l2": rel_l2(samples["bf16"], samples["fp32"]),
            f"udit_b_ddim{steps}_cfg1.5_bf16_vs_fp32_max_abs": (samples["bf16"] - samples["fp32"]).abs().max().item(),
            "sample_std_fp32": samples["fp32"].std().item()}


def correctness(golden_dir, out):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__}
    failed = []
    for kind in ("udit", "dit"):
        g = torch.load(Path(golden_dir) / f"{kind}_tiny_golden.pt", weights_only=True)
        fp32 = golden_errors(g, device, torch.autocast(device.type, enabled=False))
        bf16 = golden_errors(g, device, torch.autocast(device.type, dtype=torch.bfloat16))
        report[f"{kind}_fp32"], report[f"{kind}_bf16"] = fp32, bf16
        failed += [f"{kind} {k}: {v:.2e}" for k, v in fp32.items()
                   if v > (FORWARD_TOL if k in ("train", "loss", "eval", "cfg") else LOOP_TOL)]
    report.update(bf16_sampling_drift(device))
    report["failed"] = failed
    (out / "gpu_correctness.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


def sample_ddp_with_cuda_graph(out):
    """sample_ddp.py with and without --cuda-graph on one random U-DiT-S checkpoint (pixel space, 32 px).

    Returns how many of the uint8 sample values differ and by at most how much.
    """
    import tempfile
    import numpy as np
    work = Path(tempfile.mkdtemp())  # OUT brings back 8 files at most: samples stay here
    torch.manual_seed(0)
    model = with_random_outputs(create_model("U-DiT-S", input_size=32, in_channels=3, num_classes=10))
    ckpt = work / "tiny_udit_s.pt"
    torch.save(model.state_dict(), ckpt)
    common = [sys.executable, str(ROOT / "sample_ddp.py"), "--ckpt", str(ckpt), "--model", "U-DiT-S",
              "--image-size", "32", "--num-classes", "10", "--vae", "none", "--num-fid-samples", "64",
              "--per-proc-batch-size", "32", "--num-sampling-steps", "50", "--cfg-scale", "4", "--precision", "bf16"]
    arrays = {}
    for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        folder = work / f"samples_{name}"
        subprocess.run([*common, *extra, "--sample-dir", str(folder)], check=True)
        arrays[name] = np.load(next(folder.glob("*.npz")))["arr_0"].astype(np.int16)
    diff = np.abs(arrays["graph"] - arrays["eager"])
    report = {"values": int(diff.size), "values_differing": int((diff > 0).sum()), "max_abs_diff": int(diff.max())}
    (out / "gpu_sample_graph.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def train_with_cuda_graph(out, model="U-DiT-B", steps=60, batch=32):
    """train.py eager and with --cuda-graph on random 32x32 features: steps/s after warm-up and losses.

    Both runs start from the same seed; their losses differ only through the random
    draws of the graph's warm-up, so they must track each other, not match.
    """
    import re
    import tempfile
    import numpy as np
    work = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    feats, labels = work / "features" / "imagenet256_features", work / "features" / "imagenet256_labels"
    feats.mkdir(parents=True)
    labels.mkdir()
    for i in range(4 * batch):
        np.save(feats / f"{i}.npy", rng.normal(size=(1, 4, 32, 32)).astype(np.float32))
        np.save(labels / f"{i}.npy", np.array([i % 1000]))
    report = {}
    for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--feature-path", str(work / "features"),
                        "--model", model, "--precision", "bf16", "--global-batch-size", str(batch),
                        "--max-steps", str(steps), "--log-every", str(steps // 3), "--num-workers", "2",
                        "--results-dir", str(work / name), *extra], check=True)
        log = next((work / name).glob("*/log.txt")).read_text()
        lines = re.findall(r"Train Loss: ([\d.]+), Train Steps/Sec: ([\d.]+)", log)
        report[name] = {"losses": [float(a) for a, _ in lines], "steps_per_s": [float(b) for _, b in lines]}
    report["speedup_last_interval"] = report["graph"]["steps_per_s"][-1] / report["eager"]["steps_per_s"][-1]
    (out / "gpu_train_graph.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def spatial_conv_nchw(x, weight, bias=None, padding=0, groups=1):
    """models.spatial_conv through a contiguous NCHW copy instead of the channels-last view."""
    nchw = x.permute(0, 3, 1, 2).contiguous()
    return F.conv2d(nchw, weight, bias, padding=padding, groups=groups).permute(0, 2, 3, 1)


def conv_layout_step_times(step, sync, replays=10):
    """Milliseconds of one graph-replayed `step` with the model's spatial convolutions in each layout."""
    channels_last, times = models.spatial_conv, {}
    try:
        for layout, conv in (("channels-last", channels_last), ("NCHW", spatial_conv_nchw)):
            models.spatial_conv = conv
            graph = capture(step)
            sync()
            start = time.perf_counter()
            for _ in range(replays):
                graph.replay()
            sync()
            times[layout] = (time.perf_counter() - start) / replays * 1e3
            del graph
    finally:
        models.spatial_conv = channels_last
    return times


def profile(out, device, name="U-DiT-B", batch=32):
    """Where a U-DiT-B training step spends its GPU time, and what the depthwise convolutions cost.

    1. torch.profiler over two eager bf16 training steps (batch 32, 256 px): the kernels
       with the most GPU time -> OUT/profile.txt;
    2. a 5x5 depthwise convolution, forward + backward in bf16, at each U-DiT-B FFN
       shape, with channels-last and contiguous (NCHW) inputs;
    3. on a GPU, the whole training step replayed from a CUDA graph with the model's
       spatial convolutions as they are (channels-last) and run in NCHW layout.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    torch.manual_seed(0)
    model = create_model(name).to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=cuda)
    diffusion = create_diffusion("")
    x = torch.randn(batch, 4, 32, 32, device=device)
    t, y = torch.randint(0, 1000, (batch,), device=device), torch.randint(0, 1000, (batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(2):
            step()
        sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=30, max_name_column_width=90)
    (out / "profile.txt").write_text(table)
    print(table)

    print(f"{'depthwise 5x5 fwd+bwd, bf16':<32} {'channels-last ms':>17} {'NCHW ms':>9}")
    for channels, side in ((384, 32), (768, 32), (768, 16), (1536, 8)):  # U-DiT-B's FFN maps
        weight = torch.randn(channels, 1, 5, 5, device=device, dtype=torch.bfloat16, requires_grad=True)
        times = []
        for layout in (torch.channels_last, torch.contiguous_format):
            inp = torch.randn(batch, channels, side, side, device=device, dtype=torch.bfloat16)
            inp = inp.contiguous(memory_format=layout).requires_grad_()

            def conv():
                torch.nn.functional.conv2d(inp, weight, padding=2, groups=channels).sum().backward()
            for _ in range(3):
                conv()
            sync()
            start = time.perf_counter()
            for _ in range(10):
                conv()
            sync()
            times.append((time.perf_counter() - start) / 10 * 1e3)
        print(f"{f'{batch} x {channels} x {side} x {side}':<32} {times[0]:>17.3f} {times[1]:>9.3f}")

    if cuda:
        for layout, ms in conv_layout_step_times(step, sync).items():
            print(f"{name} training step, CUDA graph, spatial convolutions {layout}: {ms:.1f} ms")
    return 0


BENCH = ["--batch-size", "32", "--precision", "bf16"]
STAGES = {
    "correctness": None,
    "graphs": ["--models", "U-DiT-B", "U-DiT-L", "DiT-B/2", "DiT-L/2", "DiT-XL/2", *BENCH, "--rounds", "5",
               "--cuda-graph", "--sampling", "--sampling-models", "U-DiT-B", "DiT-XL/2"],
    "sample-graph": None,
    "train-graph": None,
    "profile": None,
    "eager": ["--models", "U-DiT-B", "U-DiT-L", "DiT-B/2", "DiT-L/2", "DiT-XL/2", *BENCH, "--rounds", "5",
              "--breakdown"],
    "eager-sampling": ["--models", "U-DiT-B", "DiT-XL/2", *BENCH, "--rounds", "1", "--sampling"],
    "blocks": ["--models", "U-DiT-B", "U-DiT-L", "DiT-XL/2", *BENCH, "--rounds", "5", "--compile", "blocks"],
    "alignment": ["--models", "U-DiT-B", "DiT-B/2", *BENCH, "--rounds", "5", "--cuda-graph", "--alignment"],
}


def build_parser():
    p = ArgumentParser(prog="gpu_check.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", type=output_dir, default=".", help="folder for the JSON results and logs")
    p.add_argument("--golden", default=str(ROOT.parent / "shared" / "golden"))
    p.add_argument("--deadline-s", type=positive_float, default=420,
                   help="all stages together stop after this many seconds")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES),
                   help="what to run, in this order (default: all)")
    p.add_argument("--inline", choices=["correctness", "sample-graph", "train-graph", "profile"],
                   help=argparse.SUPPRESS)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.inline == "correctness":
        return correctness(args.golden, out)
    if args.inline == "sample-graph":
        return sample_ddp_with_cuda_graph(out)
    if args.inline == "train-graph":
        return train_with_cuda_graph(out)
    if args.inline == "profile":
        return profile(out, torch.device("cuda"))

    start = time.monotonic()
    commands = []
    for name in args.stages:
        if STAGES[name] is None:
            command = [sys.executable, __file__, "--out", str(out), "--golden", args.golden, "--inline", name]
        else:
            command = [sys.executable, str(ROOT / "bench" / "bench.py"), *STAGES[name],
                       "--json", str(out / f"gpu_{name}.json")]
        commands.append((name, command))
    status = {}
    for name, command in commands:
        left = args.deadline_s - (time.monotonic() - start)
        if left < 20:
            status[name] = "not run: deadline"
            continue
        t0 = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
                status[name] = f"exit {rc} after {time.monotonic() - t0:.0f} s"
            except subprocess.TimeoutExpired:
                status[name] = f"stopped at the deadline after {time.monotonic() - t0:.0f} s"
        print(f"== {name}: {status[name]}", flush=True)
        print((out / f"{name}.log").read_text()[-3000:], flush=True)
    (out / "gpu_status.json").write_text(json.dumps(status, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
