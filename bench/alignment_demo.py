"""Flow matching with and without representation alignment on the digits, at equal minutes.

    python bench/alignment_demo.py --minutes 8 --workers 2

For each variant (`flow`; `repa`: REPA's recipe at the early 4 x 4 stage, cosine only;
`u-repa`: U-REPA at the 2 x 2 middle stage, upsampled, with the manifold loss), trains the
`make demo` model with `--objective flow` (scripts/demo.py --alignment X --out
results/alignment/X; a run already there is reused). The aligned variants train for
--minutes less the minutes their encoder took to train (scripts/digits_encoder.py, once,
shared), so every variant gets the same total minutes. Each checkpoint's front is measured
with bench/sampling_front.py (--stages, as bench/objectives_demo.py), and each variant's
best configuration with at most --max-nfe network evaluations per image is reported. The
plot (results/alignment/curves.png) shows the FD and class accuracy the runs measured while
training against total minutes, and the aligned runs' cosine similarity between the
projected state and the encoder's tokens (minus train/align) against steps: whether the
alignment was learned at all.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import sampling_front  # noqa: E402
from objectives_demo import FRONT_STAGES, best_within, fd_against_minutes  # noqa: E402
from udit.cli import ArgumentParser, positive_float, positive_int, seed  # noqa: E402
from udit.monitor import read_scalars  # noqa: E402

VARIANTS = ("flow", "repa", "u-repa")


def train(variant, out, minutes):
    """scripts/demo.py --objective flow for one variant, unless its checkpoint is already there."""
    if (out / "checkpoint.pt").is_file():
        print(f"{variant}: reusing {out / 'checkpoint.pt'}", flush=True)
        return
    alignment = [] if variant == "flow" else ["--alignment", variant]
    subprocess.run([sys.executable, "scripts/demo.py", "--objective", "flow", *alignment, "--minutes", f"{minutes:.3f}",
                    "--out", str(out.relative_to(ROOT))], cwd=ROOT, check=True)


def encoder_minutes():
    """The digits encoder's training minutes, training it first (scripts/demo.py's cache) if missing."""
    from demo import digits, digits_encoder, split
    (train_x, _), _ = split(*digits())
    return digits_encoder(train_x, {})[1] / 60


def cosine_against_steps(run_dir):
    """[(step, mean cosine similarity of projection and encoder tokens)] of an aligned run's log steps."""
    return [(step, -value) for step, value in read_scalars(run_dir / "tensorboard").get("train/align", [])]


def plot(curves, cosines, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_fd, ax_accuracy, ax_cos) = plt.subplots(1, 3, figsize=(14, 3.8))
    for variant, points in curves.items():
        minutes, fds, accuracies = zip(*points)
        ax_fd.plot(minutes, fds, marker="o", label=variant)
        ax_accuracy.plot(minutes, accuracies, marker="o", label=variant)
    for variant, points in cosines.items():
        ax_cos.plot(*zip(*points), label=variant)
    ax_fd.set(xlabel="minutes (encoder training included)", ylabel="FD in classifier features", yscale="log",
              title="FD while training (500 samples, flow-euler 25, cfg 4)")
    ax_accuracy.set(xlabel="minutes (encoder training included)", ylabel="class accuracy", ylim=(0, 1.02),
                    title="class accuracy")
    ax_cos.set(xlabel="training step", ylabel="cosine similarity", ylim=(-0.05, 1.0),
               title="projected state vs encoder tokens")
    for ax in (ax_fd, ax_accuracy, ax_cos):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = ArgumentParser(prog="alignment_demo.py", description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=positive_float, default=8.0, help="total minutes of each variant, encoder included")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="results/alignment", help="one folder per variant, the plot and summary")
    p.add_argument("--stages", nargs="+", choices=sampling_front.STAGES, default=FRONT_STAGES,
                   help="what bench/sampling_front.py measures on each checkpoint")
    p.add_argument("--max-nfe", type=positive_int, default=50, help="network evaluations per image allowed the best sampler")
    p.add_argument("--seeds", type=seed, nargs="+", default=[0, 1], help="one sampling run per seed")
    p.add_argument("--samples", type=positive_int, default=1000, help="samples per measurement")
    p.add_argument("--workers", type=positive_int, default=1, help="configurations measured at a time (one process each)")
    args = p.parse_args(argv)
    out = ROOT / args.out
    encoder = encoder_minutes() if set(args.variants) - {"flow"} else 0.0
    if encoder >= args.minutes:
        p.error(f"--minutes {args.minutes} leaves no training time after the encoder's {encoder:.1f} minutes")
    results, curves, cosines = {}, {}, {}
    for variant in args.variants:
        run = out / variant
        offset = 0.0 if variant == "flow" else encoder
        train(variant, run, args.minutes - offset)
        front_json = run / "sampling_front.json"
        sampling_front.main(["--ckpt", str(run / "checkpoint.pt"), "--json", str(front_json), "--stages",
                             *args.stages, "--workers", str(args.workers), "--samples", str(args.samples),
                             "--max-nfe", str(args.max_nfe), "--seeds", *map(str, args.seeds)])
        records = json.loads(front_json.read_text())
        summary = json.loads((run / "summary.json").read_text())
        run_dir = next((run / "train").glob("*/"))
        results[variant] = {"training_steps": summary["training_steps"], "training_minutes": args.minutes - offset,
                            "best": best_within(records, args.max_nfe, args.seeds, args.samples)}
        curves[variant] = [(m + offset, fd, a) for m, fd, a in fd_against_minutes(run_dir)]
        if variant != "flow":
            cosines[variant] = cosine_against_steps(run_dir)
    plot(curves, cosines, out / "curves.png")
    print(f"\nAt {args.minutes:g} minutes each (aligned variants: {encoder:.1f} of them training the encoder); best "
          f"configuration with at most {args.max_nfe} NFE (FD and class accuracy: mean of seeds {args.seeds}, "
          f"{args.samples} samples each):\n")
    print("| variant | training minutes | training steps | best configuration | NFE | FD | class accuracy | "
          "final cosine |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for variant, r in results.items():
        fd, accuracy, nfe, name = r["best"] or (np.nan, np.nan, 0, "-")
        cosine = f"{np.mean([c for _, c in cosines[variant][-3:]]):.3f}" if variant in cosines else "-"
        print(f"| {variant} | {r['training_minutes']:.1f} | {r['training_steps']} | {name} | {nfe} | {fd:.2f} | "
              f"{accuracy:.3f} | {cosine} |")
    print(f"\nFD while training against minutes, and the cosine similarity: {out / 'curves.png'}")
    for variant, points in curves.items():
        print(f"{variant}: " + ", ".join(f"{m:.1f} min FD {fd:.2f} accuracy {a:.2f}" for m, fd, a in points))
    (out / "summary.json").write_text(json.dumps({"minutes": args.minutes, "encoder_minutes": encoder,
                                                  "results": results, "curves": curves, "cosines": cosines},
                                                 indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
