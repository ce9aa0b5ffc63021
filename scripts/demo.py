"""The whole pipeline on a small real dataset, on CPU: train, sample, score (`make demo`).

Data: the 8x8 handwritten digits that ship with scikit-learn (1,797 images, 10 classes),
written once as an ImageFolder; 297 are held out for scoring. The real scripts run:
`torchrun --nproc_per_node=2 train.py` in pixel space, `sample_ddp.py`, `sample.py`
for a grid with one row per class, both with the README's recommended sampler for the
objective (a second set of samples with the objective's reference sampler is scored
beside them). Scoring uses a classifier trained on the real
digits: the share of generated samples it assigns to the requested class, and a
Frechet distance in its hidden-layer feature space against the held-out digits. The
same scorer evaluates the run while it trains (train.py --eval-command runs this script
with --fd), and curves.png plots the loss and that distance against the steps.

    python scripts/demo.py [--minutes 8] [--out results/demo]
    python scripts/demo.py --objective flow            # flow matching (out: results/demo_flow)
    python scripts/demo.py --objective flow --alignment u-repa   # with U-REPA (results/demo_flow_u-repa)
    python scripts/demo.py --minutes 60 --steps 1830 --save-every 250   # a fixed step count, every checkpoint kept
    python scripts/demo.py --score results/demo/checkpoint.pt --out results/demo_rescored
    python scripts/demo.py --fd SAMPLES.npz --json METRICS.json [--out results/demo]   # the scorer alone
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluator import compute_statistics, frechet_distance  # noqa: E402
from udit.checkpoint import load_checkpoint  # noqa: E402
from udit.cli import (ArgumentParser, non_negative_int, number, output_dir, output_file, positive_float,  # noqa: E402
                      positive_int, seed)
from udit.monitor import read_scalars  # noqa: E402

HELD_OUT = 297
MODEL_KWARGS = {"hidden_size": 24, "num_heads": 2, "depth": [1, 1, 2, 1, 1], "down_factor": [2, 2, 1, 2, 2]}
TRAIN_FLAGS = ["--model", "U-DiT-S", "--model-kwargs", json.dumps(MODEL_KWARGS), "--vae", "none",
               "--image-size", "8", "--num-classes", "10", "--global-batch-size", "128", "--lr", "1e-3",
               "--ema-decay", "0.999", "--ema-warmup", "--no-flip", "--num-workers", "0", "--log-every", "50",
               "--max-steps", "1000000", "--global-seed", "0", "--sample-every", "250",
               "--sample-classes", *map(str, range(10))]
CFG_SCALE = 4.0
# The end samples, cfg 4: first the README's recommendation for the objective (*Sampling*,
# *Which to use*): for ddpm guidance at every step with a 20-NFE solver (held at 1,500
# steps; at 500 every row at <= 50 NFE lost classes, the intervals most), for flow the
# best at <= 50 NFE (held at 500 and 1,500 steps); then, as a second, labelled
# line, the objective's reference sampler at 100 steps (the paper's DDPM; SiT's SDE).
END_SAMPLERS = {
    "ddpm": {"recommended": ["--sampler", "dpm++2m-sde", "--num-sampling-steps", "10"],
             "reference": ["--sampler", "ddpm", "--num-sampling-steps", "100"]},
    "flow": {"recommended": ["--sampler", "flow-heun", "--num-sampling-steps", "10", "--time-shift", "3",
                             "--cfg-interval", "1", "2"],
             "reference": ["--sampler", "flow-sde", "--num-sampling-steps", "100"]},
}
# Evaluation while training: the final scorer, on fewer samples drawn with a deterministic
# sampler (DDIM; Euler for flow) at a quarter of the reference's steps.
EVAL_SAMPLES, EVAL_STEPS = 500, 25
EVAL_SAMPLERS = {"ddpm": "ddim", "flow": "flow-euler"}
# Training speed of `make demo` on the idle 2-core development machine (1,830 steps in its
# 8 minutes, README *Try it first*): what a user's steps/s is compared with.
IDLE_STEPS_PER_S = 3.8


# --alignment: against the digits encoder of scripts/digits_encoder.py (4 x 4 tokens, trained
# once without labels and cached with its training time). u-repa: U-REPA's middle stage (2 x 2,
# upsampled to 4 x 4) with the manifold loss; repa: REPA's recipe, per-token cosine only, at an
# early stage (the encoder half's 4 x 4 level).
ENCODER = "results/digits_encoder.pt"
ALIGNMENTS = {"u-repa": ["--repa", "--projector-width", "256"],
              "repa": ["--repa", "--projector-width", "256", "--align-stage", "encoder_level_2",
                       "--manifold-coeff", "0"]}


def digits_encoder(train_x, times):
    """(the cached encoder file, the seconds its training took), training it first if missing (then its
    time is also wall time of this run, in `times`)."""
    path = ROOT / ENCODER
    if not path.is_file():
        from digits_encoder import train_encoder
        t0 = time.time()
        print(f"[0/4] training the alignment encoder on {len(train_x)} digits without labels (masked patches)")
        path.parent.mkdir(parents=True, exist_ok=True)
        train_encoder(train_x, path.with_suffix(".tmp"))
        path.with_suffix(".json").write_text(json.dumps({"train_s": round(time.time() - t0, 1)}) + "\n")
        path.with_suffix(".tmp").rename(path)
        times["encoder_s"] = time.time() - t0
    return path, json.loads(path.with_suffix(".json").read_text())["train_s"]


def sample_flags(objective, which="recommended"):
    """sample.py / sample_ddp.py flags of an end sampler: which is "recommended" or "reference"."""
    return [*END_SAMPLERS[objective][which], "--cfg-scale", str(CFG_SCALE)]


def describe_sampler(objective, which="recommended"):
    """An end sampler as its label in the plot and summary: 'euler 20 steps --spacing trailing --cfg-interval 1 2'."""
    flags = END_SAMPLERS[objective][which]
    assert flags[0] == "--sampler" and flags[2] == "--num-sampling-steps"
    return " ".join([flags[1], flags[3], "steps", *flags[4:]])


def eval_flags(objective):
    return ["--eval-samples", str(EVAL_SAMPLES), "--eval-sampler", EVAL_SAMPLERS[objective],
            "--eval-sampling-steps", str(EVAL_STEPS), "--eval-cfg-scale", str(CFG_SCALE)]


def digits():
    """(images uint8 (N, 8, 8), labels (N,)) of scikit-learn's digits, pixel values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits
    data = load_digits()
    return np.clip(np.rint(data.images * (255 / 16)), 0, 255).astype(np.uint8), data.target.astype(np.int64)


def split(images, labels, seed=0):
    order = np.random.default_rng(seed).permutation(len(images))
    held, train = order[:HELD_OUT], order[HELD_OUT:]
    return (images[train], labels[train]), (images[held], labels[held])


def write_image_folder(images, labels, root):
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(folder / f"{i:04d}.png")
    tmp.rename(root)
    return root


def to_features(images_rgb_or_gray):
    """uint8 images (N, 8, 8[, 3]) -> (N, 64) floats in [0, 1] for the classifier."""
    arr = np.asarray(images_rgb_or_gray, dtype=np.float64)
    if arr.ndim == 4:
        arr = arr.mean(axis=-1)
    return arr.reshape(len(arr), -1) / 255.0


class Classifier:
    """A one-hidden-layer MLP (scikit-learn's) on the real digits; kept as its weights in an .npz."""

    def __init__(self, weights):
        self.w1, self.b1, self.w2, self.b2 = (weights[k] for k in ("w1", "b1", "w2", "b2"))

    @classmethod
    def train(cls, features, labels):
        from sklearn.neural_network import MLPClassifier
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=0).fit(features, labels)
        assert list(clf.classes_) == list(range(10))
        return cls({"w1": clf.coefs_[0], "b1": clf.intercepts_[0], "w2": clf.coefs_[1], "b2": clf.intercepts_[1]})

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as weights:
            return cls(dict(weights))

    def save(self, path):
        np.savez(path, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)

    def hidden(self, features):
        """Activations of the hidden layer (ReLU), the space for the Frechet distance."""
        return np.maximum(features @ self.w1 + self.b1, 0.0)

    def predict(self, features):
        return np.argmax(self.hidden(features) @ self.w2 + self.b2, axis=1)


def fd_to_held_out(clf, images, held_x):
    """Frechet distance between images and the held-out digits in the classifier's hidden features."""
    return frechet_distance(*compute_statistics(clf.hidden(to_features(images))),
                            *compute_statistics(clf.hidden(to_features(held_x))))


def score_samples(clf, npz, held_x):
    """{"fd_classifier", "class_accuracy"} of an .npz of samples (arr_0 images, arr_1 requested labels)."""
    with np.load(npz, allow_pickle=False) as data:
        images, labels = data["arr_0"], data["arr_1"]
    return {"fd_classifier": fd_to_held_out(clf, images, held_x),
            "class_accuracy": float((clf.predict(to_features(images)) == labels).mean())}


class DigitScorer:
    """Scores generated digits: a classifier trained on the real training digits, and the held-out digits.

    score(images, labels): images uint8 (N, 8, 8, 3) or (N, 8, 8), labels (N,) the
    requested classes -> {"class_accuracy": share assigned to the requested class,
    "fd_classifier": Frechet distance to the held-out digits in the classifier's hidden
    features, "samples": N}. real_vs_real: that distance between 297 training and the
    held-out digits (the floor); real_accuracy: the classifier's held-out accuracy.
    """

    def __init__(self, train_x, train_y, held_x, held_y):
        self.clf = Classifier.train(to_features(train_x), train_y)
        self.held_x = held_x
        self.real_vs_real = fd_to_held_out(self.clf, train_x[:HELD_OUT], held_x)
        self.real_accuracy = float((self.clf.predict(to_features(held_x)) == held_y).mean())

    @classmethod
    def default(cls):
        """The scorer of `make demo`: the fixed split of scikit-learn's digits."""
        (train_x, train_y), (held_x, held_y) = split(*digits())
        return cls(train_x, train_y, held_x, held_y)

    def score(self, images, labels):
        return {"class_accuracy": float((self.clf.predict(to_features(images)) == np.asarray(labels)).mean()),
                "fd_classifier": fd_to_held_out(self.clf, images, self.held_x), "samples": int(len(images))}


def run(cmd, log):
    """Run a pipeline stage, keep its whole output in `log`, show its progress lines as they come."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            f.write(line)
            if any(key in line for key in ("Train Loss", "evaluation at", "sampling ", "wrote", "error")):
                print("  " + line.rstrip().split("] ")[-1].split("\r")[-1], flush=True)
        proc.wait()
    if proc.returncode:
        sys.exit(f"demo: step failed (exit {proc.returncode}); see {log}")


def sample_and_score(ckpt, out, samples, clf, train_x, held_x, held_y, log, times):
    """Stages 2-4 for a checkpoint: samples of both end samplers with sample_ddp.py, a grid, the scores.

    Returns the summary: the recommended sampler's scores at the top level (class_accuracy,
    fd_classifier, sampler, nfe_per_image; its samples in samples.npz, its grid in
    grid.png), the reference sampler's under "reference" (samples_reference.npz).
    """
    objective = load_checkpoint(ckpt)["args"].get("objective", "ddpm")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    t0 = time.time()
    scores = {}
    for which, name in (("recommended", "samples"), ("reference", "samples_reference")):
        print(f"[2/4] sampling {samples} digits with sample_ddp.py (2 processes), the {which} sampler: "
              f"{describe_sampler(objective, which)}")
        shutil.rmtree(out / name, ignore_errors=True)
        run([*torchrun, "sample_ddp.py", "--ckpt", ckpt, "--num-fid-samples", samples,
             "--per-proc-batch-size", "250", "--sample-dir", out / name, *sample_flags(objective, which)], log)
        npz = next((out / name).glob("*.npz"))
        shutil.copy(npz, out / f"{name}.npz")
        scores[which] = {**score_samples(clf, out / f"{name}.npz", held_x), "sampler": describe_sampler(objective, which),
                         "nfe_per_image": json.loads(npz.with_suffix(".json").read_text())["nfe_per_image"]}
    times["sample_s"] = time.time() - t0

    t0 = time.time()
    print("[3/4] a grid with one row per class (sample.py), the recommended sampler")
    labels = [c for c in range(10) for _ in range(10)]
    run([sys.executable, "sample.py", "--ckpt", ckpt, "--class-labels", *labels, "--nrow", "10",
         "--output", out / "grid_8px.png", *sample_flags(objective)], log)
    grid = Image.open(out / "grid_8px.png")
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(out / "grid.png")
    times["grid_s"] = time.time() - t0

    t0 = time.time()
    print("[4/4] scoring with the classifier trained on the real digits")
    summary = {
        **scores["recommended"],
        "reference": scores["reference"],
        "fd_classifier_real_vs_real": fd_to_held_out(clf, train_x[:HELD_OUT], held_x),
        "real_accuracy": float((clf.predict(to_features(held_x)) == held_y).mean()),
        "samples": samples,
        "objective": objective,
        "training_steps": int(load_checkpoint(ckpt)["step"]),
    }
    times["score_s"] = time.time() - t0
    return summary


def training_speed(exp_dir, train_s, load_before):
    """How fast this machine trained: {"steps_per_s" (median of the logged rates), "minutes", "idle_steps_per_s",
    "cpus", "load_average_before"}; load_before: the 1-minute load average before training started."""
    rates = [value for _, value in read_scalars(exp_dir / "tensorboard").get("train/steps_per_sec", [])]
    return {"steps_per_s": round(float(np.median(rates)), 2) if rates else None, "minutes": round(train_s / 60, 1),
            "idle_steps_per_s": IDLE_STEPS_PER_S, "cpus": os.cpu_count(), "load_average_before": round(load_before, 1)}


def summary_lines(summary):
    """The printed summary: the recommended end sampler's scores, the reference's, the training speed."""
    ref = summary["reference"]
    lines = [f"end samples, the README's recommended sampler for {summary['objective']} ({summary['sampler']}; "
             f"{summary['nfe_per_image']} network evaluations per image): class accuracy {summary['class_accuracy']:.3f}, "
             f"FD {summary['fd_classifier']:.2f}",
             f"  reference sampler ({ref['sampler']}; {ref['nfe_per_image']} network evaluations per image): "
             f"class accuracy {ref['class_accuracy']:.3f}, FD {ref['fd_classifier']:.2f}",
             f"  (FD in classifier features, real vs real: {summary['fd_classifier_real_vs_real']:.2f}; the classifier "
             f"gets {summary['real_accuracy']:.3f} on held-out real digits)"]
    speed = summary.get("training")
    if speed:
        text = (f"{summary['training_steps']:,} training steps in {speed['minutes']:.1f} min")
        if speed["steps_per_s"]:
            text += (f" at {speed['steps_per_s']:.2f} steps/s (the idle 2-core development machine: "
                     f"~{speed['idle_steps_per_s']:.1f} steps/s, ~{round(speed['idle_steps_per_s'] * 480, -2):,.0f} steps in the "
                     f"default 8 min)")
        text += f"; load average {speed['load_average_before']:.1f} on {speed['cpus']} CPUs before training"
        lines.append(text)
        if speed["steps_per_s"] and speed["steps_per_s"] < 0.7 * speed["idle_steps_per_s"]:
            lines.append(f"  this machine trained at {speed['steps_per_s'] / speed['idle_steps_per_s']:.0%} of that "
                         f"speed: fewer steps give a weaker model and higher FDs than the README's (--steps N or "
                         f"--minutes M trains longer)")
    return lines


def plot_curves(exp_dir, summary, path):
    """Training loss and FD in classifier features against steps (matplotlib), from the run's TensorBoard events.

    The end points are each labelled with their sampler: the evaluations during training use
    another (cheaper) one, so the end is not a point of that curve.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scalars = read_scalars(exp_dir / "tensorboard")
    fig, (ax_loss, ax_fd) = plt.subplots(1, 2, figsize=(10, 4.6))
    ax_loss.plot(*zip(*scalars["train/loss"]), color="C0")
    ax_loss.set(xlabel="training step", yscale="log",
                ylabel="training loss (mse + vb)" if summary["objective"] == "ddpm" else "training loss (velocity mse)",
                title="loss (mean of each log interval, both processes)")
    if "eval/fd_classifier" in scalars:
        ax_fd.plot(*zip(*scalars["eval/fd_classifier"]), marker="o", color="C0",
                   label=f"during training: {EVAL_SAMPLES:,} samples, {EVAL_SAMPLERS[summary['objective']]} "
                         f"{EVAL_STEPS} steps")
    for scores, marker, color, which in ((summary, "*", "C3", "end, recommended"),
                                         (summary["reference"], "X", "C1", "end, reference")):
        ax_fd.plot([summary["training_steps"]], [scores["fd_classifier"]], marker=marker, markersize=12, color=color,
                   linestyle="none", label=f"{which}: {scores['sampler']} ({scores['nfe_per_image']} NFE), "
                                           f"{summary['samples']:,} samples")
    ax_fd.axhline(summary["fd_classifier_real_vs_real"], linestyle="--", color="gray", label="real vs real")
    ax_fd.set(xlabel="training step", ylabel="FD in classifier features", yscale="log",
              title="FD to held-out digits (cfg 4)")
    for ax in (ax_loss, ax_fd):
        ax.grid(alpha=0.3, which="both")
    # Below both panels: the end points' labels name their samplers in full.
    fig.legend(*ax_fd.get_legend_handles_labels(), loc="lower center", fontsize=8)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = ArgumentParser(prog="demo.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--minutes", type=positive_float, default=8.0,
                   help="training time budget (the knob for a longer run)")
    p.add_argument("--steps", type=positive_int,
                   help="stop training after this many steps instead (reproducible whatever "
                        "the machine's load; the time budget still applies)")
    p.add_argument("--samples", type=number(int, min=2), default=1000,
                   help="generated samples to score (a Frechet distance needs 2 or more)")
    p.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm",
                   help="ddpm: the paper's epsilon prediction; flow: velocity on the linear interpolant")
    p.add_argument("--alignment", choices=list(ALIGNMENTS),
                   help="train with representation alignment against a small digits encoder trained first")
    p.add_argument("--out", help="default: results/demo, results/demo_flow for --objective flow (+ _ALIGNMENT)")
    p.add_argument("--seed", type=seed, default=0, help="the training run's seed (train.py --global-seed)")
    p.add_argument("--save-every", type=positive_int, default=1_000_000, help="also keep a checkpoint every N steps")
    p.add_argument("--score", metavar="CKPT", help="skip training: sample and score this checkpoint")
    p.add_argument("--eval-every", type=non_negative_int, default=300,
                   help="score the run every N steps while it trains (0: never)")
    p.add_argument("--fd", metavar="SAMPLES.npz",
                   help="only score these samples with the classifier of --out (what train.py runs while training)")
    p.add_argument("--json", metavar="METRICS.json", type=output_file, help="with --fd: write the metrics here")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    default_out = ("results/demo" + ("" if args.objective == "ddpm" else f"_{args.objective}")
                   + (f"_{args.alignment}" if args.alignment else ""))
    out = ROOT / (args.out or default_out)
    try:
        output_dir(str(out))  # --out is relative to the repository, not to the working directory
    except argparse.ArgumentTypeError as err:
        p.error(f"argument --out: {err}")
    (train_x, train_y), (held_x, held_y) = split(*digits())
    if args.fd:
        metrics = score_samples(Classifier.load(out / "classifier.npz"), args.fd, held_x)
        if args.json:
            Path(args.json).write_text(json.dumps(metrics) + "\n")
        else:
            print(json.dumps(metrics))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    times = {}

    t0 = time.time()
    data = write_image_folder(train_x, train_y, ROOT / "results" / "digits_train")
    times["data_s"] = time.time() - t0
    t0 = time.time()
    clf = Classifier.train(to_features(train_x), train_y)
    clf.save(out / "classifier.npz")
    times["classifier_s"] = time.time() - t0

    if args.score:
        ckpt = Path(args.score).resolve()
    else:
        load_before = os.getloadavg()[0]
        t0 = time.time()
        shutil.rmtree(out / "train", ignore_errors=True)
        with_alignment = f" and {args.alignment}" if args.alignment else ""
        print(f"[1/4] training a pixel-space U-DiT with --objective {args.objective}{with_alignment} "
              f"on {len(train_x)} digits for "
              f"{args.minutes} minutes (train.py, 2 processes), scored every {args.eval_every} steps")
        scorer = " ".join(shlex.quote(str(a)) for a in (sys.executable, Path(__file__).resolve(), "--out", out, "--fd"))
        evaluation = (["--eval-every", args.eval_every, "--eval-command", scorer, *eval_flags(args.objective)]
                      if args.eval_every else [])
        alignment, encoder_s = [], None
        if args.alignment:
            encoder, encoder_s = digits_encoder(train_x, times)
            alignment = [*ALIGNMENTS[args.alignment], "--encoder", encoder]
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
             "--data-path", data, "--results-dir", out / "train", "--max-minutes", args.minutes,
             *TRAIN_FLAGS, "--global-seed", args.seed, "--objective", args.objective, *alignment, *evaluation,
             "--ckpt-every", args.save_every,
             *(["--max-steps", args.steps] if args.steps else [])], log)
        last = sorted((out / "train").glob("*/checkpoints/*.pt"))[-1]
        ckpt = out / "checkpoint.pt"
        shutil.copy(last, ckpt)
        shutil.copy(last.parents[1] / "log.txt", out / "train_log.txt")
        times["train_s"] = time.time() - t0

    summary = sample_and_score(ckpt, out, args.samples, clf, train_x, held_x, held_y, log, times)
    summary["training"] = None if args.score else training_speed(last.parents[1], times["train_s"], load_before)
    if not args.score:
        plot_curves(last.parents[1], summary, out / "curves.png")
    summary["minutes_budget"] = None if args.score else args.minutes
    summary["alignment"] = args.alignment
    if args.alignment and not args.score:
        summary["encoder_train_s"] = encoder_s  # spent once, before this run or in it
    summary["wall_seconds"] = {k: round(v, 1) for k, v in times.items()}
    summary["wall_seconds"]["total_s"] = round(sum(times.values()), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n" + "\n".join(summary_lines(summary)))
    print(f"wall time {summary['wall_seconds']['total_s'] / 60:.1f} min; outputs in {out}: grid.png, curves.png, "
          f"samples.npz, samples_reference.npz, checkpoint.pt, train_log.txt, summary.json "
          f"(TensorBoard: tensorboard --logdir {out / 'train'})")
    return 0



if __name__ == "__main__":
    sys.exit(main())
