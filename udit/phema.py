"""Choose the EMA after training: reconstruct the EMA of any width from post-hoc EMA snapshots (EDM2).

    python -m udit.phema results/003-U-DiT-B --sigma-rel 0.05 0.10 0.13 0.19   # at the latest snapshot step
    python -m udit.phema results/003-U-DiT-B --sigma-rel 0.13 --step 200000 --out-dir ema-200k

A run trained with `--posthoc-ema 0.05 0.10` leaves snapshots of its power-function EMAs in
EXPERIMENT/posthoc/ (udit/ema.py). For a target (step, sigma_rel) the snapshots up to that
step are combined with the least-squares weights of their averaging profiles (Karras et al.
2024, arXiv 2312.02696, Algorithm 3), normalised to sum 1 as EDM2's reconstruct_phema.py
does. Each output is an ordinary checkpoint, EXPERIMENT/phema/NNNNNNN_sigma<sigma_rel>.pt,
with the EMA weights in "ema" and the run's "args", which sample.py, sample_ddp.py and
train.py --ckpt load as they are; "posthoc" records the target, the snapshots used, their
coefficients and how closely they reproduce the target's profile.

The snapshots are read one at a time, once per group of --batch targets: memory of
--batch + 1 models.
"""

import re
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from udit.checkpoint import CheckpointError, load_checkpoint, save_atomic
from udit.cli import ActionableError, ArgumentParser, output_dir, positive_int, run_guarded
from udit.ema import (SIGMA_REL_MAX, SNAPSHOT_FOLDER, sigma_rel_flag, sigma_rel_to_gamma, snapshot_name,
                      solve_coefficients)

OUTPUT_FOLDER = "phema"
# A target whose profile the snapshots reproduce worse than this (relative L2 error) is
# refused: the weights would not be the EMA asked for. With snapshots of 0.05 and 0.10 every
# 2.5% of training (EDM2 spacing), 0.015 to 0.27 stay under it; with few snapshots, much less.
MAX_PROFILE_ERROR = 0.10
# udit.ema.snapshot_name: posthoc/NNNNNNN_sigma<width>.pt
SNAPSHOT_NAME = re.compile(r"(\d{7,})_sigma(.+)\.pt")


class ReconstructionError(ActionableError):
    """Snapshots that cannot give the EMA asked for; the message says what can."""


def list_snapshots(folder):
    """[(step, sigma_rel, path)] of the post-hoc EMA snapshots in `folder` (an experiment or its posthoc/), sorted.

    Each file is opened memory-mapped to read its step and width; raises ReconstructionError
    for a folder without snapshots and for snapshots of different networks or settings.
    """
    folder = Path(folder)
    if folder.is_file():
        raise ReconstructionError(f"{folder} is a file; give the experiment folder that holds {SNAPSHOT_FOLDER}/ "
                                  f"(or that {SNAPSHOT_FOLDER}/ folder itself)")
    if not folder.is_dir():
        raise ReconstructionError(f"{folder}: no such folder")
    if (folder / SNAPSHOT_FOLDER).is_dir():
        folder = folder / SNAPSHOT_FOLDER
    paths = sorted(p for p in folder.iterdir() if SNAPSHOT_NAME.fullmatch(p.name))
    if not paths:
        raise ReconstructionError(f"{folder}: no post-hoc EMA snapshots (NNNNNNN_sigma<width>.pt); train with "
                                  f"--posthoc-ema 0.05 0.10 to write them into EXPERIMENT/{SNAPSHOT_FOLDER}/")
    snapshots, first = [], None
    for path in paths:
        try:
            snapshot = load_checkpoint(path, mmap=True)
            step, sigma_rel, config, weights = (snapshot["step"], snapshot["sigma_rel"], snapshot["args"],
                                                snapshot["ema"])
        except (CheckpointError, KeyError, TypeError) as err:
            raise ReconstructionError(f"{path}: not a post-hoc EMA snapshot ({err})") from None
        shapes, run = {k: tuple(v.shape) for k, v in weights.items()}, snapshot.get("run_id")
        if first is None:
            first = (path, config, shapes, run)
        elif config != first[1] or shapes != first[2]:
            differ = sorted(k for k in {*config, *first[1]} if config.get(k) != first[1].get(k)) or ["weights"]
            raise ReconstructionError(f"{path} is a snapshot of another model than {first[0]} (they differ in "
                                      f"{', '.join(differ)}); keep the snapshots of one run in a folder")
        elif run and first[3] and run != first[3]:  # snapshots written before run ids existed carry None
            raise ReconstructionError(f"{path} is a snapshot of another training run of this model than {first[0]} "
                                      f"(run {run}, not {first[3]}); keep the snapshots of one run in a folder")
        snapshots.append((step, sigma_rel, path))
    return sorted(snapshots)


def plan(snapshots, sigma_rels, step=None):
    """(step, used snapshots, coefficients (N, M), profile errors (M,)) for the targets sigma_rels at `step`.

    step: one of the snapshot steps (default: the latest); the snapshots of later steps
    are not used. Raises ReconstructionError for a step without snapshots and for targets
    the snapshots reproduce worse than MAX_PROFILE_ERROR, naming the widths they can reach.
    """
    steps = sorted({s for s, _, _ in snapshots})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ReconstructionError(f"--step {step}: no snapshots at that step; they are at steps "
                                  f"{', '.join(map(str, steps[:6]))}{' ...' if len(steps) > 6 else ''}"
                                  f"{f' {steps[-1]}' if len(steps) > 6 else ''}")
    used = [s for s in snapshots if s[0] <= step]
    times = [s for s, _, _ in used]
    gammas = [sigma_rel_to_gamma(sigma) for _, sigma, _ in used]
    coefficients, errors = solve_coefficients(times, gammas, step, [sigma_rel_to_gamma(s) for s in sigma_rels])
    bad = [(s, e) for s, e in zip(sigma_rels, errors) if e > MAX_PROFILE_ERROR]
    if bad:
        sigma, error = bad[0]
        grid = np.linspace(0.001, SIGMA_REL_MAX - 0.001, 288)
        _, grid_errors = solve_coefficients(times, gammas, step, [sigma_rel_to_gamma(s) for s in grid])
        ok = grid[grid_errors <= MAX_PROFILE_ERROR]
        reach = f"widths from {ok.min():.3f} to {ok.max():.3f}" if ok.size else "no width"
        raise ReconstructionError(
            f"--sigma-rel {sigma:g} is out of reach at step {step}: its {len(used)} snapshots reproduce that "
            f"averaging profile only within {error:.0%} (at most {MAX_PROFILE_ERROR:.0%}); they reach {reach}; "
            f"more snapshots (a smaller --posthoc-every) reach further")
    return step, used, coefficients, errors


def reconstruct(snapshots, sigma_rels, step=None, batch=4, progress=True):
    """Yield (sigma_rel, checkpoint dict) for each target, streaming the snapshots once per `batch` targets.

    The weights are sum_i c_i snapshot_i in float32 (the snapshots' fp16 upcast), c from
    `plan`; "posthoc" in each checkpoint records what was used.
    """
    step, used, coefficients, errors = plan(snapshots, sigma_rels, step)
    groups = [list(range(i, min(i + batch, len(sigma_rels)))) for i in range(0, len(sigma_rels), batch)]
    bar = tqdm(total=len(groups) * len(used), unit="snapshot", desc="post-hoc EMA", disable=not progress)
    for group in groups:
        sums, config = [None] * len(group), None
        for i, (_, _, path) in enumerate(used):
            snapshot = load_checkpoint(path)
            config = snapshot["args"]
            for j, target in enumerate(group):
                c = float(coefficients[i, target])
                if sums[j] is None:
                    sums[j] = {k: v.float() * c if v.is_floating_point() else v.clone()
                               for k, v in snapshot["ema"].items()}
                else:
                    for k, v in snapshot["ema"].items():
                        if v.is_floating_point():
                            sums[j][k].add_(v.float(), alpha=c)
            del snapshot
            bar.update()
        for j, target in enumerate(group):
            record = {"sigma_rel": sigma_rels[target], "gamma": sigma_rel_to_gamma(sigma_rels[target]),
                      "step": step, "profile_error": float(errors[target]),
                      "snapshots": [path.name for _, _, path in used],
                      "coefficients": coefficients[:, target].tolist()}
            yield sigma_rels[target], {"ema": sums[j], "args": config, "step": step, "posthoc": record}
    bar.close()


def main(argv=None):
    p = ArgumentParser(prog="python -m udit.phema", description=__doc__.strip().splitlines()[0])
    p.add_argument("experiment", help="an experiment folder trained with --posthoc-ema (or its posthoc/ folder)")
    p.add_argument("--sigma-rel", type=sigma_rel_flag, nargs="+", required=True,
                   help="relative widths of the EMAs to make (EDM2's best: 0.13 unguided, 0.025 guided FID)")
    p.add_argument("--step", type=positive_int, help="the training step to reconstruct at (default: the latest "
                                                      "snapshot step)")
    p.add_argument("--out-dir", type=output_dir, help=f"where the checkpoints go (default: EXPERIMENT/{OUTPUT_FOLDER})")
    p.add_argument("--batch", type=positive_int, default=4,
                   help="targets made per pass over the snapshots (memory: this many models plus one)")
    args = p.parse_args(argv)
    sigma_rels = sorted(set(args.sigma_rel))

    def run():
        snapshots = list_snapshots(args.experiment)
        step, used, _, errors = plan(snapshots, sigma_rels, args.step)
        experiment = Path(args.experiment)
        experiment = experiment.parent if experiment.name == SNAPSHOT_FOLDER else experiment
        out_dir = Path(args.out_dir) if args.out_dir else experiment / OUTPUT_FOLDER
        if out_dir.resolve() == used[0][2].parent.resolve():  # the names coincide: it overwrote snapshots
            raise ReconstructionError(f"--out-dir {args.out_dir}: the folder of the snapshots themselves; a "
                                      f"reconstruction there would replace the snapshot of its name, lost for good. "
                                      f"Choose another folder (default: EXPERIMENT/{OUTPUT_FOLDER})")
        print(f"step {step}: {len(used)} snapshots -> sigma_rel "
              + ", ".join(f"{s:g} (profile within {e:.1%})" for s, e in zip(sigma_rels, errors)), flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        for sigma_rel, checkpoint in reconstruct(snapshots, sigma_rels, step, args.batch):
            path = out_dir / snapshot_name(step, sigma_rel)
            save_atomic(checkpoint, path)
            print(f"wrote {path}", flush=True)

    return run_guarded(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
