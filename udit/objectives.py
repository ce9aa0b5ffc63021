"""Training objectives: what the trainer asks of them is a time draw and a loss.

    objective = create_objective(config)          # from a checkpoint's `args` or train.py's settings
    t = objective.sample_time(n, device)          # drawn outside the (possibly graphed) step
    terms = objective.losses(model_fn, x0, t, y)  # per-sample tensors (N,): "loss" and its parts

Two objectives share the training loop, the checkpoints and the sampling scripts:

- `ddpm` (the paper's, ADM / DiT): epsilon prediction with learned-range variance on the
  1000-step linear schedule, loss = MSE + variational bound (diffusion/). Integer
  timesteps t in [0, 1000).
- `flow` (SiT's "Linear" path, Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based
  Generative Models with Scalable Interpolant Transformers"): the straight interpolant
  x_t = (1 - t) x_0 + t eps between data x_0 (t = 0) and Gaussian noise eps (t = 1), and
  the network predicts its velocity v = dx_t/dt = eps - x_0 (loss = MSE). Time runs the
  way noise grows, as in DDPM and rectified flow (SD3); SiT runs it the other way
  (t = 1 is data, velocity x_0 - eps): the same model with t -> 1 - t and v -> -v. The
  network sees 1000 t, the range its timestep embedder was built for, and has C output
  channels (no learned variance). `SiTVelocity` calls a network of SiT's train.py in
  this convention.
"""

import torch

from diffusion import create_diffusion
from diffusion.diffusion_utils import mean_flat

OBJECTIVES = ("ddpm", "flow")
TIME_SAMPLINGS = ("uniform", "logit-normal")
TIMESTEP_SCALE = 1000.0  # flow time t in [0, 1] -> the embedder's 0..1000


class EpsilonObjective:
    """The paper's objective: diffusion/'s training_losses at uniformly drawn integer timesteps."""

    name = "ddpm"

    def __init__(self, learn_sigma=True):
        self.learn_sigma = learn_sigma
        self.diffusion = create_diffusion(timestep_respacing="", learn_sigma=learn_sigma)

    def sample_time(self, n, device):
        """Integer timesteps (N,) uniform in [0, 1000)."""
        return torch.randint(0, self.diffusion.num_timesteps, (n,), device=device)

    def losses(self, model_fn, x0, t, y):
        """Per-sample `loss` (N,), with `mse` and (learned variance) `vb`; draws the noise like x0."""
        return self.diffusion.training_losses(model_fn, x0, t, {"y": y})


class FlowObjective:
    """Velocity prediction on the linear interpolant x_t = (1 - t) x_0 + t eps (see the module docstring).

    time_sampling: "uniform" t ~ U(0, 1), or "logit-normal" t = sigmoid(loc + scale n),
    n ~ N(0, 1) (Esser et al. 2024, SD3, Eq. 19), which spends more steps at mid noise.
    """

    name = "flow"
    learn_sigma = False

    def __init__(self, time_sampling="uniform", loc=0.0, scale=1.0):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time sampling must be one of {', '.join(TIME_SAMPLINGS)}, got {time_sampling!r}")
        if not scale > 0:
            raise ValueError(f"the logit-normal scale must be positive, got {scale}")
        self.time_sampling, self.loc, self.scale = time_sampling, loc, scale

    def sample_time(self, n, device):
        """Times (N,) in (0, 1), float32."""
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.loc + self.scale * torch.randn(n, device=device))

    @staticmethod
    def interpolate(x0, noise, t):
        """x_t = (1 - t) x_0 + t eps and its velocity eps - x_0; t (N,) broadcast over (N, C, H, W)."""
        t = t.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - t) * x0 + t * noise, noise - x0

    def losses(self, model_fn, x0, t, y, noise=None):
        """Per-sample `loss` (N,) = mean over C, H, W of (v_theta(x_t, 1000 t, y) - (eps - x_0))^2."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t, velocity = self.interpolate(x0, noise, t)
        prediction = model_fn(x_t, t * TIMESTEP_SCALE, y=y)
        if prediction.shape != x0.shape:
            raise ValueError(f"flow matching needs a network with {x0.shape[1]} output channels (no learned "
                             f"variance), got {tuple(prediction.shape)}")
        return {"loss": mean_flat((prediction - velocity) ** 2)}


class SiTVelocity(torch.nn.Module):
    """A network trained by SiT's train.py, called as a network of our flow objective.

    SiT (willisma/SiT, transport/path.py ICPlan): x_t = t x_1 + (1 - t) eps with data x_1
    at t = 1, the network sees t in [0, 1] itself (not 1000 t) and predicts the velocity
    x_1 - eps in its first C channels (its default learn_sigma leaves C more, untrained and
    dropped by its own forward). Ours: s = 1 - t, the network sees 1000 s and predicts
    eps - x_0. So  v_ours(x, 1000 s, y) = -v_SiT(x, 1 - s, y).

    net: the SiT network (a DiT of the same size: same layout and state-dict keys).
    forward: x (N, C, H, W), t (N,) our timesteps 1000 s, y (N,) -> velocity (N, C, H, W).
    """

    learn_sigma = False

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y):
        return -self.net(x, 1.0 - t / TIMESTEP_SCALE, y)[:, : x.shape[1]]


def create_objective(config):
    """The objective a training config (or a checkpoint's `args`) names; `ddpm` when it names none."""
    name = config.get("objective", "ddpm")
    if name == "ddpm":
        return EpsilonObjective(config.get("learn_sigma", config.get("model_kwargs", {}).get("learn_sigma", True)))
    if name == "flow":
        return FlowObjective(config.get("time_sampling", "uniform"), config.get("logit_normal_loc", 0.0),
                             config.get("logit_normal_scale", 1.0))
    raise ValueError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")

