"""Side-by-side speed of U-DiT and DiT: training step, inference forward, sampling.

    python bench/bench.py                                   # CPU: U-DiT-S vs DiT-S/2, fp32, batch 8
    python bench/bench.py --models U-DiT-B U-DiT-L DiT-B/2 DiT-L/2 DiT-XL/2 --batch-size 32 \\
        --precision bf16 --compile --sampling                # GPU

Models are measured in one process, alternating between them round by round, so that
they see the same machine state; each figure is the median over rounds. The ceiling is
a large matrix product in the same precision, measured in the same run; utilisation is
achieved GFLOP/s over that ceiling (training counts forward + backward as 3x the
forward MACs). Prints a table and writes JSON (--json).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion import create_diffusion  # noqa: E402
from models import DiT_models, count_params, create_model, model_report  # noqa: E402
from udit.distributed import configure_matmul_precision  # noqa: E402

SAME_MACS = {"U-DiT-S": "DiT-S/2", "U-DiT-B": "DiT-B/2", "U-DiT-L": "DiT-L/2"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def gemm_ceiling(device, dtype, size, repeats=5):
    """GFLOP/s of a size x size matrix product: the device's attainable peak in this precision."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size ** 3 / seconds / 1e9


class Case:
    """One model with its optimizer and inputs; step() and infer() run one iteration each."""

    def __init__(self, name, args, device):
        self.name = name
        torch.manual_seed(0)
        self.model = create_model(name, input_size=args.latent_size).to(device)
        self.params = count_params(self.model)
        self.gmacs = model_report([name], args.latent_size)[0][3]  # folded, as the paper counts
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.diffusion = create_diffusion("")
        n = args.batch_size
        self.x = torch.randn(n, 4, args.latent_size, args.latent_size, device=device)
        self.y = torch.randint(0, 1000, (n,), device=device)
        self.t = torch.randint(0, 1000, (n,), device=device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                         else nullcontext())
        self.train_fn = torch.compile(self.model) if args.compile else self.model
        self.infer_fn = self.train_fn
        self.times = {"train": [], "infer": []}

    def step(self):
        with self.autocast:
            loss = self.diffusion.training_losses(self.train_fn, self.x, self.t, {"y": self.y})["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def infer(self):
        with self.autocast:
            self.infer_fn(self.x, self.t, self.y)

    def set_mode(self, training):
        """Switch mode outside the timed region; in eval, fold the FFNs once (as sampling does)."""
        self.model.train(training)
        if not training:
            self.infer()


def sampling_rate(name, args, device):
    """Images/s for 250 DDPM steps with guidance and the SD-VAE decode (random weights, same cost)."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    model = create_model(name, input_size=args.latent_size).to(device).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4).to(device).eval()
    forward = torch.compile(model.forward_with_cfg) if args.compile else model.forward_with_cfg
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    diffusion = create_diffusion(str(args.sampling_steps))
    n = args.batch_size
    z = torch.randn(n, 4, args.latent_size, args.latent_size, device=device)
    y = torch.cat([torch.randint(0, 1000, (n,), device=device), torch.full((n,), 1000, device=device)])

    def model_fn(x, t, **kw):
        with autocast:
            return forward(x, t, **kw).float()

    def run():
        with torch.no_grad():
            out = diffusion.p_sample_loop(model_fn, (2 * n, 4, args.latent_size, args.latent_size),
                                          torch.cat([z, z]), clip_denoised=False,
                                          model_kwargs={"y": y, "cfg_scale": 1.5}, device=device)
            with autocast:
                vae.decode(out[:n] / 0.18215)
    run()  # warm-up (and compilation)
    seconds = timed(run, device)
    return n / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", nargs="+", default=["U-DiT-S", "DiT-S/2"], choices=list(DiT_models))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gemm-size", type=int, default=None, help="default: 2048 on CPU, 8192 on GPU")
    p.add_argument("--sampling", action="store_true", help="also measure 250-step guided sampling with VAE decode")
    p.add_argument("--sampling-steps", type=int, default=250)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.latent_size = args.image_size // 8

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_matmul_precision(args.precision, device)
    gemm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    ceiling = gemm_ceiling(device, gemm_dtype, gemm_size)

    cases = [Case(name, args, device) for name in args.models]
    for _ in range(args.warmup):
        for case in cases:
            case.set_mode(True)
            case.step()
            case.set_mode(False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.rounds):
        for case in cases:
            case.set_mode(True)
            case.times["train"].append(timed(case.step, device))
        for case in cases:
            case.set_mode(False)
            case.times["infer"].append(timed(case.infer, device))

    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "precision": args.precision, "compile": args.compile,
               "batch_size": args.batch_size, "image_size": args.image_size,
               "gemm_ceiling_gflops": ceiling, "date": time.strftime("%Y-%m-%d"), "models": {}}
    for case in cases:
        train_s, infer_s = statistics.median(case.times["train"]), statistics.median(case.times["infer"])
        train_gflops = 3 * 2 * case.gmacs * args.batch_size / train_s
        results["models"][case.name] = {
            "params": case.params, "gmacs": case.gmacs, "train_step_s": train_s, "infer_s": infer_s,
            "train_steps_per_s": 1 / train_s, "train_gflops": train_gflops, "utilisation": train_gflops / ceiling}
    if args.sampling:
        for name in args.models:
            results["models"][name]["sampling_images_per_s"] = sampling_rate(name, args, device)

    print(f"{results['device']}, torch {torch.__version__}, {args.precision}{' compiled' if args.compile else ''}, "
          f"batch {args.batch_size}, {args.image_size} px; GEMM ceiling {ceiling:.0f} GFLOP/s")
    print(f"{'model':<10} {'GMACs':>7} {'train s':>9} {'infer s':>9} {'GFLOP/s':>8} {'util':>6}  ratios (train / infer)")
    names = set(results["models"])
    for name, r in results["models"].items():
        ratios = []
        for other in (SAME_MACS.get(name), "DiT-XL/2"):
            if other in names and other != name:
                o = results["models"][other]
                ratios.append(f"vs {other}: {r['train_step_s'] / o['train_step_s']:.2f}x / "
                              f"{r['infer_s'] / o['infer_s']:.2f}x")
        extra = f"  {r['sampling_images_per_s']:.2f} img/s sampling" if "sampling_images_per_s" in r else ""
        print(f"{name:<10} {r['gmacs']:>7.2f} {r['train_step_s']:>9.3f} {r['infer_s']:>9.3f} "
              f"{r['train_gflops']:>8.0f} {r['utilisation']:>6.0%}  {'; '.join(ratios)}{extra}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
