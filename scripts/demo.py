"""The whole pipeline on a small real dataset, on CPU: train, sample, score (`make demo`).

Data: the 8x8 handwritten digits that ship with scikit-learn (1,797 images, 10 classes),
written once as an ImageFolder; 297 are held out for scoring. The real scripts run:
`torchrun --nproc_per_node=2 train.py` in pixel space, `sample_ddp.py`, `sample.py`
for a grid with one row per class. Scoring uses a classifier trained on the real
digits: the share of generated samples it assigns to the requested class, and a
Frechet distance in its hidden-layer feature space against the held-out digits.

    python scripts/demo.py [--minutes 8] [--out results/demo]
    python scripts/demo.py --minutes 60 --steps 1830 --save-every 250   # a fixed step count, every checkpoint kept
    python scripts/demo.py --score results/demo/checkpoint.pt --out results/demo_rescored
"""

import argparse
import json
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

HELD_OUT = 297
MODEL_KWARGS = {"hidden_size": 24, "num_heads": 2, "depth": [1, 1, 2, 1, 1], "down_factor": [2, 2, 1, 2, 2]}
TRAIN_FLAGS = ["--model", "U-DiT-S", "--model-kwargs", json.dumps(MODEL_KWARGS), "--vae", "none",
               "--image-size", "8", "--num-classes", "10", "--global-batch-size", "128", "--lr", "1e-3",
               "--ema-decay", "0.999", "--ema-warmup", "--no-flip", "--num-workers", "0", "--log-every", "250",
               "--max-steps", "1000000", "--global-seed", "0"]
SAMPLE_FLAGS = ["--num-sampling-steps", "100", "--cfg-scale", "4.0"]


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


def train_classifier(features, labels):
    from sklearn.neural_network import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=0)
    return clf.fit(features, labels)


def hidden_features(clf, features):
    """Activations of the classifier's hidden layer (ReLU), the space for the Frechet distance."""
    return np.maximum(features @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


class DigitScorer:
    """Scores generated digits: a classifier trained on the real training digits, and the held-out digits.

    score(images, labels): images uint8 (N, 8, 8, 3) or (N, 8, 8), labels (N,) the
    requested classes -> {"class_accuracy": share assigned to the requested class,
    "fd_classifier": Frechet distance to the held-out digits in the classifier's hidden
    features, "samples": N}. real_vs_real: that distance between 297 training and the
    held-out digits (the floor); real_accuracy: the classifier's held-out accuracy.
    """

    def __init__(self, train_x, train_y, held_x, held_y):
        self.clf = train_classifier(to_features(train_x), train_y)
        held = to_features(held_x)
        self.held_stats = compute_statistics(hidden_features(self.clf, held))
        self.real_vs_real = frechet_distance(
            *compute_statistics(hidden_features(self.clf, to_features(train_x[:HELD_OUT]))), *self.held_stats)
        self.real_accuracy = float(self.clf.score(held, held_y))

    @classmethod
    def default(cls):
        """The scorer of `make demo`: the fixed split of scikit-learn's digits."""
        (train_x, train_y), (held_x, held_y) = split(*digits())
        return cls(train_x, train_y, held_x, held_y)

    def score(self, images, labels):
        features = to_features(images)
        return {"class_accuracy": float((self.clf.predict(features) == np.asarray(labels)).mean()),
                "fd_classifier": frechet_distance(*compute_statistics(hidden_features(self.clf, features)),
                                                  *self.held_stats),
                "samples": int(len(images))}


def run(cmd, log):
    """Run a pipeline stage, keep its whole output in `log`, show its progress lines as they come."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            f.write(line)
            if any(key in line for key in ("Train Loss", "sampling ", "wrote", "error")):
                print("  " + line.rstrip().split("] ")[-1].split("\r")[-1], flush=True)
        proc.wait()
    if proc.returncode:
        sys.exit(f"demo: step failed (exit {proc.returncode}); see {log}")


def sample_and_score(ckpt, out, samples, train_x, train_y, held_x, held_y, log, times):
    """Stages 2-4 for a checkpoint: samples with sample_ddp.py, a grid with sample.py, the scores."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    t0 = time.time()
    print(f"[2/4] sampling {samples} digits with sample_ddp.py (2 processes)")
    shutil.rmtree(out / "samples", ignore_errors=True)
    run([*torchrun, "sample_ddp.py", "--ckpt", ckpt, "--num-fid-samples", samples,
         "--per-proc-batch-size", "250", "--sample-dir", out / "samples", *SAMPLE_FLAGS], log)
    shutil.copy(next((out / "samples").glob("*.npz")), out / "samples.npz")
    times["sample_s"] = time.time() - t0

    t0 = time.time()
    print("[3/4] a grid with one row per class (sample.py)")
    labels = [c for c in range(10) for _ in range(10)]
    run([sys.executable, "sample.py", "--ckpt", ckpt, "--class-labels", *labels, "--nrow", "10",
         "--output", out / "grid_8px.png", *SAMPLE_FLAGS], log)
    grid = Image.open(out / "grid_8px.png")
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(out / "grid.png")
    times["grid_s"] = time.time() - t0

    t0 = time.time()
    print("[4/4] scoring with a classifier trained on the real digits")
    scorer = DigitScorer(train_x, train_y, held_x, held_y)
    with np.load(out / "samples.npz", allow_pickle=False) as data_npz:
        summary = scorer.score(data_npz["arr_0"], data_npz["arr_1"])
    summary.update({
        "fd_classifier_real_vs_real": scorer.real_vs_real,
        "real_accuracy": scorer.real_accuracy,
        "training_steps": int(load_checkpoint(ckpt)["step"]),
    })
    times["score_s"] = time.time() - t0
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget (the knob for a longer run)")
    p.add_argument("--steps", type=int, help="stop training after this many steps instead (reproducible whatever "
                                             "the machine's load; the time budget still applies)")
    p.add_argument("--samples", type=int, default=1000, help="generated samples to score")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--save-every", type=int, default=1_000_000, help="also keep a checkpoint every N steps")
    p.add_argument("--score", metavar="CKPT", help="skip training: sample and score this checkpoint")
    args = p.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    times = {}

    t0 = time.time()
    (train_x, train_y), (held_x, held_y) = split(*digits())
    data = write_image_folder(train_x, train_y, ROOT / "results" / "digits_train")
    times["data_s"] = time.time() - t0

    if args.score:
        ckpt = Path(args.score).resolve()
    else:
        t0 = time.time()
        shutil.rmtree(out / "train", ignore_errors=True)
        print(f"[1/4] training a pixel-space U-DiT on {len(train_x)} digits for {args.minutes} minutes "
              f"(train.py, 2 processes)")
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
             "--data-path", data, "--results-dir", out / "train", "--max-minutes", args.minutes,
             *TRAIN_FLAGS, "--ckpt-every", args.save_every, *(["--max-steps", args.steps] if args.steps else [])],
            log)
        last = sorted((out / "train").glob("*/checkpoints/*.pt"))[-1]
        ckpt = out / "checkpoint.pt"
        shutil.copy(last, ckpt)
        shutil.copy(last.parents[1] / "log.txt", out / "train_log.txt")
        times["train_s"] = time.time() - t0

    summary = sample_and_score(ckpt, out, args.samples, train_x, train_y, held_x, held_y, log, times)
    summary["minutes_budget"] = None if args.score else args.minutes
    summary["wall_seconds"] = {k: round(v, 1) for k, v in times.items()}
    summary["wall_seconds"]["total_s"] = round(sum(times.values()), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nclass accuracy of generated digits: {summary['class_accuracy']:.3f} "
          f"(the classifier gets {summary['real_accuracy']:.3f} on held-out real digits)")
    print(f"Frechet distance in classifier features: {summary['fd_classifier']:.2f} "
          f"(real vs real: {summary['fd_classifier_real_vs_real']:.2f})")
    print(f"{summary['training_steps']} training steps; wall time {summary['wall_seconds']['total_s'] / 60:.1f} min")
    print(f"outputs in {out}: grid.png, samples.npz, checkpoint.pt, train_log.txt, summary.json")
    return 0



if __name__ == "__main__":
    sys.exit(main())
