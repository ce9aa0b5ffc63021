"""Watching a run while it trains: TensorBoard, fixed-seed sample grids, evaluation during training.

Nothing here changes what training computes: it reads the EMA weights, draws its noise
from generators seeded by (seed, image index) (never from the global random stream that
exact resume restores) and only rank 0 writes. The training loop (udit/trainer.py) calls
`log` at every log step, `after_step` after every step's checkpoint and `close` at the
end. What appears in the experiment folder:

    tensorboard/          event files: `tensorboard --logdir results`
    samples/NNNNNNN.png   a grid from the EMA model: fixed classes, fixed noise, DDIM (50 steps), cfg 4
                          (unguided for a model without a null label: --class-dropout-prob 0)
    eval/NNNNNNN.json     the metrics of the samples drawn at that step (eval/NNNNNNN.log: the scorer's output)
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from udit.cli import ActionableError, non_negative_int, number, positive_int
from udit.distributed import all_reduce_mean
from udit.sampling import (batches_of_rank, default_labels, generate, has_null_label, image_grid, labels_for,
                           save_png_atomic, write_npz_streaming)
from udit.samplers import SAMPLERS, Guidance, make_sampler, samplers_for
from udit.vae import load_vae, to_uint8

ROOT = Path(__file__).resolve().parents[1]
# Grids and (by default) evaluations use each objective's deterministic 50-step sampler.
MONITOR_SAMPLERS = {"ddpm": "ddim", "flow": "flow-euler"}
GRID_CFG_SCALE = 4.0  # DiT's guidance scale for pictures, for models with a null label

# Flags that change only what is watched: --resume may change them.
MONITOR_SETTINGS = ("no_tensorboard", "sample_every", "sample_classes", "sample_steps", "eval_every", "eval_samples",
                    "eval_ref", "inception_graph", "eval_command", "eval_sampler", "eval_sampling_steps",
                    "eval_cfg_scale")


#################################################################################
#                                 Arguments                                     #
#################################################################################

def add_monitor_args(p):
    g = p.add_argument_group("watching the run")
    g.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    g.add_argument("--sample-every", type=non_negative_int, default=10_000,
                   help="a fixed-seed grid from the EMA model every N steps and at the end (samples/NNNNNNN.png); "
                        "0: none")
    g.add_argument("--sample-classes", type=non_negative_int, nargs="+",
                   help="class labels of the grid (default: DiT's 8 ImageNet classes, else the first 8 trained)")
    g.add_argument("--sample-steps", type=positive_int, default=50,
                   help="steps of the grid's sampler (cfg 4; 1 with --class-dropout-prob 0): ddim, or flow-euler "
                        "for --objective flow")
    g.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate the EMA model every N steps (default 0: never; see README, Training)")
    # evaluator.py's minimum: precision and recall use each image's 3rd nearest neighbour among the others.
    g.add_argument("--eval-samples", type=number(int, min=4), default=10_000, help="images per evaluation")
    g.add_argument("--eval-ref", metavar="REF.npz",
                   help="reference batch for evaluator.py, e.g. VIRTUAL_imagenet256_labeled.npz")
    g.add_argument("--inception-graph", metavar="PATH", help="as evaluator.py's --inception-graph")
    g.add_argument("--eval-command",
                   help="score with this command instead of evaluator.py: it is run with SAMPLES.npz --json "
                        "METRICS.json appended and writes a JSON object of numbers there")
    g.add_argument("--eval-sampler", choices=list(SAMPLERS),
                   help="a sampler of udit/samplers.py for the run's objective (README, Sampling); default: ddim, "
                        "flow-euler for --objective flow")
    g.add_argument("--eval-sampling-steps", type=positive_int,
                   help="default: the sampler's recommended count (ddim and flow-euler: 50)")
    g.add_argument("--eval-cfg-scale", type=number(float, min=1), default=1.0, help="1 = no guidance")


def check_monitor_args(parser, args):
    """Exit with status 2 and one line on a bad value (class labels are checked against the data: grid_labels)."""
    if args.eval_sampler is None:
        args.eval_sampler = MONITOR_SAMPLERS[args.objective]
    elif SAMPLERS[args.eval_sampler].objective != args.objective:
        parser.error(f"--eval-sampler {args.eval_sampler} samples --objective {SAMPLERS[args.eval_sampler].objective} "
                     f"models; this run trains --objective {args.objective}: use one of "
                     f"{', '.join(samplers_for(args.objective))}")
    for flag, sampler, steps in (("--sample-steps", MONITOR_SAMPLERS[args.objective], args.sample_steps),
                                 ("--eval-sampling-steps", args.eval_sampler, args.eval_sampling_steps)):
        try:
            make_sampler(sampler, steps)
        except ValueError as err:
            parser.error(f"{flag} {steps} with {sampler}: {err}")
    if args.eval_every and not (args.eval_ref or args.eval_command):
        parser.error("--eval-every needs --eval-ref REF.npz (the reference batch evaluator.py compares with) "
                     "or --eval-command")
    for flag in ("eval_ref", "inception_graph"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            parser.error(f"--{flag.replace('_', '-')} {value}: no such file")
    if args.eval_every and args.eval_cfg_scale != 1 and args.class_dropout_prob == 0:
        parser.error(f"--eval-cfg-scale {args.eval_cfg_scale:g} needs the null label that --class-dropout-prob 0 "
                     f"leaves out (classifier-free guidance); evaluate with --eval-cfg-scale 1, or train with "
                     f"--class-dropout-prob > 0")
    if args.eval_command is not None:
        try:
            if not shlex.split(args.eval_command):
                parser.error("--eval-command is empty")
        except ValueError as err:
            parser.error(f"--eval-command: {err}")


#################################################################################
#                                 TensorBoard                                   #
#################################################################################

def use_tensorboard_without_tensorflow():
    """Make tensorboard read and write event files with its own stub of TensorFlow's file API.

    tensorboard imports TensorFlow instead whenever it is installed (evaluator.py needs it):
    14 s and several hundred MB per process on a 2-core machine, and TensorFlow must not be
    loaded before triton (see tests/conftest.py). `tensorboard.compat.notf` is
    tensorboard's own switch for the stub; call this before the first tensorboard import.
    """
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def summary_writer(log_dir, start_step):
    """torch's SummaryWriter into log_dir, continuing a run that resumes after start_step.

    purge_step: when the events are read, everything a previous process logged after the
    checkpoint this run resumes from (start_step) is dropped, so the curves continue with
    neither duplicated nor missing steps.
    """
    use_tensorboard_without_tensorflow()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)


def read_scalars(log_dir, wall_time=False):
    """{tag: [(step, value), ...]} of every scalar in log_dir's event files, as TensorBoard shows them.

    wall_time: (step, value, seconds since the epoch when it was written) instead.
    """
    use_tensorboard_without_tensorflow()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value, e.wall_time) if wall_time else (e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


#################################################################################
#                                 The monitor                                   #
#################################################################################

def one_line(err):
    """'Type: first line of the message' of an exception."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def grid_columns(n):
    """Images per row of a near-square grid: 8 -> 4 x 2, 10 -> 4 x 3, 16 -> 4 x 4."""
    return math.ceil(n / max(1, math.isqrt(n)))


def grid_labels(args, config):
    """Class labels of the sample grids: --sample-classes, else the defaults for the classes the data holds.

    config: the model settings stored in checkpoints. ValueError names the labels the run
    does not train; train() calls this before the experiment folder exists.
    """
    trained = config["trained_labels"] or list(range(config["num_classes"]))
    labels = args.sample_classes or default_labels(trained)
    bad = [c for c in labels if c not in set(trained)]
    if bad:
        shown = ", ".join(map(str, trained[:8])) + (f", ... ({len(trained)} in all)" if len(trained) > 8 else "")
        raise ValueError(f"--sample-classes {bad}: not among the classes this run trains ({shown})")
    return labels


def is_number(value):
    """A metric value: an int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Monitor:
    """TensorBoard scalars, sample grids and evaluations of one training process.

    args: the training settings (see add_monitor_args); config: the model settings stored
    in checkpoints; vae: the loaded VAE or None (loaded here when latents must be decoded
    and training did not need it); batch_size: images per process and sampling batch;
    start_step: the step training starts (or resumes) from.
    """

    def __init__(self, args, exp_dir, config, rank, world_size, device, vae, batch_size, start_step, logger):
        self.args, self.exp_dir, self.rank, self.world_size, self.device = args, Path(exp_dir), rank, world_size, device
        self.vae, self.logger = vae, logger
        # Labels are drawn from the classes the data holds (all of them when unknown), as sample_ddp.py does.
        self.settings = {**config, "trained_labels": config["trained_labels"] or list(range(config["num_classes"]))}
        self.precision = "bf16" if getattr(args, "precision", "fp32") == "bf16" else "fp32"
        self.labels = grid_labels(args, config)
        self.grid_cfg_scale = GRID_CFG_SCALE if has_null_label(config) else 1.0
        self.evaluation = Evaluation(self, args, batch_size) if args.eval_every else None
        self.grids = args.sample_every > 0
        if config["vae"] != "none" and vae is None and (self.grids or self.evaluation):
            self._load_vae()
        self.writer = None
        if rank == 0:
            (self.exp_dir / "samples").mkdir(exist_ok=True)
            if not args.no_tensorboard:
                self.writer = summary_writer(self.exp_dir / "tensorboard", start_step)

    def _load_vae(self):
        """Feature-space training has no VAE; grids and evaluations need one to decode."""
        error = None
        try:
            self.vae = load_vae(self.settings["vae"], self.args.vae_path, self.device)
        except (ActionableError, ValueError, OSError) as err:  # VAEUnavailable: offline, no local copy
            error = err
        if all_reduce_mean(torch.tensor([float(error is not None)], device=self.device)).item() > 0:
            self.logger.info("sample grids and evaluation off: no VAE to decode latents (%s)",
                             error or "failed on another process")
            self.grids, self.evaluation = False, None

    # ------------------------------------------------------------ hooks

    def log(self, step, values):
        """Scalars of a log step ({name: float}, the all-reduced values the log prints) to TensorBoard."""
        if self.evaluation is not None:
            self.evaluation.collect()
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        if self.device.type == "cuda":
            self.writer.add_scalar("system/max_memory_allocated_gib",
                                   torch.cuda.max_memory_allocated(self.device) / 2**30, step)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.writer.flush()  # a crash loses nothing that was logged

    def after_step(self, step, ema):
        """The grid and the evaluation when they are due; returns the seconds they took."""
        start = time.time()
        if self.grids and step % self.args.sample_every == 0:
            self.sample_grid(step, ema)
        if self.evaluation is not None and step % self.args.eval_every == 0:
            self.evaluation.run(step, ema)
        return time.time() - start

    def close(self, step, ema):
        """The grid of the last step (unless it exists), the last evaluation's metrics; closes TensorBoard."""
        if self.grids and not (self.exp_dir / "samples" / f"{step:07d}.png").exists():
            self.sample_grid(step, ema)
        if self.evaluation is not None:
            self.evaluation.collect(wait=True)
        if self.writer is not None:
            self.writer.close()

    # ------------------------------------------------------------ grids

    def sample_grid(self, step, ema):
        """Rank 0: samples/{step:07d}.png and the TensorBoard image "samples". A failure is logged, not raised."""
        if self.rank != 0:
            return
        try:
            images, _ = generate(ema, self.vae, self.settings, self.args.global_seed, range(len(self.labels)),
                                 make_sampler(MONITOR_SAMPLERS[self.settings["objective"]], self.args.sample_steps),
                                 Guidance(scale=self.grid_cfg_scale),
                                 labels=self.labels, precision=self.precision)
            grid = image_grid(images, grid_columns(len(self.labels)))
            save_png_atomic(grid, self.exp_dir / "samples" / f"{step:07d}.png")
            if self.writer is not None:
                self.writer.add_image("samples", grid, step, dataformats="HWC")
                self.writer.flush()
        except Exception as err:  # a grid must never stop training
            self.logger.info("sample grid at step %d failed (%s); training goes on", step, one_line(err))


#################################################################################
#                           Evaluation during training                          #
#################################################################################

class Evaluation:
    """--eval-every: samples drawn by all processes, scored by a separate process of rank 0.

    Image i of every evaluation has the class label and initial noise of (seed, i), as in
    sample_ddp.py, so successive evaluations differ by the weights alone. Each process
    samples its batches into eval/.NNNNNNN-part-R.npy; rank 0 streams them into one .npz
    and starts the scorer on it (evaluator.py, or --eval-command) in its own process:
    training goes on while it scores, nothing it does (a missing file, a TensorFlow error,
    a crash) can stop or corrupt the run, and TensorFlow never loads into training. Its
    metrics are logged when they come, at the step the samples were drawn; a failure is
    logged in one line.
    """

    def __init__(self, monitor, args, batch_size):
        self.monitor, self.args, self.batch_size = monitor, args, batch_size
        self.folder = monitor.exp_dir / "eval"
        self.pending = None
        if monitor.rank == 0:
            self.folder.mkdir(exist_ok=True)
            for stale in [*self.folder.glob("*.npz"), *self.folder.glob(".*.npy")]:
                stale.unlink()  # samples of an evaluation that a killed run never finished

    def command(self):
        if self.args.eval_command:
            return shlex.split(self.args.eval_command)
        graph = ["--inception-graph", self.args.inception_graph] if self.args.inception_graph else []
        return [sys.executable, str(ROOT / "evaluator.py"), self.args.eval_ref, *graph]

    def part_path(self, step, rank):
        return self.folder / f".{step:07d}-part-{rank}.npy"

    def run(self, step, ema):
        """All processes: sample this step's images; rank 0 starts scoring them.

        Skipped (one log line) while the previous evaluation is still being scored: training
        never waits for a scorer, so a slow one cannot stall the other processes into their
        collective timeout.
        """
        m, n = self.monitor, self.args.eval_samples
        self.collect()
        busy = self.pending is not None  # rank 0's scorer; the others follow its decision
        if all_reduce_mean(torch.tensor([float(busy)], device=m.device)).item() > 0:
            if m.rank == 0:
                m.logger.info("evaluation at step %d skipped: the evaluation of step %d is still being scored "
                              "(raise --eval-every)", step, self.pending[0])
            return
        start = time.time()
        error = None
        try:
            self.sample_part(step, ema)
        except Exception as err:
            error = one_line(err)
            if m.rank != 0:  # rank 0 reports only its own error; the others' go to their output
                print(f"[rank {m.rank}] evaluation at step {step}: sampling failed ({error})", file=sys.stderr)
        failed = all_reduce_mean(torch.tensor([float(error is not None)], device=m.device)).item() > 0
        if m.rank != 0:
            return
        try:
            if failed:
                m.logger.info("evaluation at step %d failed while sampling (%s); training goes on", step,
                              error or "on another process, see its output")
                return
            npz = self.folder / f"{step:07d}.npz"
            self.write_npz(step, npz)
            log = open(self.folder / f"{step:07d}.log", "w")
            proc = subprocess.Popen([*self.command(), str(npz), "--json", str(self.folder / f"{step:07d}.json")],
                                    stdout=log, stderr=subprocess.STDOUT, env=self.scorer_env())
            log.close()
            self.pending = (step, proc, time.time(), time.time() - start)
            m.logger.info("evaluation at step %d: %d samples drawn in %.0f s; scoring in the background",
                          step, n, time.time() - start)
        except Exception as err:
            m.logger.info("evaluation at step %d failed (%s); training goes on", step, one_line(err))
        finally:
            for rank in range(m.world_size):
                self.part_path(step, rank).unlink(missing_ok=True)

    def sample_part(self, step, ema):
        """This process's batches of the evaluation, as uint8 (count, H, W, 3) in its part file."""
        m, n = self.monitor, self.args.eval_samples
        batches = batches_of_rank(n, self.batch_size, m.rank, m.world_size)
        size = m.settings["image_size"]
        part = np.lib.format.open_memmap(self.part_path(step, m.rank), mode="w+", dtype=np.uint8,
                                         shape=(sum(map(len, batches)), size, size, 3))
        row = 0
        for batch in tqdm(batches, desc=f"evaluation samples (step {step})", unit="batch", disable=m.rank != 0):
            images, _ = generate(ema, m.vae, m.settings, self.args.global_seed, batch,
                                 make_sampler(self.args.eval_sampler, self.args.eval_sampling_steps),
                                 Guidance(scale=self.args.eval_cfg_scale), precision=m.precision)
            part[row:row + len(batch)] = to_uint8(images).numpy()
            row += len(batch)
        part.flush()
        del part

    def write_npz(self, step, npz):
        """Rank 0: the parts of all processes, in image order, into one .npz (arr_0 images, arr_1 labels)."""
        m, n = self.monitor, self.args.eval_samples
        parts, where = {}, []
        for rank in range(m.world_size):
            rows = [i for batch in batches_of_rank(n, self.batch_size, rank, m.world_size) for i in batch]
            if rows:
                parts[rank] = np.load(self.part_path(step, rank), mmap_mode="r")
                where += [(i, rank, row) for row, i in enumerate(rows)]
        images = (parts[rank][row] for _, rank, row in sorted(where))
        size = m.settings["image_size"]
        card = {"source": "train.py --eval-every", "step": step, "weights": "ema", "sampler": self.args.eval_sampler,
                "steps": self.args.eval_sampling_steps, "cfg_scale": self.args.eval_cfg_scale, "labels": "random",
                "global_seed": self.args.global_seed, "num_samples": n, "model": m.settings["model"],
                "vae": m.settings["vae"]}
        write_npz_streaming(npz, n, (size, size, 3), images,
                            labels_for(n, self.args.global_seed, m.settings["trained_labels"]), protocol=card)

    def scorer_env(self):
        """The scorer sees rank 0's GPU only (TensorFlow would otherwise take memory on every GPU)."""
        env = dict(os.environ)
        if self.monitor.device.type == "cuda":
            visible = env.get("CUDA_VISIBLE_DEVICES")
            index = self.monitor.device.index or 0
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        return env

    def collect(self, wait=False):
        """Rank 0: log the finished scorer's metrics (to log.txt and TensorBoard), or its failure in one line."""
        if self.pending is None:
            return
        step, proc, started, sampling_s = self.pending
        if proc.poll() is None and not wait:
            return
        if proc.poll() is None:
            self.monitor.logger.info("waiting for the evaluation of step %d", step)
        proc.wait()
        self.pending = None
        m = self.monitor
        (self.folder / f"{step:07d}.npz").unlink(missing_ok=True)
        metrics_path = self.folder / f"{step:07d}.json"
        try:
            scored = json.loads(metrics_path.read_text()) if proc.returncode == 0 else None
            # The numbers; evaluator.py's JSON also holds its settings and the protocol card (objects).
            metrics = {k: v for k, v in scored.items() if is_number(v)} if isinstance(scored, dict) else {}
            if not metrics:
                raise ValueError
        except (OSError, ValueError):
            lines = (self.folder / f"{step:07d}.log").read_text(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            if proc.returncode == 0:
                reason = f"no JSON object of numbers in {metrics_path}"
            m.logger.info("evaluation at step %d failed: %s; training goes on (output: %s)", step, reason,
                          self.folder / f"{step:07d}.log")
            return
        m.logger.info("evaluation at step %d: %s (%d samples; sampling %.0f s, scoring %.0f s)", step,
                      ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), self.args.eval_samples, sampling_s,
                      time.time() - started)
        if m.writer is not None:
            for name, value in metrics.items():
                m.writer.add_scalar(f"eval/{name}", value, step)
            m.writer.flush()
