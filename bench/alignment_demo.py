"""Flow matching with and without representation alignment on the digits, at equal minutes.

    python bench/alignment_demo.py --minutes 6 --train-seeds 0 1 --workers 2
    python bench/alignment_demo.py --minutes 6 --train-seeds 0 1 --stages candidates --seeds 0 \
        --reference-samples 200     # the measurement in bench/RESULTS.md (fixed candidates, no picks)

For each variant (`flow`; `repa`: REPA's recipe at the early 4 x 4 stage, cosine only;
`u-repa`: U-REPA at the 2 x 2 middle stage, upsampled, with the manifold loss) and each
training seed, trains the `make demo` model with `--objective flow` (scripts/demo.py
--alignment X --seed S --out results/alignment/X/seedS; a run already there is reused).
The aligned variants train for --minutes less the minutes their encoder took to train
(scripts/digits_encoder.py, once, shared), so every variant gets the same total minutes.
All runs train first, one at a time, so that no measurement shares the machine with a
timed run; then each checkpoint's front is measured with bench/sampling_front.py
(--stages, as bench/objectives_demo.py: about 60 configurations per checkpoint; `--stages
candidates` measures the README's 12 fixed candidates of at most 50 NFE and the 250-step
reference instead, a fifth of the time), and each run's best configuration with at most
--max-nfe network evaluations per image is reported, with the mean over training seeds
and its ratio to flow's. The plot (results/alignment/curves.png) shows the FD and class
accuracy the runs measured while training against total minutes, and the aligned runs'
cosine similarity between the projected state and the encoder's tokens (minus
train/align) against steps: whether the alignment was learned at all.
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


def train(variant, train_seed, out, minutes):
    """scripts/demo.py --objective flow for one variant and seed, unless its checkpoint is already there."""
    if (out / "checkpoint.pt").is_file():
        print(f"{variant}, seed {train_seed}: reusing {out / 'checkpoint.pt'}", flush=True)
        return
    alignment = [] if variant == "flow" else ["--alignment", variant]
    subprocess.run([sys.executable, "scripts/demo.py", "--objective", "flow", *alignment, "--minutes", f"{minutes:.3f}",
                    "--seed", str(train_seed), "--out", str(out.relative_to(ROOT))], cwd=ROOT, check=True)


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
    colors = {variant: f"C{i}" for i, variant in enumerate(VARIANTS)}
    for (variant, train_seed), points in curves.items():
        minutes, fds, accuracies = zip(*points)
        style = {"color": colors[variant], "linestyle": "-" if train_seed == min(s for _, s in curves) else "--",
                 "label": f"{variant}, seed {train_seed}"}
        ax_fd.plot(minutes, fds, marker="o", **style)
        ax_accuracy.plot(minutes, accuracies, marker="o", **style)
        if (variant, train_seed) in cosines:
            ax_cos.plot(*zip(*cosines[variant, train_seed]), **style)
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


def print_table(args, encoder, results, cosines):
    """Markdown: each run's best configuration within --max-nfe, then each variant's mean over training seeds."""
    print(f"\nAt {args.minutes:g} minutes each (aligned variants: {encoder:.1f} of them training the encoder); best "
          f"configuration with at most {args.max_nfe} NFE (FD and class accuracy: mean of sampling seeds "
          f"{args.seeds}, {args.samples} samples each):\n")
    print("| variant | training seed | training minutes | training steps | best configuration | NFE | FD | "
          "class accuracy | final cosine |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for (variant, train_seed), r in results.items():
        fd, accuracy, nfe, name = r["best"] or (np.nan, np.nan, 0, "-")
        cosine = (f"{np.mean([c for _, c in cosines[variant, train_seed][-3:]]):.3f}"
                  if (variant, train_seed) in cosines else "-")
        print(f"| {variant} | {train_seed} | {r['training_minutes']:.1f} | {r['training_steps']} | {name} | {nfe} | "
              f"{fd:.2f} | {accuracy:.3f} | {cosine} |")
    means = {}
    for variant in args.variants:
        bests = [r["best"] for (v, _), r in results.items() if v == variant and r["best"]]
        means[variant] = (np.mean([b[0] for b in bests]), np.mean([b[1] for b in bests])) if bests else (np.nan,) * 2
    print(f"\n| variant | FD, mean of training seeds {args.train_seeds} | class accuracy | FD / flow's |")
    print("|---|---:|---:|---:|")
    for variant, (fd, accuracy) in means.items():
        ratio = f"{fd / means['flow'][0]:.2f}" if "flow" in means else "-"
        print(f"| {variant} | {fd:.2f} | {accuracy:.3f} | {ratio} |")


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
    p.add_argument("--reference-samples", type=positive_int,
                   help="samples of the candidates stage's 250-step reference (default: --samples)")
    p.add_argument("--workers", type=positive_int, default=1, help="configurations measured at a time (one process each)")
    p.add_argument("--train-seeds", type=seed, nargs="+", default=[0, 1], help="one training run per variant and seed")
    args = p.parse_args(argv)
    out = ROOT / args.out
    encoder = encoder_minutes() if set(args.variants) - {"flow"} else 0.0
    if encoder >= args.minutes:
        p.error(f"--minutes {args.minutes} leaves no training time after the encoder's {encoder:.1f} minutes")
    runs = [(variant, train_seed) for train_seed in args.train_seeds for variant in args.variants]
    offsets = {variant: 0.0 if variant == "flow" else encoder for variant in args.variants}
    for variant, train_seed in runs:
        train(variant, train_seed, out / variant / f"seed{train_seed}", args.minutes - offsets[variant])
    results, curves, cosines = {}, {}, {}
    for variant, train_seed in runs:
        run = out / variant / f"seed{train_seed}"
        front_json = run / "sampling_front.json"
        sampling_front.main(["--ckpt", str(run / "checkpoint.pt"), "--json", str(front_json), "--stages",
                             *args.stages, "--workers", str(args.workers), "--samples", str(args.samples),
                             "--max-nfe", str(args.max_nfe), "--seeds", *map(str, args.seeds),
                             *(["--reference-samples", str(args.reference_samples)] if args.reference_samples else [])])
        records = json.loads(front_json.read_text())
        summary = json.loads((run / "summary.json").read_text())
        run_dir = next((run / "train").glob("*/"))
        results[variant, train_seed] = {"training_steps": summary["training_steps"],
                                        "training_minutes": args.minutes - offsets[variant],
                                        "best": best_within(records, args.max_nfe, args.seeds, args.samples)}
        curves[variant, train_seed] = [(m + offsets[variant], fd, a) for m, fd, a in fd_against_minutes(run_dir)]
        if variant != "flow":
            cosines[variant, train_seed] = cosine_against_steps(run_dir)
    plot(curves, cosines, out / "curves.png")
    print_table(args, encoder, results, cosines)
    print(f"\nFD while training against minutes, and the cosine similarity: {out / 'curves.png'}")
    for (variant, train_seed), points in curves.items():
        print(f"{variant}, seed {train_seed}: " + ", ".join(f"{m:.1f} min FD {fd:.2f} accuracy {a:.2f}"
                                                           for m, fd, a in points))
    (out / "summary.json").write_text(json.dumps(
        {"minutes": args.minutes, "encoder_minutes": encoder, "train_seeds": args.train_seeds,
         "results": {f"{v}/seed{s}": r for (v, s), r in results.items()},
         "curves": {f"{v}/seed{s}": c for (v, s), c in curves.items()},
         "cosines": {f"{v}/seed{s}": c for (v, s), c in cosines.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
