"""Samplers: a name maps to an object that turns a model call into images.

Three parts, each in one place:

- the noise process (`VPSchedule`): the training betas, the noise level sigma of a
  network timestep, and what the network output means (epsilon in its first channels);
- guidance (`Guidance`, `GuidedModel`): the one model call every sampler makes, with
  classifier-free guidance or autoguidance, an optional guidance interval, bf16
  autocast, CUDA-graph replay and a count of network evaluations per image (NFE). Which
  evaluations are guided is decided once per run, from the sampler's float64 list of
  network timesteps (`Sampler.guided_evaluations`): the model call follows that list and
  the NFE accounting counts it, so the printed NFE is the number of network calls;
- the solvers (`SAMPLERS`): DDPM and DDIM through `diffusion/` (the DiT API and random
  order the golden vectors check) and diffusers' DPM-Solver++, UniPC, Euler and Heun
  schedulers configured with the training betas.

A sampler sees only `model_fn(x, t) -> network output` (N images at one network
timestep t) and per-image random generators; it returns x_0. `make_sampler` refuses (one
line) the settings a solver cannot run: every step must go to a strictly lower noise
level (a zero-length step divides by zero in the multistep solvers: NaN images). Each sampler belongs to
one training objective (`Sampler.objective`): the `ddpm` ones above, and for `flow`
(udit/objectives.py) Euler and Heun on the velocity ODE and SiT's Euler-Maruyama SDE
(`FlowSolver`) on the linear interpolant (`FlowSchedule`).

Noise level. Both processes are, up to a scale, x_0 + sigma eps: sigma is the noise
level of the equivalent variance-exploding process that EDM (Karras et al. 2022) and the
guidance-interval paper (Kynkaanniemi et al. 2024) use, so one --cfg-interval means the
same noise for both objectives. DDPM: sigma = sqrt((1 - abar_t) / abar_t), from 0.0100
(t = 0) to 157 (t = 999). Flow: sigma = t / (1 - t), from 0 (data) to infinity (noise).
"""

import dataclasses
import functools
import importlib
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion import create_diffusion, gd
from udit.cuda_graphs import GraphedForward
from udit.objectives import OBJECTIVES, TIMESTEP_SCALE


#################################################################################
#                             The noise process                                 #
#################################################################################

class VPSchedule:
    """The variance-preserving diffusion of training: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

    betas: (T,) the training betas (linear 1e-4 .. 0.02 over T = 1000 steps, SPEC §2).
    The network predicts epsilon in its first C output channels (C = the input's
    channels); with learn_sigma, C more channels hold DiT's learned variance, which only
    `diffusion/`'s DDPM uses.
    """

    objective = "ddpm"

    def __init__(self, betas, learn_sigma=True):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.learn_sigma = learn_sigma
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.log_sigmas = 0.5 * np.log((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    @classmethod
    def training(cls, learn_sigma=True):
        """The schedule every U-DiT and DiT checkpoint of the `ddpm` objective was trained with."""
        return cls(gd.get_named_beta_schedule("linear", 1000), learn_sigma)

    @property
    def num_timesteps(self):
        return len(self.betas)

    def sigma(self, t):
        """Noise level (float) of a network timestep t (float; fractional t between training steps).

        log sigma is interpolated linearly between integer timesteps: the inverse of the
        sigma -> t map that diffusers' schedulers use for Karras and log-SNR spacings, so
        sigma(t) is the noise level the solver meant when it evaluated the network at t.
        """
        return float(np.exp(np.interp(t, np.arange(self.num_timesteps), self.log_sigmas)))

    @staticmethod
    def epsilon(output, x):
        """The epsilon prediction (N, C, H, W) in a network output (N, C_out >= C, H, W) for input x."""
        return output[:, : x.shape[1]]


class FlowSchedule:
    """The linear interpolant of `--objective flow`: x_t = (1 - t) x_0 + t eps, t in [0, 1].

    The network sees the timestep 1000 t and predicts the velocity v = eps - x_0 in all
    its output channels (udit/objectives.py).
    """

    objective = "flow"
    learn_sigma = False

    @staticmethod
    def sigma(t):
        """Noise level of a network timestep t = 1000 t_flow: x_t / (1 - t_flow) = x_0 + sigma eps."""
        t = float(t) / TIMESTEP_SCALE
        return float("inf") if t >= 1.0 else t / (1.0 - t)

    @staticmethod
    def velocity(output, x):
        """The velocity prediction (N, C, H, W) of a network output for input x."""
        return output[:, : x.shape[1]]


def schedule_for(objective, learn_sigma=True):
    """The noise process a model of `objective` ("ddpm" or "flow") was trained on."""
    if objective == "flow":
        return FlowSchedule()
    if objective == "ddpm":
        return VPSchedule.training(learn_sigma)
    raise ValueError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")


#################################################################################
#                                   Guidance                                    #
#################################################################################

@dataclass(frozen=True)
class Guidance:
    """How the model call is guided.

    scale: s in out = uncond + s (cond - uncond); 1 = no guidance.
    channels: guide the first `channels` output channels (3: DiT's convention, which also
        leaves the 4th latent channel unguided), None: every channel, "default": the
        sampler's (3 for ddpm and ddim, every epsilon channel for the diffusers solvers;
        `for_sampler` resolves it). The other channels come from the conditional prediction.
    interval: (sigma_low, sigma_high): guide only where sigma_low < sigma(t) <= sigma_high
        (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample
        and distribution quality"); outside, only the conditional prediction is computed.
    guide: autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
        itself"): a weaker network whose *conditional* prediction replaces the null-label one,
        out = guide + s (main - guide). None: classifier-free guidance with the null label.
    """
    scale: float = 1.0
    channels: int | None | str = "default"
    interval: tuple[float, float] | None = None
    guide: torch.nn.Module | None = None

    def for_sampler(self, sampler):
        """These settings with "default" channels replaced by the sampler's."""
        if self.channels != "default":
            return self
        return dataclasses.replace(self, channels=sampler.default_cfg_channels)

    def active(self, sigma):
        """Whether a call at noise level sigma (float64) is guided: sigma in (low, high] of the interval."""
        if self.scale == 1.0:
            return False
        return self.interval is None or self.interval[0] < sigma <= self.interval[1]

    def describe(self):
        """The settings as plain data (the guide network is named by the caller)."""
        interval = None if self.interval is None else [v if v < float("inf") else "inf" for v in self.interval]
        return {"cfg_scale": self.scale, "cfg_channels": "all" if self.channels is None else self.channels,
                "cfg_interval": interval,  # "inf" for an open top: strict JSON has no infinity
                "autoguidance": self.guide is not None}


def combine(cond, uncond, scale, channels):
    """uncond + scale (cond - uncond) on the first `channels` channels (None: all); the rest from cond."""
    if channels is None or channels >= cond.shape[1]:
        return uncond + scale * (cond - uncond)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


class GuidedModel:
    """The model call every sampler makes: (x (N, C, H, W), t (N,)) -> network output (N, C_out, H, W).

    model, guide: networks called as model(x, t, y). y: (N,) class labels. null_label:
    the label of the unconditional prediction (the label table's extra row).
    guided: (K,) bools, whether each of the K network evaluations of one sampling run is
    guided, in the solver's order (`Sampler.guided_evaluations`, which the NFE accounting
    counts too): call k follows entry k, so the run makes exactly the counted calls and
    never reads t back from the device. A guided classifier-free call runs one batch
    [x; x] with labels [y; null]; a guided autoguidance call runs the main and the guide
    network on x; an unguided call (scale 1, or outside the interval) runs the main network
    on x alone. One GuidedModel serves one run; a call beyond the K listed is a
    RuntimeError (a solver that evaluates other timesteps than it lists).

    precision "bf16": autocast; outputs are float32. cuda_graph: every network call is
    replayed from a CUDA graph, one per batch shape (the interval alternates two).
    evaluations / guide_evaluations: network evaluations per image so far, main model
    (conditional + unconditional) and guide model.
    """

    def __init__(self, model, y, null_label, guidance, guided, precision="fp32", cuda_graph=False):
        if guidance.channels == "default":
            raise ValueError("resolve the guided channels first: Guidance.for_sampler(sampler)")
        self.y, self.guidance, self.guided = y, guidance, [bool(g) for g in guided]
        self.null = torch.full_like(y, null_label)
        device_type = y.device.type
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

        def network(net):
            def call(x, t, y):
                with self.autocast:
                    return net(x, t, y).float()
            return GraphedForward(call) if cuda_graph else call
        self.cond, self.pair = network(model), network(model)
        self.guide = network(guidance.guide) if guidance.guide is not None else None
        self.calls, self.evaluations, self.guide_evaluations = 0, 0, 0

    def __call__(self, x, t):
        g = self.guidance
        if self.calls == len(self.guided):
            raise RuntimeError(f"network call {self.calls + 1} of a run that lists {len(self.guided)} evaluations")
        guided = self.guided[self.calls]
        self.calls += 1
        if not guided:
            self.evaluations += 1
            return self.cond(x, t, y=self.y)
        if self.guide is not None:
            self.evaluations += 1
            self.guide_evaluations += 1
            return combine(self.cond(x, t, y=self.y), self.guide(x, t, y=self.y), g.scale, g.channels)
        self.evaluations += 2
        cond, uncond = self.pair(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([self.y, self.null])).chunk(2)
        return combine(cond, uncond, g.scale, g.channels)


#################################################################################
#                                   Samplers                                    #
#################################################################################

TRAINING = VPSchedule.training()
FLOW = FlowSchedule()


class Sampler:
    """A solver with its settings: `sample(model_fn, z, generators, schedule) -> x_0`.

    model_fn(x (N, C, H, W), t (N,)) -> network output; z: (N, C, H, W) standard normal
    initial noise; generators: one torch.Generator per image on z's device, the only
    source of the noise a stochastic solver adds, so that image i depends on its own
    generator alone; schedule: the noise process the network was trained on, of the
    sampler's `objective`. `timesteps()` lists the network timesteps in the order the
    solver evaluates them (one network evaluation each, before guidance).
    """
    name: str
    steps: int
    stochastic: bool
    default_cfg_channels: int | None
    objective = "ddpm"

    def describe(self):
        """The settings as plain data, for logs, the accounting JSON and the sample folder's identity."""
        return {"sampler": self.name, "steps": self.steps}

    def noise_levels(self, schedule=None):
        """(K,) float64 noise level sigma of each network evaluation, in the solver's order."""
        schedule = schedule or (FLOW if self.objective == "flow" else TRAINING)
        return np.array([schedule.sigma(t) for t in np.asarray(self.timesteps(), dtype=np.float64)])

    def guided_evaluations(self, guidance, schedule=None):
        """(K,) bools: whether each network evaluation is guided (Guidance.active of its noise level).

        The one decision that both the run (GuidedModel) and the accounting
        (evaluations_per_image) use: taken in float64 from the solver's own timesteps, never
        from the float32 timestep the network is given (flow-heun 10, shift 3 puts a step at
        sigma = 2 exactly: 1.9999999999999998 in float64, 2.0000002 in float32).
        """
        return np.array([guidance.active(sigma) for sigma in self.noise_levels(schedule)], dtype=bool)

    def evaluations_per_image(self, guidance, schedule=None):
        """{"main", "guide", "total"}: network evaluations per image with this guidance, as GuidedModel makes them."""
        guided = self.guided_evaluations(guidance, schedule)
        steps, extra = len(guided), int(guided.sum())
        if guidance.guide is None:
            return {"main": steps + extra, "guide": 0, "total": steps + extra}
        return {"main": steps, "guide": extra, "total": steps + extra}

    def schedule_problem(self):
        """Why these settings cannot run, in one line, or None (make_sampler raises it as a ValueError)."""
        return None


@dataclass(frozen=True)
class DiffusionLoop(Sampler):
    """DDPM ancestral sampling or DDIM (eta 0) through `diffusion/`: the paper's protocol.

    Timesteps: `diffusion/`'s respacing (DDPM "N": N evenly spaced of 1000, from 999 down
    to 0; DDIM "ddimN": stride 1000 / N from 1000 - stride down to 0); at least 2 steps
    (1 keeps timestep 0 alone). The last step, at
    t = 0, returns the posterior mean (DDPM) or the x_0 estimate (DDIM). DDPM's step noise
    has the network's learned variance. One normal draw per image and step from its own
    generator, in the reference's order (DDIM draws and discards it).
    """
    name: str
    loop: str
    respacing: str
    stochastic: bool
    steps: int
    default_cfg_channels: int | None = 3

    def _diffusion(self, schedule=TRAINING):
        return create_diffusion(self.respacing.format(steps=self.steps), learn_sigma=schedule.learn_sigma)

    def timesteps(self):
        return self._diffusion().timestep_map[::-1]

    def schedule_problem(self):
        if self.steps == 1:  # the respacing of 1 step keeps timestep 0 alone
            return (f"{self.name} takes at least 2 steps: with 1, diffusion/'s respacing keeps only timestep 0, "
                    f"and the sample would be the initial noise")
        return None

    def sample(self, model_fn, z, generators, schedule=TRAINING, progress=False):
        def step_noise(x):
            return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generators])
        return getattr(self._diffusion(schedule), self.loop)(model_fn, z.shape, z, clip_denoised=False,
                                                             device=z.device, progress=progress, step_noise=step_noise)


SPACINGS = ("linspace", "trailing", "karras", "logsnr")
FINAL_STEPS = ("zero", "sigma_min")


@dataclass(frozen=True)
class DiffusersSolver(Sampler):
    """A diffusers scheduler configured with the training betas, run as diffusers' own loop.

    scheduler: the diffusers class name (imported on first use: importing diffusers takes
    seconds, which a DDPM run need not pay); config: its fixed keywords ((key, value)
    pairs: the algorithm and order). spacing: "linspace" / "trailing" (timesteps evenly spaced from
    999; diffusers' `timestep_spacing`), "karras" (EDM's rho = 7 spacing of sigma, Karras
    et al. 2022, Eq. 5) or "logsnr" (uniform in log sigma, i.e. in log-SNR, as DPM-Solver
    recommends for pixel-space models, Lu et al. 2022), the last two between the training
    schedule's sigma_min 0.0100 and sigma_max 157. final: the last step goes to sigma = 0
    and returns the x_0 estimate ("zero") or stops at sigma_min ("sigma_min"); None for
    a scheduler that always ends at 0 (Heun).

    The solvers integrate with epsilon: the learned-variance channels are dropped, and
    guidance acts on epsilon (all its channels by default). Stochastic solvers draw each
    image's noise from its own generator (diffusers' randn_tensor draws one tensor per
    generator of a list).

    Refused settings (`schedule_problem`): every one of the `steps` steps must go from a
    timestep in 0..999 to a strictly lower noise level. diffusers rounds the linspace and
    trailing timesteps to integers and takes their noise levels from them: linspace 1000
    puts two steps on one timestep (... 501 500 500 499 ...), a zero-length step that the
    multistep solvers divide by (NaN images); trailing's float `arange` adds a step to
    timestep -1 at 62 counts from 61 on (61: ... 32 15 -1, 62 steps; from 769 on, -1 and 0
    share sigma_min: NaN). The refusal names the count up to which every count works
    (linspace 999, trailing 60) and the nearest working one below. The Karras and log-SNR
    noise levels come from a formula and are distinct at every count (their rounded network
    timesteps repeat at high counts, as in diffusers; the solver still steps between
    distinct noise levels and converges). The final step "sigma_min" has zero length
    wherever the spacing already ends at sigma_min (Karras, log-SNR, linspace for Euler):
    refused too.
    """
    name: str
    scheduler: str
    config: tuple
    stochastic: bool
    steps: int
    spacing: str
    final: str | None = "zero"
    default_cfg_channels: int | None = None

    def describe(self):
        return {**super().describe(), "spacing": self.spacing, "final_sigma": self.final or "zero"}

    def make_scheduler(self, schedule=TRAINING):
        """The configured scheduler with its timesteps set (kept on the CPU: the loop reads them)."""
        config = dict(self.config)
        if self.final is not None:
            config["final_sigmas_type"] = self.final
        if self.spacing in ("linspace", "trailing"):
            config["timestep_spacing"] = self.spacing
        else:
            config[{"karras": "use_karras_sigmas", "logsnr": "use_exponential_sigmas"}[self.spacing]] = True
        scheduler_class = getattr(importlib.import_module("diffusers"), self.scheduler)
        scheduler = scheduler_class(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas,
                                    prediction_type="epsilon", **config)
        scheduler.set_timesteps(self.steps)
        return scheduler

    def timesteps(self):
        return self.make_scheduler().timesteps.numpy()

    def step_noise_levels(self, scheduler):
        """(N + 1,) float64 noise levels that the N solver steps of a configured scheduler go between."""
        sigmas = scheduler.sigmas.double().numpy()
        if self.final is None:  # Heun's list repeats each inner level: its predictor and corrector steps
            sigmas = np.append(sigmas[0::2], sigmas[-1])
        return sigmas

    def schedule_problem(self):
        fault = _step_fault(self)
        if fault is None:
            return None
        if self.final == "sigma_min" and _step_fault(dataclasses.replace(self, final="zero")) is None:
            return (f"{self.name} with {self.spacing} spacing and the final step sigma_min at {self.steps} steps: the "
                    f"spacing already ends at sigma_min = {TRAINING.sigma(0):.4f}, so the final step would have zero "
                    f"length (a network evaluation for nothing, NaN in third-order solvers); use the final step zero")
        works = next(n for n in range(1, self.steps) if _step_fault(dataclasses.replace(self, steps=n + 1)))
        below = next(n for n in range(self.steps - 1, 0, -1) if _step_fault(dataclasses.replace(self, steps=n)) is None)
        nearest = f" (and {below}, the nearest count below {self.steps})" if below > works else ""
        return (f"{self.name} with --spacing {self.spacing} cannot take {self.steps} steps: diffusers' {self.spacing} "
                f"timesteps {fault}; with --spacing {self.spacing} every count up to {works} works{nearest}, or use "
                f"--spacing karras or logsnr")

    def sample(self, model_fn, z, generators, schedule=TRAINING, progress=False):
        scheduler = self.make_scheduler(schedule)
        noise = {"generator": list(generators)} if self.stochastic else {}
        x = z * scheduler.init_noise_sigma
        for t in tqdm(scheduler.timesteps, desc=f"{self.name} {self.steps} steps", leave=False, disable=not progress):
            output = model_fn(scheduler.scale_model_input(x, t), t.reshape(1).to(z.device).expand(len(z)))
            x = scheduler.step(schedule.epsilon(output, x), t, x, **noise).prev_sample
        return x


@functools.cache
def _step_fault(solver):
    """None if the `steps` steps of a DiffusersSolver each go from a timestep >= 0 to a lower noise level, else how not."""
    scheduler = solver.make_scheduler()
    levels = solver.step_noise_levels(scheduler)
    timesteps = scheduler.timesteps.double().numpy()
    if solver.final is None:
        timesteps = timesteps[0::2]  # Heun: each step's predictor timestep
    if len(timesteps) != solver.steps or timesteps.min() < 0:
        return (f"make {len(timesteps)} steps for {solver.steps}, the last from timestep {timesteps[-1]:g}, outside "
                f"the trained 0..999")
    flat = np.flatnonzero(np.diff(levels) >= 0)
    if len(flat) and flat[0] + 1 < len(timesteps):
        return f"put two steps on timestep {timesteps[flat[0]]:g}, a step of zero length (NaN images)"
    if len(flat):
        return "end at the final noise level, a final step of zero length"
    return None


LAST_STEPS = ("mean", "tweedie", "none")
LAST_STEP_SIZE = 0.04  # SiT's: the stride of 250 steps over [0, 1]
# Beyond these shifts the step times crowd within float32 rounding of t = 1 (the network
# sees the same timestep twice) or of t = 0 (the SDE's score -(x + (1 - t) v) / t overflows).
SHIFT_RANGE = (1e-3, 1e3)


@dataclass(frozen=True)
class FlowSolver(Sampler):
    """Fixed-step solvers for `--objective flow`, integrating from t = 1 (noise) to t = 0 (data).

    method: "euler" or "heun" on the probability-flow ODE dx/dt = v(x, t), or
    "euler-maruyama" on SiT's reverse SDE (Ma et al. 2024, Eq. 7 with its "sigma"
    diffusion coefficient w(t) = t, as REPA samples):

        dx = [v - w(t) score] dt + sqrt(2 w(t)) dW,  score = -(x + (1 - t) v) / t,

    integrated towards decreasing t; it has the ODE's marginals for any w, and w(t) = t
    stays finite at pure noise, where SiT's default ("SBDM", w = t / (1 - t)) diverges
    on this path. One normal draw per image and step from its own generator.

    Times: `steps` intervals uniform in u from 1 to 0, mapped through the time shift
    t = shift u / (1 + (shift - 1) u) (SD3, Esser et al. 2024, Eq. 23: shift > 1 spends
    more steps at high noise; the SDE's last step stays 0.04 long). Heun corrects every step but the last, which ends at
    t = 0 where an Euler step is exact for the x_0 estimate (EDM, Karras et al. 2022,
    Alg. 1): 2 steps - 1 evaluations. The SDE with a last step (`last_step` "mean":
    SiT's default, the drift alone; "tweedie": the x_0 estimate x - t v) runs steps - 1
    stochastic steps from t = 1 to 0.04 and the last step to 0, `steps` evaluations;
    "none" runs all `steps` stochastic steps to t = 0. Our own code: diffusers has no
    scheduler for this SDE, and its FlowMatchEulerDiscreteScheduler would not draw
    per-image noise.
    """
    name: str
    method: str
    stochastic: bool
    steps: int
    shift: float = 1.0
    last_step: str | None = None
    default_cfg_channels: int | None = None
    objective = "flow"

    def describe(self):
        info = {**super().describe(), "time_shift": self.shift}
        return {**info, "last_step": self.last_step} if self.last_step is not None else info

    def times(self):
        """(K,) float64 flow times from 1 down to 0 at which the solver's steps begin and end."""
        def shifted(u):
            return self.shift * u / (1.0 + (self.shift - 1.0) * u)
        if self.last_step in ("mean", "tweedie"):
            # The last step keeps SiT's length in t whatever the shift: a longer deterministic
            # last step would drop the noise of the steps it replaces (variance lost ~ 2 t h).
            u_last = LAST_STEP_SIZE / (self.shift - (self.shift - 1.0) * LAST_STEP_SIZE)
            return np.append(shifted(np.linspace(1.0, u_last, self.steps)), 0.0)
        return shifted(np.linspace(1.0, 0.0, self.steps + 1))

    def timesteps(self):
        t = self.times()
        if self.method == "heun":
            t = np.concatenate([[a, b] if b > 0 else [a] for a, b in zip(t[:-1], t[1:])])
        else:
            t = t[:-1]
        return t * TIMESTEP_SCALE

    def sample(self, model_fn, z, generators, schedule=FLOW, progress=False):
        def velocity(x, t):
            net_t = torch.full((len(x),), t * TIMESTEP_SCALE, dtype=torch.float32, device=x.device)
            return schedule.velocity(model_fn(x, net_t), x)

        times = self.times()
        x = z
        bar = tqdm(total=len(times) - 1, desc=f"{self.name} {self.steps} steps", leave=False, disable=not progress)
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            h = t - t_next
            v = velocity(x, t)
            if self.method == "euler":
                x = x - h * v
            elif self.method == "heun":
                x_euler = x - h * v
                x = x_euler if t_next == 0 else x - h / 2 * (v + velocity(x_euler, t_next))
            else:
                w = t  # the "sigma" diffusion coefficient
                score = -(x + (1.0 - t) * v) / t
                x_mean = x + h * (-v + w * score)
                last = i == len(times) - 2
                if last and self.last_step == "mean":
                    x = x_mean
                elif last and self.last_step == "tweedie":
                    x = x - t * v
                else:
                    noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generators])
                    x = x_mean + float(np.sqrt(2.0 * w * h)) * noise
            bar.update()
        bar.close()
        return x


#################################################################################
#                                   Registry                                    #
#################################################################################

class _SamplerRegistry(dict):
    """name -> prototype sampler; an unknown name lists the available ones."""

    def __missing__(self, name):
        raise KeyError(f"unknown sampler {name!r}; available: {', '.join(self)}")


def _registry():
    dpm, unipc, euler, heun = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                               "HeunDiscreteScheduler")
    samplers = [
        DiffusionLoop("ddpm", "p_sample_loop", "{steps}", stochastic=True, steps=250),
        DiffusionLoop("ddim", "ddim_sample_loop", "ddim{steps}", stochastic=False, steps=50),
        DiffusersSolver("dpm++2m", dpm, (("algorithm_type", "dpmsolver++"), ("solver_order", 2)),
                        stochastic=False, steps=20, spacing="logsnr"),
        DiffusersSolver("dpm++3m", dpm, (("algorithm_type", "dpmsolver++"), ("solver_order", 3)),
                        stochastic=False, steps=20, spacing="logsnr"),
        DiffusersSolver("dpm++2m-sde", dpm, (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)),
                        stochastic=True, steps=20, spacing="logsnr"),
        DiffusersSolver("unipc", unipc, (("solver_order", 2),), stochastic=False, steps=20, spacing="logsnr"),
        DiffusersSolver("euler", euler, (), stochastic=False, steps=20, spacing="karras"),
        DiffusersSolver("heun", heun, (), stochastic=False, steps=20, spacing="karras", final=None),
        FlowSolver("flow-euler", "euler", stochastic=False, steps=50),
        FlowSolver("flow-heun", "heun", stochastic=False, steps=25),
        FlowSolver("flow-sde", "euler-maruyama", stochastic=True, steps=50, last_step="mean"),
    ]
    return _SamplerRegistry((s.name, s) for s in samplers)


SAMPLERS = _registry()


DEFAULT_SAMPLERS = {"ddpm": "ddpm", "flow": "flow-sde"}  # the paper's protocol; SiT's recommended sampler


def samplers_for(objective):
    """Names of the samplers for models trained with `objective`."""
    return [name for name, sampler in SAMPLERS.items() if sampler.objective == objective]


def check_step_count(steps):
    """ValueError (one line) unless 1 <= steps <= 1000, the range every solver takes."""
    if not 1 <= steps <= 1000:
        raise ValueError(f"the number of sampling steps (--num-sampling-steps) must be in 1..1000, got {steps}")


def make_sampler(name, steps=None, spacing=None, final=None, shift=None, last_step=None):
    """The sampler `name` with its recommended settings, or the ones given.

    spacing, final: timestep spacing and final step of a diffusers solver; shift, last_step:
    time shift of a flow solver and last step of flow-sde. Raises ValueError (one line)
    for a step count the solver cannot take or a setting it does not have.
    """
    sampler = SAMPLERS[name]
    changes = {"steps": steps} if steps is not None else {}
    if spacing is not None or final is not None:
        if not isinstance(sampler, DiffusersSolver):
            raise ValueError(f"--spacing (and the final step) are settings of the diffusers solvers "
                             f"({', '.join(n for n, s in SAMPLERS.items() if isinstance(s, DiffusersSolver))}), "
                             f"not of {name}")
        if spacing is not None:
            if spacing not in SPACINGS:
                raise ValueError(f"unknown spacing {spacing!r}; available: {', '.join(SPACINGS)}")
            changes["spacing"] = spacing
        if final is not None:
            if sampler.final is None:
                raise ValueError(f"{name} always ends at sigma = 0")
            if final not in FINAL_STEPS:
                raise ValueError(f"unknown final step {final!r}; available: {', '.join(FINAL_STEPS)}")
            changes["final"] = final
    if shift is not None:
        if not isinstance(sampler, FlowSolver):
            raise ValueError(f"--time-shift is a setting of the flow solvers ({', '.join(samplers_for('flow'))}), "
                             f"not of {name}")
        if not SHIFT_RANGE[0] <= shift <= SHIFT_RANGE[1]:
            raise ValueError(f"--time-shift must be in [{SHIFT_RANGE[0]:g}, {SHIFT_RANGE[1]:g}] (1: no shift; SD3 "
                             f"samples with 3), got {shift:g}: beyond, the step times crowd within float32 rounding "
                             f"of t = 0 or 1")
        changes["shift"] = float(shift)
    if last_step is not None:
        if not isinstance(sampler, FlowSolver) or sampler.last_step is None:
            raise ValueError(f"--last-step is a setting of flow-sde, not of {name}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last step {last_step!r}; available: {', '.join(LAST_STEPS)}")
        changes["last_step"] = last_step
    sampler = dataclasses.replace(sampler, **changes)
    check_step_count(sampler.steps)
    if isinstance(sampler, FlowSolver) and sampler.last_step in ("mean", "tweedie") and sampler.steps < 2:
        raise ValueError(f"flow-sde with --last-step {sampler.last_step} takes at least 2 steps, got {sampler.steps}")
    problem = sampler.schedule_problem()
    if problem is not None:
        raise ValueError(problem)
    sampler.timesteps()  # raises for a step count the solver cannot take (e.g. ddim with no integer stride)
    return sampler
