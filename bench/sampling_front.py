"""Quality against network evaluations: every solver, step count, spacing and guidance on one checkpoint.

Samples the digits model of `make demo` in-process with udit.sampling.generate (what
sample_ddp.py runs: image i from (seed, i), uniformly random classes) and scores the
samples with make demo's classifier (scripts/demo.py DigitScorer): class accuracy and
Frechet distance (FD) in its features against the held-out digits, per seed and as the
mean over seeds, against network evaluations per image (NFE, guidance included).

    python bench/sampling_front.py --ckpt results/demo/checkpoint.pt --workers 2 \\
        --guide-ckpts results/demo/train/000-U-DiT-S/checkpoints/0000{250,500}.pt \\
        --json bench/sampling_front.json   # the measurement in bench/RESULTS.md

Stages, in order (each uses the choices of those before; --stages runs a subset):

  baseline        DDPM at 100 and 250 steps, DDIM at 10, 20, 50 (the paper's samplers),
                  and DDPM-250 unguided (cfg 1: what FD alone would prefer); for a flow
                  checkpoint (--objective flow) SiT's SDE at 100 and 250 steps, and 250 unguided
  spacing         each diffusers solver at 10 steps with each spacing, then the better
                  final step: picks each solver's spacing and final step; for a flow
                  checkpoint each flow solver's time shift
  front           each solver at 5, 10, 20, 50 steps with its picks
  interval        a grid of guidance intervals on the solver with the best FD at 10
                  steps, run at 20 steps: picks the interval
  front-interval  the front again with that interval
  autoguidance    each guide checkpoint x scale on that solver at 20 steps, then the
                  best pair at 5, 10, 20, 50 steps, with and without the interval
  ddpm-interval   DDPM at 100 and 250 steps with the interval (not run by default)
  candidates      the recommendations considered for the README at fixed settings (no
                  picks: see candidate_configs()) beside the 250-step reference, each marked
                  kept if its class accuracy is at least RECOMMEND_SHARE of the
                  reference's (not run by default; run it on every checkpoint the
                  README's recommendations claim to hold on)

Picks use the first seed and --select-samples samples (the ranking, not the figure, is
what they need). FD rewards diversity, so on its own it prefers weaker guidance; an
interval or an autoguidance setting is eligible only if it keeps the class accuracy of
guidance at every step (cfg 4) within ACCURACY_SLACK, and the targets are judged on
configurations that keep the reference's (DDPM-250; flow-sde-250 for flow). Every (configuration, seed) is appended to the JSON
as soon as it is measured and a rerun skips those already there, so an interrupted sweep
resumes. --workers N measures N configurations at a time, one process each. Prints the
table.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo import DigitScorer  # noqa: E402
from udit.checkpoint import load_checkpoint, recorded_objective  # noqa: E402
from udit.samplers import SAMPLERS, DiffusersSolver, FlowSolver, Guidance, make_sampler  # noqa: E402
from udit.sampling import add_sampling_args, generate, load_guide_model, load_sampling_model  # noqa: E402
from udit.vae import to_uint8  # noqa: E402
from udit.cli import ArgumentParser, number, output_file, positive_int, seed  # noqa: E402

SOLVERS = {"ddpm": [name for name, s in SAMPLERS.items() if isinstance(s, DiffusersSolver)],
           "flow": [name for name, s in SAMPLERS.items() if isinstance(s, FlowSolver)]}
REFERENCE = {"ddpm": "ddpm", "flow": "flow-sde"}  # each objective's 250-step reference sampler
CANDIDATE_SHIFTS = (1.0, 2.0, 3.0)  # SD3 samples with 3
STEPS = (5, 10, 20, 50)
CANDIDATE_SPACINGS = ("trailing", "karras", "logsnr")  # "linspace" is "trailing" shifted by at most one timestep
NO_LIMIT = 1000.0  # above the schedule's sigma_max (157): an interval open at the top
INTERVALS = [[lo, hi] for lo in (0.0, 0.2, 0.5, 1.0) for hi in (2.0, 5.0, 10.0, NO_LIMIT) if [lo, hi] != [0.0, NO_LIMIT]]
GUIDE_SCALES = (1.5, 2.0, 3.0)
ACCURACY_SLACK = 0.005  # class accuracy a guidance setting may lose against cfg 4 at every step
# A recommendation must keep at least this share of the reference's class accuracy on every
# checkpoint it is recommended for: FD rewards diversity, so it alone prefers dropping classes.
RECOMMEND_SHARE = 0.98
STAGES = ("baseline", "spacing", "front", "interval", "front-interval", "autoguidance", "ddpm-interval",
          "candidates")
DEFAULT_STAGES = STAGES[:-2]


def config(sampler, steps, spacing=None, final=None, cfg=4.0, interval=None, guide=None, samples=1000, shift=None):
    """One measurement's settings as plain data (its JSON is the measurement's key; a flow solver's has its shift)."""
    cfg = {"sampler": sampler, "steps": steps, "spacing": spacing, "final": final, "cfg": cfg,
           "interval": None if interval is None else list(interval), "guide": guide, "samples": samples}
    return cfg if shift is None else {**cfg, "shift": shift}


def candidate_configs(objective, samples, guide=None, reference_samples=None):
    """(reference, candidates): the recommendations the README considers, at fixed settings (no picks).

    Each solver at fewer than 50 NFE with the guidance intervals (1, 2] (the README's first
    pick), (0.5, 5], (1, inf) and none (cfg at every step); for ddpm also autoguidance by
    `guide` at scale 2 with (1, 2]. The reference is the objective's 250-step sampler, with
    reference_samples samples (default: samples; it costs 500 NFE per image).
    """
    top = float("inf") if objective == "flow" else NO_LIMIT
    intervals = ([1.0, 2.0], [0.5, 5.0], [1.0, top], None)
    reference_samples = reference_samples or samples
    if objective == "flow":
        reference = config("flow-sde", 250, samples=reference_samples, shift=1.0)
        solvers = [config("flow-heun", 10, samples=samples, shift=3.0), config("flow-euler", 20, samples=samples,
                   shift=3.0), config("flow-sde", 20, samples=samples, shift=1.0)]
    else:
        reference = config("ddpm", 250, samples=reference_samples)
        solvers = [config(name, steps, spacing, SAMPLERS[name].final, samples=samples)
                   for name, steps, spacing in (("dpm++3m", 10, "trailing"), ("euler", 20, "trailing"),
                                                ("dpm++2m-sde", 10, "logsnr"), ("dpm++2m-sde", 20, "logsnr"))]
    cfgs = [{**c, "interval": iv} for c in solvers for iv in intervals]
    if guide and objective == "ddpm":
        cfgs.append({**solvers[-1], "interval": [1.0, 2.0], "guide": guide, "cfg": 2.0})
    return reference, cfgs


def sampler_and_guidance(cfg, guide=None):
    """The configured sampler and Guidance of a configuration; `guide`: its guide network, if it has one."""
    sampler = make_sampler(cfg["sampler"], cfg["steps"], cfg["spacing"], cfg["final"], shift=cfg.get("shift"))
    guidance = Guidance(scale=cfg["cfg"], interval=None if cfg["interval"] is None else tuple(cfg["interval"]),
                        guide=guide)
    return sampler, guidance


def accepted(cfg):
    """Whether make_sampler takes a configuration (it refuses a zero-length step, e.g. sigma_min after karras)."""
    try:
        sampler_and_guidance(cfg)
    except ValueError:
        return False
    return True


def evaluations(cfg):
    """Network evaluations per image of a configuration, counted without running it."""
    sampler, guidance = sampler_and_guidance(cfg, guide=object() if cfg["guide"] else None)  # counted, never called
    return sampler.evaluations_per_image(guidance)["total"]


def complete(records, samples, seeds):
    """{key: {seed: record}} of the configurations measured with `samples` samples on every one of `seeds`."""
    rows = {}
    for r in records:
        if r["config"]["samples"] == samples:
            rows.setdefault(r["key"], {})[r["seed"]] = r
    return {k: rs for k, rs in rows.items() if set(rs) >= set(seeds)}


def key(cfg):
    return json.dumps(cfg, sort_keys=True)


def label(cfg):
    text = f"{cfg['sampler']}-{cfg['steps']}"
    if cfg["spacing"]:
        text += f" {cfg['spacing']}" + (f"/{cfg['final']}" if cfg["final"] else "")
    if cfg.get("shift", 1.0) != 1.0:
        text += f" shift {cfg['shift']:g}"
    if cfg["guide"]:
        text += f" autoguided by {Path(cfg['guide']).stem} x{cfg['cfg']:g}"
    elif cfg["cfg"] != 4.0:
        text += f" cfg {cfg['cfg']:g}"
    if cfg["interval"]:
        low, high = cfg["interval"]
        text += f" interval ({low:g}, {'inf' if high >= NO_LIMIT else f'{high:g}'}]"
    return text


#################################################################################
#                                 Measuring                                     #
#################################################################################

class Measurer:
    """The model, guides and scorer of one process: measure(cfg, seed) -> record."""

    def __init__(self, ckpt, threads):
        torch.set_num_threads(threads)
        self.device = torch.device("cpu")
        parser = argparse.ArgumentParser()
        add_sampling_args(parser)
        parser.add_argument("--cfg-scale", type=float, default=4.0)  # only checked: the model has a null label
        self.model, self.vae, self.settings = load_sampling_model(parser.parse_args(["--ckpt", ckpt]), self.device)
        self.guides = {}
        self.scorer = DigitScorer.default()

    def measure(self, cfg, seed, batch_size=500):
        if cfg["guide"] and cfg["guide"] not in self.guides:
            self.guides[cfg["guide"]] = load_guide_model(cfg["guide"], self.settings, self.device)
        sampler, guidance = sampler_and_guidance(cfg, self.guides.get(cfg["guide"]))
        start = time.time()
        images, labels = [], []
        for first in range(0, cfg["samples"], batch_size):
            batch = range(first, min(first + batch_size, cfg["samples"]))
            x, y = generate(self.model, self.vae, self.settings, seed, batch, sampler, guidance)
            images.append(to_uint8(x).numpy())
            labels.append(y.numpy())
        scores = self.scorer.score(np.concatenate(images), np.concatenate(labels))
        return {"key": key(cfg), "config": cfg, "seed": seed, **scores,
                "nfe": sampler.evaluations_per_image(guidance)["total"], "seconds": round(time.time() - start, 1)}


_measurer = None


def _start_worker(ckpt, threads):
    global _measurer
    _measurer = Measurer(ckpt, threads)


def _measure(cfg, seed):
    return _measurer.measure(cfg, seed)


class Sweep:
    """The measurements so far (the JSON file) and the workers that add to them."""

    def __init__(self, args):
        self.path = Path(args.json)
        self.records = json.loads(self.path.read_text()) if self.path.is_file() else []
        if args.workers > 1:
            self.pool = ProcessPoolExecutor(args.workers, initializer=_start_worker, initargs=(args.ckpt, args.threads))
        else:
            self.pool = None
            _start_worker(args.ckpt, args.threads)

    def measured(self, cfg, seed):
        return next((r for r in self.records if r["key"] == key(cfg) and r["seed"] == seed), None)

    def run(self, cfgs, seeds):
        """Measure every (cfg, seed) not measured yet, several at a time with workers."""
        todo = [(c, s) for c in cfgs for s in seeds if not self.measured(c, s)]
        results = (self.pool.map(_measure, *zip(*todo)) if self.pool and todo else
                   (_measure(c, s) for c, s in todo))
        for record in results:
            self.records.append(record)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.records, indent=1) + "\n")
            os.replace(tmp, self.path)
            print(f"{label(record['config']):62s} seed {record['seed']}: NFE {record['nfe']:4d}  "
                  f"FD {record['fd_classifier']:6.3f}  accuracy {record['class_accuracy']:.3f}  "
                  f"({record['seconds']:.0f} s)", flush=True)

    def fd(self, cfg, seeds):
        return float(np.mean([self.measured(cfg, s)["fd_classifier"] for s in seeds]))

    def accuracy(self, cfg, seeds):
        return float(np.mean([self.measured(cfg, s)["class_accuracy"] for s in seeds]))

    def best(self, cfgs, seeds, min_accuracy=0.0):
        """The configuration with the lowest mean FD over `seeds` among those with the class accuracy asked."""
        self.run(cfgs, seeds)
        eligible = [c for c in cfgs if self.accuracy(c, seeds) >= min_accuracy]
        return min(eligible or cfgs, key=lambda c: self.fd(c, seeds))


#################################################################################
#                                   Stages                                      #
#################################################################################

def build_parser():
    p = ArgumentParser(prog="sampling_front.py", description=__doc__.strip().splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="results/demo/checkpoint.pt", help="a checkpoint of the make demo model")
    p.add_argument("--guide-ckpts", nargs="*", default=[], help="autoguidance candidates (earlier checkpoints)")
    p.add_argument("--samples", type=number(int, min=2), default=1000, help="samples per measurement in the table")
    p.add_argument("--select-samples", type=number(int, min=2), default=500,
                   help="samples for the picks (first seed only)")
    p.add_argument("--seeds", type=seed, nargs="+", default=[0, 1], help="one sampling run per seed")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(DEFAULT_STAGES), help="see above")
    p.add_argument("--json", type=output_file,
                   help="the measurements, resumed from and appended to (default: beside the "
                        "checkpoint, CKPT_sampling_front.json)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="configurations measured at a time (one process each)")
    p.add_argument("--max-nfe", type=positive_int,
                   help="skip front configurations with more network evaluations per image")
    p.add_argument("--reference-samples", type=positive_int,
                   help="samples of the candidates stage's 250-step reference (default: --samples)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per worker (one: OpenMP threads spin on a shared machine)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.json = args.json or str(Path(args.ckpt).with_name(f"{Path(args.ckpt).stem}_sampling_front.json"))
    args.objective = recorded_objective(load_checkpoint(args.ckpt).get("args", {}), args.ckpt)[0]
    sweep = Sweep(args)
    first, n, picks = args.seeds[:1], args.samples, args.select_samples
    flow = args.objective == "flow"
    solvers = SOLVERS[args.objective]

    if "baseline" in args.stages and flow:
        sweep.run([config("flow-sde", s, samples=n, shift=1.0) for s in (100, 250)] +
                  [config("flow-sde", 250, cfg=1.0, samples=n, shift=1.0)], args.seeds)
    elif "baseline" in args.stages:
        sweep.run([config("ddpm", s, samples=n) for s in (100, 250)] +
                  [config("ddim", s, samples=n) for s in (10, 20, 50)] + [config("ddpm", 250, cfg=1.0, samples=n)],
                  args.seeds)

    # Each solver's spacing, then its final step (where it has a choice), at 10 steps; a flow solver's shift.
    picked = {}
    if "spacing" in args.stages and flow:
        for name in solvers:
            best = sweep.best([config(name, 10, samples=picks, shift=shift) for shift in CANDIDATE_SHIFTS], first)
            picked[name] = {**best, "samples": n}
    elif flow:
        picked = {name: config(name, 10, samples=n, shift=1.0) for name in solvers}
    elif "spacing" in args.stages:
        candidates = {name: [config(name, 10, s, SAMPLERS[name].final, samples=picks) for s in CANDIDATE_SPACINGS]
                      for name in solvers}
        sweep.run([c for cs in candidates.values() for c in cs], first)
        for name, cs in candidates.items():
            best = sweep.best(cs, first)
            if best["final"] is not None and accepted({**best, "final": "sigma_min"}):
                best = sweep.best([best, {**best, "final": "sigma_min"}], first)
            picked[name] = {**best, "samples": n}
    else:
        picked = {name: config(name, 10, SAMPLERS[name].spacing, SAMPLERS[name].final, samples=n) for name in solvers}

    def solver(name, steps, **changes):
        return {**picked[name], "steps": steps, **changes}

    def affordable(cfgs):
        return [c for c in cfgs if args.max_nfe is None or evaluations(c) <= args.max_nfe]

    if "front" in args.stages:
        sweep.run(affordable([solver(name, s) for name in solvers for s in STEPS]), args.seeds)

    measured_at_10 = [name for name in solvers if sweep.measured(solver(name, 10), first[0])]
    pivot = min(measured_at_10, key=lambda name: sweep.fd(solver(name, 10), first)) if measured_at_10 else solvers[0]
    # Guidance settings are picked at 20 steps, keeping cfg 4's class accuracy there.
    reference = solver(pivot, 20, samples=picks)
    interval = None
    if "interval" in args.stages:
        sweep.run([reference], first)
        floor = sweep.accuracy(reference, first) - ACCURACY_SLACK
        best = sweep.best([solver(pivot, 20, interval=iv, samples=picks) for iv in INTERVALS], first, floor)
        interval = best["interval"]
        print(f"picked: interval {interval} on {pivot}-20 (class accuracy >= {floor:.3f})", flush=True)

    if "front-interval" in args.stages and interval:
        sweep.run(affordable([solver(name, s, interval=interval) for name in solvers for s in STEPS]), args.seeds)

    if "autoguidance" in args.stages and args.guide_ckpts:
        sweep.run([reference], first)
        floor = sweep.accuracy(reference, first) - ACCURACY_SLACK
        best = sweep.best([solver(pivot, 20, guide=g, cfg=scale, samples=picks)
                           for g in args.guide_ckpts for scale in GUIDE_SCALES], first, floor)
        print(f"picked: guide {best['guide']} at scale {best['cfg']}", flush=True)
        runs = [{**best, "steps": s, "samples": n} for s in STEPS]
        sweep.run(affordable(runs + ([{**r, "interval": interval} for r in runs] if interval else [])), args.seeds)

    if "ddpm-interval" in args.stages and interval and not flow:
        sweep.run([config("ddpm", s, interval=interval, samples=n) for s in (100, 250)], args.seeds)

    if "candidates" in args.stages:
        reference, cfgs = candidate_configs(args.objective, n, args.guide_ckpts[0] if args.guide_ckpts else None,
                                            args.reference_samples)
        sweep.run(cfgs + [reference], args.seeds)  # the costly reference last: an interrupted sweep has the rest

    if sweep.pool:
        sweep.pool.shutdown()
    print_table(sweep, args)
    if "candidates" in args.stages:
        print_candidates(sweep.records, args)
    return 0


def print_table(sweep, args):
    """Markdown: every configuration measured on all seeds with the full sample count; then the targets."""
    rows = complete(sweep.records, args.samples, args.seeds)
    full = sorted(rows.values(), key=lambda rs: (next(iter(rs.values()))["config"]["guide"] is not None,
                              next(iter(rs.values()))["config"]["interval"] is not None,
                              next(iter(rs.values()))["config"]["sampler"], next(iter(rs.values()))["nfe"]))
    print(f"\n| configuration | NFE | {' | '.join(f'FD seed {s}' for s in args.seeds)} | FD mean | class accuracy |")
    print("|---|---:|" + "---:|" * len(args.seeds) + "---:|---:|")
    summary = []
    for rs in full:
        fds = [rs[s]["fd_classifier"] for s in args.seeds]
        some = rs[args.seeds[0]]
        summary.append((float(np.mean(fds)), some["nfe"], label(some["config"]),
                        float(np.mean([rs[s]["class_accuracy"] for s in args.seeds]))))
        print(f"| {label(some['config'])} | {some['nfe']} | " + " | ".join(f"{fd:.2f}" for fd in fds) +
              f" | {np.mean(fds):.2f} | {np.mean([rs[s]['class_accuracy'] for s in args.seeds]):.3f} |")
    objective = getattr(args, "objective", "ddpm")
    name = REFERENCE[objective]
    reference = rows.get(key(config(name, 250, samples=args.samples, shift=1.0 if objective == "flow" else None)))
    if reference:
        ref_fd = float(np.mean([reference[s]["fd_classifier"] for s in args.seeds]))
        ref_accuracy = float(np.mean([reference[s]["class_accuracy"] for s in args.seeds]))
        print(f"\n{name}-250 (NFE 500): FD {ref_fd:.3f}, class accuracy {ref_accuracy:.3f} (mean of seeds "
              f"{args.seeds}); configurations that keep that accuracy within {ACCURACY_SLACK}:")
        for budget, slack in ((50, 1.0), (20, 1.1)):
            fits = [row[:3] for row in summary if row[1] <= budget and row[3] >= ref_accuracy - ACCURACY_SLACK]
            if fits:
                fd, nfe, name = min(fits)
                print(f"best at <= {budget} NFE: {name} (NFE {nfe}): FD {fd:.3f} = {fd / ref_fd:.2f}x the reference's; "
                      f"target <= {slack:.1f}x {'met' if fd <= slack * ref_fd else 'missed'}")


def print_candidates(records, args):
    """Markdown: each candidate's FD and class accuracy beside the reference's, and whether it keeps RECOMMEND_SHARE.

    Only what was measured on every seed is shown; without the reference there is no verdict.
    """
    reference, cfgs = candidate_configs(args.objective, args.samples, args.guide_ckpts[0] if args.guide_ckpts else None,
                                        args.reference_samples)
    rows = {**complete(records, args.samples, args.seeds), **complete(records, reference["samples"], args.seeds)}
    mean = {key(c): {m: float(np.mean([rows[key(c)][s][m] for s in args.seeds]))
                     for m in ("fd_classifier", "class_accuracy", "nfe")} for c in [reference, *cfgs] if key(c) in rows}
    ref = mean.get(key(reference))
    if ref is None:
        print(f"\n{label(reference)} ({reference['samples']} samples) not measured on seeds {args.seeds}: no verdict")
        floor = None
    else:
        floor = RECOMMEND_SHARE * ref["class_accuracy"]
        print(f"\n{label(reference)} ({reference['samples']} samples): FD {ref['fd_classifier']:.2f}, class accuracy "
              f"{ref['class_accuracy']:.3f}; kept = class accuracy >= {floor:.3f} ({RECOMMEND_SHARE:.0%} of it)")
    print(f"\n| candidate ({args.samples} samples, seeds {args.seeds}) | NFE | FD | class accuracy | kept |\n"
          f"|---|---:|---:|---:|---|")
    for c in cfgs:
        if key(c) in mean:
            m = mean[key(c)]
            kept = "?" if floor is None else "yes" if m["class_accuracy"] >= floor else "NO"
            print(f"| {label(c)} | {m['nfe']:.0f} | {m['fd_classifier']:.2f} | {m['class_accuracy']:.3f} | {kept} |")


if __name__ == "__main__":
    sys.exit(main())
