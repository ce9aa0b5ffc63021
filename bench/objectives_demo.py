"""Flow matching against the paper's objective on the digits, at equal training minutes.

    python bench/objectives_demo.py --minutes 8 --workers 2

For each objective (`ddpm`, `flow`): trains the `make demo` model for --minutes
(scripts/demo.py --objective X --out results/objectives/X; a run already there is
reused), measures its quality-against-NFE front with bench/sampling_front.py (each
solver of the objective's family at 5, 10, 20 and 50 steps, spacing or time shift
picked, with and without the guidance interval; two seeds, 1,000 samples each) and
reports each objective's best configuration with at most --max-nfe network evaluations
per image. Also plots the FD that the run measured while it trained (500 samples, the
objective's deterministic sampler at 25 steps, cfg 4) against training minutes
(results/objectives/curves.png).
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

import sampling_front  # noqa: E402
from udit.monitor import read_scalars  # noqa: E402
from udit.cli import ArgumentParser, number, output_dir, positive_float, positive_int, seed  # noqa: E402

OBJECTIVES = ("ddpm", "flow")
FRONT_STAGES = ["spacing", "front", "interval", "front-interval"]


def train(objective, out, minutes):
    """scripts/demo.py for one objective, unless its checkpoint is already there."""
    if (out / "checkpoint.pt").is_file():
        print(f"{objective}: reusing {out / 'checkpoint.pt'}", flush=True)
        return
    subprocess.run([sys.executable, "scripts/demo.py", "--objective", objective, "--minutes", str(minutes),
                    "--out", str(out.relative_to(ROOT))], cwd=ROOT, check=True)


def best_within(records, max_nfe, seeds, samples):
    """(FD mean, accuracy mean, NFE, label) of the configuration with the lowest mean FD at <= max_nfe."""
    full = [rs for rs in sampling_front.complete(records, samples, seeds).values() if rs[seeds[0]]["nfe"] <= max_nfe]
    scored = [(float(np.mean([rs[s]["fd_classifier"] for s in seeds])),
               float(np.mean([rs[s]["class_accuracy"] for s in seeds])), rs[seeds[0]]["nfe"],
               sampling_front.label(rs[seeds[0]]["config"])) for rs in full]
    return min(scored) if scored else None


def fd_against_minutes(run_dir):
    """[(training minutes, FD, class accuracy)] of the evaluations during training; minutes from the step's log time."""
    scalars = read_scalars(run_dir / "tensorboard", wall_time=True)
    steps, _, times = zip(*scalars["train/loss"])
    start = times[0] - steps[0] * (times[1] - times[0]) / max(1, steps[1] - steps[0])  # the first log is at step N
    accuracy = {step: value for step, value, _ in scalars["eval/class_accuracy"]}
    return [(float(np.interp(step, steps, times) - start) / 60, fd, accuracy[step])
            for step, fd, _ in scalars["eval/fd_classifier"]]


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_fd, ax_accuracy) = plt.subplots(1, 2, figsize=(10, 3.8))
    for objective, points in curves.items():
        minutes, fds, accuracies = zip(*points)
        ax_fd.plot(minutes, fds, marker="o", label=f"--objective {objective}")
        ax_accuracy.plot(minutes, accuracies, marker="o", label=f"--objective {objective}")
    ax_fd.set(xlabel="training minutes (2 CPU processes)", ylabel="FD in classifier features", yscale="log",
              title="FD while training (500 samples, 25 steps, cfg 4)")
    ax_accuracy.set(xlabel="training minutes (2 CPU processes)", ylabel="class accuracy", ylim=(0, 1.02),
                    title="class accuracy (an FD without the classes means little)")
    for ax in (ax_fd, ax_accuracy):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = ArgumentParser(prog="objectives_demo.py", description=__doc__.strip().splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=positive_float, default=8.0, help="training minutes of each objective")
    p.add_argument("--out", default="results/objectives", help="one folder per objective, the plot and summary")
    p.add_argument("--max-nfe", type=positive_int, default=50,
                   help="network evaluations per image allowed the best sampler")
    p.add_argument("--seeds", type=seed, nargs="+", default=[0, 1], help="one sampling run per seed")
    p.add_argument("--samples", type=number(int, min=2), default=1000, help="samples per measurement")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="configurations measured at a time (one process each)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    out = ROOT / args.out
    try:
        output_dir(str(out))  # --out is relative to the repository, not to the working directory
    except argparse.ArgumentTypeError as err:
        p.error(f"argument --out: {err}")
    results, curves = {}, {}
    for objective in OBJECTIVES:
        run = out / objective
        train(objective, run, args.minutes)
        front_json = run / "sampling_front.json"
        sampling_front.main(["--ckpt", str(run / "checkpoint.pt"), "--json", str(front_json), "--stages",
                             *FRONT_STAGES, "--workers", str(args.workers), "--samples", str(args.samples),
                             "--max-nfe", str(args.max_nfe),
                             "--seeds", *map(str, args.seeds)])
        records = json.loads(front_json.read_text())
        summary = json.loads((run / "summary.json").read_text())
        results[objective] = {"training_steps": summary["training_steps"],
                              "best": best_within(records, args.max_nfe, args.seeds, args.samples)}
        curves[objective] = fd_against_minutes(next((run / "train").glob("*/")))
    plot(curves, out / "curves.png")
    print(f"\nAt {args.minutes:g} training minutes each; best configuration with at most {args.max_nfe} NFE "
          f"(FD and class accuracy: mean of seeds {args.seeds}, {args.samples} samples each):\n")
    print("| objective | training steps | best configuration | NFE | FD | class accuracy |")
    print("|---|---:|---|---:|---:|---:|")
    for objective, r in results.items():
        fd, accuracy, nfe, name = r["best"]
        print(f"| {objective} | {r['training_steps']} | {name} | {nfe} | {fd:.2f} | {accuracy:.3f} |")
    print(f"\nFD while training against minutes: {out / 'curves.png'}")
    for objective, points in curves.items():
        print(f"{objective}: " + ", ".join(f"{m:.1f} min FD {fd:.2f} accuracy {a:.2f}" for m, fd, a in points))
    (out / "summary.json").write_text(json.dumps({"minutes": args.minutes, "results": results, "curves": curves},
                                                 indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
