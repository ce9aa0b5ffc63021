"""Post-hoc EMA on the digits: one training run, a sweep of EMA widths, FD with and without guidance.

    python bench/posthoc_demo.py --steps 600 1200 --workers 2     # the measurement in bench/RESULTS.md

Trains the `make demo` model (scripts/demo.py's flags, 2 processes, no evaluations) once,
to the largest of --steps, with `--posthoc-ema 0.05 0.10`, a snapshot every
--posthoc-every steps and a checkpoint at each of --steps (a run already in --out is
reused). At each of --steps (two training lengths: a width chosen on one model may not
hold on another) it makes the EMA of each --sigma-rel with `python -m udit.phema --step`,
and samples each, and the run's fixed EMA at that step (make demo's
`--ema-decay 0.999 --ema-warmup`), in-process as bench/sampling_front.py does: at the
README's best configuration for this model within 50 NFE (dpm++2m-sde, 20 steps, cfg 4
on the interval (1, 5]: 23 NFE) and unguided (the same solver, cfg 1: 20 NFE). Scores:
make demo's classifier, FD in its features to the held-out digits and class accuracy,
mean over --seeds. Writes OUT/summary.json and plots FD and accuracy against sigma_rel
with the fixed EMA as lines, one row per training length (OUT/sweep.png).

The warm-up decay (1 + t) / (10 + t) = 1 - 9 / (t + 10) is, up to the shifted origin, the
power-function beta (1 - 1/t)^9 ~ 1 - 9 / t of gamma 8: while it stays below 0.999
(t < 8,990 steps) the fixed EMA is close to the power-function EMA of sigma_rel
gamma_to_sigma_rel(8) = 0.090, which the plot marks.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402
from sampling_front import ACCURACY_SLACK, Measurer, config, label  # noqa: E402
from udit.cli import ArgumentParser, positive_int, seed  # noqa: E402
from udit.ema import gamma_to_sigma_rel, sigma_rel_flag  # noqa: E402

# Within reach of 50-step snapshots at 600 steps (0.026 to 0.245, as python -m udit.phema reports).
SWEEP = (0.03, 0.04, 0.05, 0.07, 0.09, 0.11, 0.13, 0.16, 0.19, 0.23)
CONFIGS = {"guided": config("dpm++2m-sde", 20, cfg=4.0, interval=(1.0, 5.0)),
           "unguided": config("dpm++2m-sde", 20, cfg=1.0)}
DESCRIPTIONS = {"guided": "dpm++2m-sde 20, cfg 4 on (1, 5]", "unguided": "dpm++2m-sde 20, cfg 1"}
FIXED_EMA_SIGMA_REL = gamma_to_sigma_rel(8.0)


def train(out, lengths, every):
    """The demo model with post-hoc EMA, a checkpoint at each of `lengths`; returns the experiment folder."""
    steps = max(lengths)
    runs = sorted((out / "train").glob("*/checkpoints"))
    if runs and all((runs[-1] / f"{n:07d}.pt").is_file() for n in lengths):
        print(f"reusing {runs[-1].parent}", flush=True)
        return runs[-1].parent
    data = demo.write_image_folder(*demo.split(*demo.digits())[0], ROOT / "results" / "digits_train")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                    "--data-path", str(data), "--results-dir", str(out / "train"), *demo.TRAIN_FLAGS,
                    "--sample-every", "0", "--max-steps", str(steps), "--ckpt-every", str(math.gcd(*lengths)),
                    "--posthoc-ema", "0.05", "0.10", "--posthoc-every", str(every)],
                   cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return sorted((out / "train").glob("*/checkpoints"))[-1].parent


_measurers = {}


def _measure(ckpt, name, seed, samples):
    if ckpt not in _measurers:
        _measurers[ckpt] = Measurer(ckpt, threads=1)
    return _measurers[ckpt].measure({**CONFIGS[name], "samples": samples}, seed)


def distance_to_fixed(ckpts):
    """{sigma_rel: ||w - w_fixed|| / ||w_fixed||} over all weights: how far each width is from the fixed EMA."""
    from udit.checkpoint import load_checkpoint
    fixed = load_checkpoint(ckpts["fixed"])["ema"]
    norm = sum(float(v.float().square().sum()) for v in fixed.values()) ** 0.5
    return {s: sum(float((load_checkpoint(path)["ema"][k].float() - v.float()).square().sum())
                   for k, v in fixed.items()) ** 0.5 / norm
            for s, path in ckpts.items() if s != "fixed"}


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = summary["runs"]
    fig, axes = plt.subplots(len(lengths), 2, figsize=(10, 3.6 * len(lengths)), squeeze=False)
    for (ax_fd, ax_accuracy), (steps, run) in zip(axes, lengths.items()):
        for name, color in zip(CONFIGS, ("C0", "C1")):
            sigmas = [float(s) for s in run["posthoc"]]
            for ax, metric in ((ax_fd, "fd_classifier"), (ax_accuracy, "class_accuracy")):
                ax.plot(sigmas, [run["posthoc"][s][name][metric] for s in run["posthoc"]], marker="o",
                        color=color, label=f"post-hoc EMA, {DESCRIPTIONS[name]}")
                ax.axhline(run["fixed"][name][metric], color=color, linestyle="--",
                           label=f"fixed EMA (0.999, warm-up), {name}")
        for ax in (ax_fd, ax_accuracy):
            ax.axvline(FIXED_EMA_SIGMA_REL, color="gray", linestyle=":", label="width of the warm-up EMA (0.090)")
            ax.grid(alpha=0.3, which="both")
        ax_fd.set(xlabel="sigma_rel", ylabel="FD in classifier features", yscale="log",
                  title=f"{steps} steps: FD to held-out digits ({summary['samples']} samples x "
                        f"{len(summary['seeds'])} seeds)")
        ax_accuracy.set(xlabel="sigma_rel", ylabel="class accuracy", title=f"{steps} steps: class accuracy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("digits model: EMA width chosen after training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(steps, result, summary):
    """Markdown: FD / class accuracy of each EMA at one training length, and the best width per configuration."""
    fixed, means, distance = result["fixed"], result["posthoc"], result["weight_distance_to_fixed"]
    print(f"\n{steps} steps; FD / class accuracy, mean of seeds {summary['seeds']}, {summary['samples']} samples "
          "each:\n")
    print("| EMA | " + " | ".join(f"{n} ({DESCRIPTIONS[n]}, {fixed[n]['nfe']} NFE)" for n in CONFIGS)
          + " | weights' distance to the fixed EMA |")
    print("|---|" + "---:|" * (len(CONFIGS) + 1))
    rows = [("fixed 0.999, warm-up", fixed, "0")] + [(f"sigma_rel {s}", m, f"{distance[s]:.4f}")
                                                     for s, m in means.items()]
    for name, m, d in rows:
        print(f"| {name} | " + " | ".join(f"{m[n]['fd_classifier']:.2f} / {m[n]['class_accuracy']:.3f}"
                                          for n in CONFIGS) + f" | {d} |")
    for n in CONFIGS:
        best = best_width(means, fixed, n)
        if best is None:
            print(f"{n}: no width keeps the fixed EMA's class accuracy ({fixed[n]['class_accuracy']:.3f}) within "
                  f"{ACCURACY_SLACK}")
            continue
        print(f"{n}: best sigma_rel {best} (lowest FD keeping the fixed EMA's class accuracy within "
              f"{ACCURACY_SLACK}), FD {means[best][n]['fd_classifier']:.2f} / accuracy "
              f"{means[best][n]['class_accuracy']:.3f} against {fixed[n]['fd_classifier']:.2f} / "
              f"{fixed[n]['class_accuracy']:.3f} for the fixed EMA")


def best_width(means, fixed, name):
    """The sigma_rel of lowest FD among those within ACCURACY_SLACK of the fixed EMA's class accuracy, or None.

    FD alone rewards diversity: at 600 steps the widest EMA had the lowest guided FD (1.94
    against 3.12) by losing the classes (accuracy 0.70 against 0.97).
    """
    floor = fixed[name]["class_accuracy"] - ACCURACY_SLACK
    kept = [s for s in means if means[s][name]["class_accuracy"] >= floor]
    return min(kept, key=lambda s: means[s][name]["fd_classifier"]) if kept else None


def main(argv=None):
    p = ArgumentParser(prog="posthoc_demo.py", description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=positive_int, nargs="+", default=[600, 1200],
                   help="training lengths measured, from one run (global batch 128, 2 processes)")
    p.add_argument("--posthoc-every", type=positive_int, default=50, help="snapshot spacing in steps")
    p.add_argument("--sigma-rel", type=sigma_rel_flag, nargs="+", default=list(SWEEP), help="the widths swept")
    p.add_argument("--seeds", type=seed, nargs="+", default=[0, 1], help="one sampling run per seed")
    p.add_argument("--samples", type=positive_int, default=1000, help="samples per measurement")
    p.add_argument("--workers", type=positive_int, default=2, help="measurements at a time (one process each)")
    p.add_argument("--out", default="results/posthoc_demo")
    args = p.parse_args(argv)
    out = ROOT / args.out
    lengths = sorted(set(args.steps))
    bad = [n for n in lengths if n % args.posthoc_every]
    if bad:
        p.error(f"--steps {' '.join(map(str, bad))}: not a multiple of --posthoc-every {args.posthoc_every}, "
                "so there is no snapshot there; choose multiples of it")
    run = train(out, lengths, args.posthoc_every)
    ckpts = {}
    for n in lengths:
        subprocess.run([sys.executable, "-m", "udit.phema", str(run), "--sigma-rel", *map(str, args.sigma_rel),
                        "--step", str(n), "--batch", "16"], cwd=ROOT, check=True)
        ckpts[n] = {"fixed": str(run / "checkpoints" / f"{n:07d}.pt"),
                    **{f"{s:g}": str(run / "phema" / f"{n:07d}_sigma{s:g}.pt") for s in args.sigma_rel}}
    jobs = [(n, which, name, seed) for n in lengths for which in ckpts[n] for name in CONFIGS for seed in args.seeds]
    records = []
    with ProcessPoolExecutor(args.workers) as pool:
        for job, record in zip(jobs, pool.map(_measure, *zip(*[(ckpts[n][w], c, s, args.samples)
                                                                for n, w, c, s in jobs]))):
            records.append(record)
            print(f"[{len(records)}/{len(jobs)}] step {job[0]}, EMA {job[1]}, {job[2]}, seed {job[3]}: FD "
                  f"{record['fd_classifier']:.2f}, class accuracy {record['class_accuracy']:.3f}", flush=True)
    scores = {}
    for (n, which, name, _), record in zip(jobs, records):
        scores.setdefault(n, {}).setdefault(which, {}).setdefault(name, []).append(record)
    summary = {"steps": lengths, "posthoc_every": args.posthoc_every, "seeds": args.seeds,
               "samples": args.samples, "configs": {n: label(c) for n, c in CONFIGS.items()},
               "real_vs_real": demo.DigitScorer.default().real_vs_real, "runs": {}}
    for n in lengths:
        means = {which: {name: {metric: float(np.mean([r[metric] for r in rs]))
                                for metric in ("fd_classifier", "class_accuracy")} | {"nfe": rs[0]["nfe"]}
                         for name, rs in by_name.items()} for which, by_name in scores[n].items()}
        summary["runs"][str(n)] = {"fixed": means.pop("fixed"), "posthoc": means,
                                   "weight_distance_to_fixed": distance_to_fixed(ckpts[n])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "sweep.png")
    for n, result in summary["runs"].items():
        print_table(n, result, summary)
    print(f"plot: {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
