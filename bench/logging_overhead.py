"""What watching a run costs: U-DiT-S training with and without TensorBoard, side by side.

    python bench/logging_overhead.py [--steps 8] [--rounds 3] [--batch 8] [--json out.json]

Runs the real training loop (udit/trainer.py, one process, fp32) on U-DiT-S at 256 px
(32 x 32 x 4 latents from a random feature folder), alternating runs with TensorBoard
and with --no-tensorboard in one process, every step logged (--log-every 1, the worst
case; the default logs every 100th). Per run it records, at each log step, the time
since the previous one (a whole step, logging included), the time of the logging hook
and of the gradient norm the log prints (both runs compute it); grids and evaluations
are off (their cost is per call, see README). It prints the medians and the overhead of
TensorBoard as a share of the step time.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import udit.monitor  # noqa: E402
from udit.trainer import DDPBackend, parse_training_args, train, training_parser  # noqa: E402
from udit.cli import ArgumentParser, output_file, positive_int  # noqa: E402


def write_features(root, count, seed=0):
    """A fast-DiT feature folder of random 32 x 32 x 4 latents with 1,000 classes."""
    rng = np.random.default_rng(seed)
    (root / "imagenet256_features").mkdir(parents=True)
    (root / "imagenet256_labels").mkdir()
    for i in range(count):
        np.save(root / "imagenet256_features" / f"{i}.npy", rng.normal(size=(1, 4, 32, 32)).astype(np.float32))
        np.save(root / "imagenet256_labels" / f"{i}.npy", np.array([i % 1000]))
    return root


class Timings:
    """Wraps Monitor.log and DDPBackend.clip_grad_norm: when each log call starts, how long each call takes."""

    def __init__(self):
        self.starts, self.hooks, self.norms = [], [], []
        log, norm = udit.monitor.Monitor.log, DDPBackend.clip_grad_norm

        def timed_log(monitor, step, values):
            start = time.perf_counter()
            log(monitor, step, values)
            self.starts.append(start)
            self.hooks.append(time.perf_counter() - start)

        def timed_norm(backend, parameters, max_norm=None):
            start = time.perf_counter()
            value = norm(backend, parameters, max_norm).item()
            self.norms.append(time.perf_counter() - start)
            return torch.tensor(value)
        udit.monitor.Monitor.log, DDPBackend.clip_grad_norm = timed_log, timed_norm

    def take(self):
        """Step, hook and norm times since the last take; the first two steps (warm-up) are dropped."""
        steps = [b - a for a, b in zip(self.starts[1:], self.starts[2:])]
        taken = steps, self.hooks[2:], self.norms[2:]
        self.starts, self.hooks, self.norms = [], [], []
        return taken


def build_parser():
    p = ArgumentParser(prog="logging_overhead.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--steps", type=positive_int, default=8, help="training steps per run")
    p.add_argument("--rounds", type=positive_int, default=3, help="runs of each kind, alternating")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--json", type=output_file, help="also write the figures here")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    torch.manual_seed(0)
    timings = Timings()
    results = {kind: {"step": [], "hook": [], "grad_norm": []} for kind in ("tensorboard", "no_tensorboard")}
    with tempfile.TemporaryDirectory() as tmp:
        features = write_features(Path(tmp) / "features", args.batch * 2)
        for round_ in range(args.rounds):
            for kind in ("tensorboard", "no_tensorboard"):
                parser = training_parser("bench")
                run_args = parse_training_args(parser, [
                    "--feature-path", str(features), "--model", "U-DiT-S", "--global-batch-size", str(args.batch),
                    "--max-steps", str(args.steps), "--log-every", "1", "--ckpt-every", "1000000",
                    "--sample-every", "0", "--num-workers", "0", "--results-dir", str(Path(tmp) / "results"),
                    *(["--no-tensorboard"] if kind == "no_tensorboard" else [])])
                train(run_args, DDPBackend("fp32"))
                for what, values in zip(("step", "hook", "grad_norm"), timings.take()):
                    results[kind][what] += values
                last = {what: statistics.median(values[-(args.steps - 2):]) for what, values in results[kind].items()}
                print(f"round {round_ + 1}, {kind}: step {last['step']:.3f} s, logging hook "
                      f"{1e3 * last['hook']:.2f} ms, gradient norm {1e3 * last['grad_norm']:.1f} ms", flush=True)
    summary = {kind: {what: statistics.median(values) for what, values in r.items()} for kind, r in results.items()}
    on, off = summary["tensorboard"], summary["no_tensorboard"]
    summary["hook_share_of_step"] = (on["hook"] - off["hook"]) / off["step"]
    summary["step_ratio"] = on["step"] / off["step"]
    summary["settings"] = {"model": "U-DiT-S", "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"\nmedian step, every step logged: {on['step']:.3f} s with TensorBoard, {off['step']:.3f} s without "
          f"(ratio {summary['step_ratio']:.4f})")
    print(f"logging hook: {1e3 * on['hook']:.2f} ms with TensorBoard, {1e3 * off['hook']:.3f} ms without: "
          f"{summary['hook_share_of_step']:.3%} of a step (every step logged), "
          f"{summary['hook_share_of_step'] / 100:.5%} at the default --log-every 100")
    norm_share = summary["grad_norm_share_of_step"] = off["grad_norm"] / off["step"]
    print(f"gradient norm (both runs, at log steps): {1e3 * off['grad_norm']:.1f} ms: {norm_share:.2%} of a step "
          f"(every step logged), {norm_share / 100:.4%} at --log-every 100")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
