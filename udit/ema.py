"""The weight averages the trainer keeps: the fixed-decay EMA of the paper and EDM2's power-function EMAs.

Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", CVPR 2024, arXiv 2312.02696, Sec. 3 and Appendix C). A power-function EMA at
training time t averages the weights theta(tau) of all of training so far with the profile

    p_t(tau) = (gamma + 1) / t * (tau / t)^gamma,    0 <= tau <= t      (Eq. 121, integral 1)

whose width, relative to t, is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
(Eq. 123). Training keeps a few of them and saves snapshots now and then; afterwards
udit/phema.py combines the snapshots into the EMA of any other sigma_rel by least squares
on the profiles (Algorithm 3).

Time is counted in optimizer steps, t = 1, 2, ...; EDM2 counts images, t = n B after n
steps of batch B, which gives the same beta (1 - B / (n B) = 1 - 1 / n) and the same
profiles for a constant batch size.
"""

import argparse
import math
from copy import deepcopy

import numpy as np
import torch

from udit.checkpoint import CheckpointError, load_weights, save_atomic

# gamma -> 0: the uniform average of all training, the widest profile without an infinite
# weight on the initialisation (gamma < 0).
SIGMA_REL_MAX = math.sqrt(1 / 12)
SNAPSHOT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SNAPSHOT_FOLDER = "posthoc"


def sigma_rel_to_gamma(sigma_rel):
    """The exponent gamma > 0 of the power-function profile of relative width sigma_rel in (0, SIGMA_REL_MAX).

    Eq. 123 solved for gamma (Eq. 126, Algorithm 2): the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2.
    E.g. 0.05 -> 16.97, 0.10 -> 6.94. Raises ValueError outside the range.
    """
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}): a power-function EMA is "
                         f"at most as wide as the uniform average of all training ({SIGMA_REL_MAX:.4f})")
    s = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def gamma_to_sigma_rel(gamma):
    """Relative width of the profile with exponent gamma (Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_inner_products(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral of p_{t_a, gamma_a}(tau) p_{t_b, gamma_b}(tau) d tau, in closed form (Algorithm 3).

    For t_a <= t_b the integral over [0, t_a] is
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b)^gamma_b / t_b,
    and symmetrically. Arguments broadcast (numpy, float64); times in steps.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b) ** exponent
            / np.maximum(t_a, t_b))


def solve_coefficients(steps, gammas, step, target_gammas):
    """Least-squares weights of snapshots for target profiles, and how well they fit (Algorithm 3).

    steps, gammas: the snapshots' times and exponents, shape (N,); step: the target time;
    target_gammas: shape (M,). Returns (coefficients (N, M), normalised to sum 1 over the
    snapshots as EDM2 does, so the result stays a weighted average; relative L2 error of
    each fitted profile, ||p_target - sum_i c_i p_i|| / ||p_target||, shape (M,)).
    """
    steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
    target_gammas = np.atleast_1d(np.asarray(target_gammas, np.float64))
    gram = profile_inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    cross = profile_inner_products(steps[:, None], gammas[:, None], float(step), target_gammas[None, :])
    coefficients = np.linalg.solve(gram, cross)
    coefficients = coefficients / coefficients.sum(axis=0, keepdims=True)
    norm = profile_inner_products(float(step), target_gammas, float(step), target_gammas)
    residual = norm - 2 * (coefficients * cross).sum(0) + (coefficients * (gram @ coefficients)).sum(0)
    return coefficients, np.sqrt(np.maximum(residual, 0.0) / norm)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over all parameters."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


class PowerFunctionEMA:
    """One power-function EMA of relative width sigma_rel (EDM2 Eq. 127), with its buffers copied.

    After step t: ema <- ema + (1 - beta)(model - ema), beta = (1 - 1/t)^(gamma + 1); beta is
    0 at t = 1, so the initial weights get no weight. When steps were skipped since the
    last update (non-finite losses), beta = (t_last / t)^(gamma + 1), the product of the
    skipped steps' betas for weights that did not change.
    """

    def __init__(self, model, sigma_rel):
        self.sigma_rel, self.gamma = sigma_rel, sigma_rel_to_gamma(sigma_rel)
        self.module = deepcopy(model).requires_grad_(False).eval()
        self.step = 0  # the step of the last update; 0: the initial weights

    @torch.no_grad()
    def update(self, model, step):
        beta = (self.step / step) ** (self.gamma + 1)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - beta)
        for own, source in zip(self.module.buffers(), model.buffers()):
            own.copy_(source)
        self.step = step

    def state_dict(self):
        return {"sigma_rel": self.sigma_rel, "step": self.step, "ema": self.module.state_dict()}

    def load_state_dict(self, state, source):
        if state["sigma_rel"] != self.sigma_rel:
            raise CheckpointError(f"{source}: holds the power-function EMA of sigma_rel {state['sigma_rel']}, "
                                  f"not {self.sigma_rel}")
        load_weights(self.module, state["ema"], source)
        self.step = state["step"]


class TrainingEMAs:
    """What the training loop averages: the paper's fixed-decay EMA and, with --posthoc-ema, EDM2's.

    fixed: the EMA module of decay --ema-decay (ramped up by --ema-warmup), kept on every
    rank as in DiT. The power-function EMAs of --posthoc-ema live on rank 0 only (the other
    ranks hold the same weights and write nothing), which saves snapshots every
    --posthoc-every steps to EXPERIMENT/posthoc/NNNNNNN_sigma<sigma_rel>.pt. Their state
    travels in the training checkpoint ("posthoc_ema"), so a resumed run writes the same
    snapshots as the straight run. Without --posthoc-ema the checkpoint is as before.
    """

    def __init__(self, model, args, config, exp_dir, rank):
        self.args, self.config = args, config
        self.fixed = deepcopy(model).requires_grad_(False).eval()
        self.folder = exp_dir / SNAPSHOT_FOLDER
        self.power = [PowerFunctionEMA(model, s) for s in args.posthoc_ema or []] if rank == 0 else []
        if self.power:
            self.folder.mkdir(exist_ok=True)
            for stale in self.folder.glob(".*.tmp-*"):
                stale.unlink()  # left by a run killed while writing; the final files are intact

    def update(self, model, step):
        """After the optimizer step that made `step` (counted from 1)."""
        decay = self.args.ema_decay
        if self.args.ema_warmup:
            decay = min(decay, (1 + step) / (10 + step))
        update_ema(self.fixed, model, decay)
        for ema in self.power:
            ema.update(model, step)

    def save_snapshots(self, step):
        """Rank 0, every --posthoc-every steps: one file per power-function EMA, written atomically.

        Called before the step's training checkpoint: a run killed between the two resumes
        from an earlier checkpoint and rewrites the same snapshot.
        """
        if not self.power or step % self.args.posthoc_every:
            return
        dtype = SNAPSHOT_DTYPES[self.args.posthoc_dtype]
        for ema in self.power:
            weights = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.cpu()
                       for k, v in ema.module.state_dict().items()}
            save_atomic({"ema": weights, "step": step, "sigma_rel": ema.sigma_rel, "gamma": ema.gamma,
                         "args": self.config, "run_id": getattr(self.args, "run_id", None)},
                        self.folder / snapshot_name(step, ema.sigma_rel))

    def state_dict(self):
        """The checkpoint entries: "ema" (the fixed EMA) and, with --posthoc-ema, "posthoc_ema"."""
        state = {"ema": self.fixed.state_dict()}
        if self.power:
            state["posthoc_ema"] = [ema.state_dict() for ema in self.power]
        return state

    def load_state_dict(self, checkpoint, source):
        load_weights(self.fixed, checkpoint["ema"], source)
        if not self.power:
            return
        if "posthoc_ema" not in checkpoint:
            raise CheckpointError(f"{source}: has no power-function EMAs to resume (the run was started without "
                                  f"--posthoc-ema)")
        for ema, state in zip(self.power, checkpoint["posthoc_ema"], strict=True):
            ema.load_state_dict(state, source)


def snapshot_name(step, sigma_rel):
    return f"{step:07d}_sigma{sigma_rel:g}.pt"


def sigma_rel_flag(text):
    """argparse type of --posthoc-ema: a relative width in (0, SIGMA_REL_MAX)."""
    value = float(text)
    if not 0 < value < SIGMA_REL_MAX:
        raise argparse.ArgumentTypeError(f"a relative EMA width must be in (0, {SIGMA_REL_MAX:.4f}) (the widest: "
                                         f"the uniform average of all training), got {text}")
    return value


def snapshot_schedule_note(args):
    """A warning for the log when the last snapshot falls short of --max-steps, else None.

    phema reconstructs at snapshot steps only: the steps after the last one are lost to it.
    """
    if not args.posthoc_ema or args.max_steps % args.posthoc_every == 0:
        return None
    last = args.max_steps - args.max_steps % args.posthoc_every
    return (f"warning: --posthoc-every {args.posthoc_every} does not divide --max-steps {args.max_steps}: the last "
            f"snapshot is at step {last}, so python -m udit.phema cannot make an EMA of the final weights; a "
            f"--posthoc-every that divides {args.max_steps} keeps them")


def check_posthoc_args(parser, args):
    """Exits 2 with one line on post-hoc EMA flags that cannot work together."""
    if not args.posthoc_ema:
        loose = [f"--{k.replace('_', '-')}" for k in ("posthoc_every", "posthoc_dtype") if k in args.given]
        if loose:
            parser.error(f"{' and '.join(loose)} appl{'y' if len(loose) > 1 else 'ies'} to post-hoc EMA only: add "
                         f"--posthoc-ema, e.g. "
                         f"--posthoc-ema 0.05 0.10")
        return
    if len(set(args.posthoc_ema)) != len(args.posthoc_ema):
        parser.error(f"--posthoc-ema {' '.join(map(str, args.posthoc_ema))}: each width once")
