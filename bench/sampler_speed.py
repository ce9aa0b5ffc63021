"""Time per image of sampling configurations, side by side, and the projected hours for 50K images on an H200.

    python bench/sampler_speed.py                       # the README's recommended configurations
    python bench/sampler_speed.py --configs "ddpm 25" "dpm++2m-sde 10 interval=0.5,10" "unipc 10 autoguidance"

A configuration is "SAMPLER STEPS [spacing=S] [shift=S] [interval=LOW,HIGH] [cfg=SCALE] [autoguidance]"
(cfg 1.5 by default, the FID setting; autoguidance uses a second U-DiT-B as guide). Each
samples one batch of --batch-size images of U-DiT-B (random weights; zero-initialised
layers kept, which changes no cost) at 256 px, i.e. 32x32x4 latents, VAE decode not
included; configurations alternate round by round in one process and the figure is the
median over rounds. Time per image = NFE x time per network evaluation + the solver's
own work, so DDPM's 250 steps are projected from a shorter run (same work per step).

H200 projection: NFE x 0.83 ms per image and network evaluation, the figure measured in
bench/RESULTS.md (250 guided DDPM steps, i.e. 500 evaluations per image, U-DiT-B, bf16,
batch 32, --cuda-graph: 2.41 images/s, 50K images in 5.8 h, SD-VAE decode included).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from udit.samplers import Guidance, make_sampler  # noqa: E402
from udit.sampling import generate  # noqa: E402
from udit.cli import ArgumentParser, output_file, positive_int  # noqa: E402

H200_SECONDS_PER_EVALUATION = 1 / (2.41 * 500)  # per image; bench/RESULTS.md, sampling with --cuda-graph
# README, Sampling, "Which to use" (DDPM's 250 steps timed as 25: the same work per step).
RECOMMENDED = ["ddpm 25", "dpm++3m 10 spacing=trailing interval=1,2", "euler 20 spacing=trailing interval=1,2",
               "dpm++2m-sde 10", "dpm++2m-sde 20 interval=1,2 autoguidance", "flow-sde 50",
               "flow-heun 10 shift=3 interval=1,2"]


def parse(text):
    """'SAMPLER STEPS [key=value ...] [autoguidance]' -> (sampler, guidance settings)."""
    name, steps, *rest = text.split()
    options = dict(item.split("=", 1) if "=" in item else (item, True) for item in rest)
    sampler = make_sampler(name, int(steps), options.get("spacing"),
                           shift=float(options["shift"]) if "shift" in options else None)
    interval = tuple(float(v) for v in options["interval"].split(",")) if "interval" in options else None
    return sampler, {"scale": float(options.get("cfg", 1.5)), "interval": interval,
                     "autoguidance": bool(options.get("autoguidance"))}


def build_parser():
    p = ArgumentParser(prog="sampler_speed.py", description=__doc__.strip().splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", default=RECOMMENDED,
                   help='each "SAMPLER STEPS [spacing=S] [shift=S] [interval=LOW,HIGH] [cfg=SCALE] [autoguidance]", '
                        'e.g. "euler 20 spacing=trailing interval=1,2"')
    p.add_argument("--model", default="U-DiT-B", help="random weights, 256 px (32x32x4 latents)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per generate() call")
    p.add_argument("--rounds", type=positive_int, default=2, help="the figure is the median over rounds")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    p.add_argument("--json", type=output_file, help="also write the figures here")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    networks = {}

    def network(objective, role):
        """U-DiT-B of the objective (flow: no learned-variance channels), main or guide, made once."""
        if (objective, role) not in networks:
            networks[objective, role] = create_model(args.model, learn_sigma=objective == "ddpm").eval()
        return networks[objective, role]

    runs = []
    for text in args.configs:
        sampler, options = parse(text)
        guidance = Guidance(scale=options["scale"], interval=options["interval"],
                            guide=network(sampler.objective, "guide") if options["autoguidance"] else None)
        settings = {"in_channels": 4, "latent_size": 32, "num_classes": 1000, "trained_labels": list(range(1000)),
                    "objective": sampler.objective}
        runs.append((text, sampler, guidance, network(sampler.objective, "main"), settings))
    times = {text: [] for text, *_ in runs}
    with torch.no_grad():
        for round_ in range(args.rounds):
            for text, sampler, guidance, model, settings in runs:
                start = time.perf_counter()
                generate(model, None, settings, round_, range(args.batch_size), sampler, guidance)
                times[text].append((time.perf_counter() - start) / args.batch_size)
                print(f"round {round_}: {text}: {times[text][-1]:.2f} s per image", flush=True)

    print(f"\n{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print("| configuration | NFE | CPU s per image | CPU ms per NFE | H200 hours for 50K (projected) |")
    print("|---|---:|---:|---:|---:|")
    report = []
    for text, sampler, guidance, _, _ in runs:
        nfe = sampler.evaluations_per_image(guidance)["total"]
        seconds = statistics.median(times[text])
        hours = 50_000 * nfe * H200_SECONDS_PER_EVALUATION / 3600
        report.append({"config": text, "nfe": nfe, "cpu_s_per_image": seconds, "h200_hours_50k": hours})
        print(f"| {text} | {nfe} | {seconds:.2f} | {1000 * seconds / nfe:.0f} | {hours:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch_size": args.batch_size,
                                               "threads": torch.get_num_threads(), "rounds": args.rounds,
                                               "results": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
