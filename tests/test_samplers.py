"""udit/samplers.py: every solver on closed-form data, against diffusers' own loop, guidance and its accounting."""

import functools
import re

import diffusers
import numpy as np
import pytest
import torch

import udit.cuda_graphs as cuda_graphs
from diffusion import create_diffusion
from models import U_DiT
from conftest import randomize, tiny_udit
from test_cuda_graphs import Recorder
from udit.sampling import accounting, describe_run, generate, initial_draws, seeded_generator
from udit.samplers import (FLOW, SAMPLERS, SHIFT_RANGE, SPACINGS, DiffusersSolver, Guidance, GuidedModel, VPSchedule,
                           make_sampler)

SCHEDULE = VPSchedule.training()


# ----------------------------------------------------------------- closed-form data

class GaussianData:
    """x_0 ~ N(mu_c, s_c^2) independently per channel c, and its exact epsilon predictor.

    x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps is Gaussian, so E[eps | x_t] =
    sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), and the probability-flow
    ODE maps x_t to x_0 = mu + s (x_t - sqrt(abar) mu) / sqrt(abar s^2 + 1 - abar). Called
    as a network: (x, t, y) -> [epsilon; v] with v = -1 in the learned-variance channels
    (DDPM steps with the posterior variance).
    """

    def __init__(self, mu=(0.5, -0.3), s=(0.3, 0.8)):
        self.mu, self.s = torch.tensor(mu).view(1, -1, 1, 1), torch.tensor(s).view(1, -1, 1, 1)

    @staticmethod
    def abar(t):
        sigma = np.exp(np.interp(t.double().cpu().numpy(), np.arange(1000), SCHEDULE.log_sigmas))
        return torch.from_numpy(1 / (1 + sigma ** 2)).float().view(-1, 1, 1, 1)

    def __call__(self, x, t, y=None):
        abar = self.abar(t)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * self.mu) / (abar * self.s ** 2 + 1 - abar)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    def ode_solution(self, z, t):
        """x_0 that the exact probability-flow ODE reaches from x_t = z."""
        abar = float(self.abar(torch.tensor([float(t)])))
        return self.mu + self.s * (z - abar ** 0.5 * self.mu) / (abar * self.s ** 2 + 1 - abar) ** 0.5


def run_closed_form(name, steps, n=64):
    """Samples (n, 2, 16, 16) of `name` with the exact predictor, and the exact ODE solution from the same noise."""
    data = GaussianData()
    z = torch.randn(n, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler(name, steps)
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    x = sampler.sample(lambda x, t: data(x, t), z, generators)
    return x, data.ode_solution(z, sampler.timesteps()[0])


# Variance error |var / var_exact - 1| per channel at the recommended step count (the
# registry's), measured with 64 x 256 values per channel: second- and third-order
# multistep solvers 2-3%, Heun (39 evaluations) 9-12%, the first-order ones (Euler on
# Karras sigmas, DDIM) undershoot by 16-30%. Stated tolerances:
ODE_TOLERANCE = {"ddim": 0.2, "dpm++2m": 0.05, "dpm++3m": 0.05, "unipc": 0.05, "euler": 0.35, "heun": 0.15}


@pytest.mark.parametrize("name", sorted(ODE_TOLERANCE))
def test_ode_solvers_converge_to_the_exact_flow_on_gaussian_data(name):
    errors = []
    for steps in (5, 10, 20, 50):
        x, exact = run_closed_form(name, steps)
        errors.append((x - exact).pow(2).mean().sqrt().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), f"{name}: no convergence, rms errors {errors}"
    assert errors[-1] < 0.04, f"{name}: rms error {errors[-1]:.4f} at 50 steps"
    x, exact = run_closed_form(name, SAMPLERS[name].steps)
    assert (x.mean((0, 2, 3)) - exact.mean((0, 2, 3))).abs().max() < 0.01
    assert (x.var((0, 2, 3)) / exact.var((0, 2, 3)) - 1).abs().max() < ODE_TOLERANCE[name]


@pytest.mark.parametrize("name, steps, tolerance", [("ddpm", 1000, 0.04), ("ddpm", 250, 0.12),
                                                   ("dpm++2m-sde", 50, 0.06), ("dpm++2m-sde", 20, 0.12)])
def test_sde_solvers_reach_the_data_distribution(name, steps, tolerance):
    """Mean and variance of the samples against the data's (sampling error: about 3% in variance)."""
    x, _ = run_closed_form(name, steps)
    data = GaussianData()
    assert (x.mean((0, 2, 3)) - data.mu.flatten()).abs().max() < 0.02
    assert (x.var((0, 2, 3)) / data.s.flatten() ** 2 - 1).abs().max() < tolerance


# ----------------------------------------------------------------- against diffusers' own loop

def diffusers_reference(name, steps, model, z, y, generators):
    """The loop of diffusers' pipelines, with a scheduler built from diffusers' own linear betas."""
    solver = SAMPLERS[name]
    config = dict(solver.config)
    if solver.final is not None:
        config["final_sigmas_type"] = solver.final
    config.update({"karras": {"use_karras_sigmas": True}, "logsnr": {"use_exponential_sigmas": True}}.get(
        solver.spacing, {"timestep_spacing": solver.spacing}))
    scheduler = getattr(diffusers, solver.scheduler)(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", **config)
    scheduler.set_timesteps(steps)
    latents = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(latents, t), t.repeat(len(z)), y)[:, :4]
        kwargs = {"generator": generators} if solver.stochastic else {}
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
    return latents


class TameNet(torch.nn.Module):
    """A network of realistic scale: the exact Gaussian predictor plus a bounded term from a random U-DiT.

    The term depends on x, t and the label, so guidance and solver order matter; a raw
    random U-DiT predicts an epsilon that makes x_0 estimates in the hundreds, where every
    rounding difference is amplified and the decoded images are all clamped.
    """
    learn_sigma = True

    def __init__(self, seed=0):
        super().__init__()
        self.net = randomize(tiny_udit(input_size=8), seed=seed)
        self.data = GaussianData(mu=(0.2, -0.1, 0.0, 0.1), s=(0.3, 0.4, 0.2, 0.3))

    def forward(self, x, t, y):
        out = torch.tanh(self.net(x, t, y))
        return torch.cat([self.data(x, t)[:, :4] + 0.2 * out[:, :4], out[:, 4:]], dim=1)


@pytest.fixture(scope="module")
def net():
    return TameNet().eval()


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if isinstance(s, DiffusersSolver)])
def test_diffusers_solvers_agree_with_diffusers_own_loop(name, net):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])
    sampler = make_sampler(name, 10)
    with torch.no_grad():
        unguided = Guidance(scale=1.0, channels=None)
        ours = sampler.sample(GuidedModel(net, y, 10, unguided, sampler.guided_evaluations(unguided)), z,
                              [torch.Generator().manual_seed(i) for i in range(2)])
        theirs = diffusers_reference(name, 10, net, z, y, [torch.Generator().manual_seed(i) for i in range(2)])
    assert theirs.abs().max() < 5
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- guidance

class CallLog:
    """A network that records each call's batch size, timestep and labels; output depends on all three."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((len(x), float(t[0]), y.tolist()))
        return torch.cat([0.1 * x + 1e-3 * t.view(-1, 1, 1, 1) + 0.01 * y.view(-1, 1, 1, 1)] * 2, dim=1)


@pytest.mark.parametrize("name", ["ddpm", "dpm++2m-sde", "heun"])
def test_guidance_interval_skips_the_unconditional_pass(name):
    log = CallLog()
    sampler = make_sampler(name, 12)
    guidance = Guidance(scale=3.0, interval=(0.5, 5.0)).for_sampler(sampler)
    y = torch.tensor([1, 2, 0])
    model_fn = GuidedModel(log, y, 10, guidance, sampler.guided_evaluations(guidance))
    sampler.sample(model_fn, torch.randn(3, 4, 2, 2), [torch.Generator().manual_seed(i) for i in range(3)])
    inside = [0.5 < SCHEDULE.sigma(t) <= 5.0 for _, t, _ in log.calls]
    assert 0 < sum(inside) < len(inside)
    for (batch, _, labels), guided in zip(log.calls, inside):
        assert (batch, labels) == ((6, [1, 2, 0, 10, 10, 10]) if guided else (3, [1, 2, 0]))
    counted = sampler.evaluations_per_image(guidance)
    assert model_fn.evaluations == sum(batch for batch, _, _ in log.calls) // 3 == counted["total"]
    assert counted == {"main": len(log.calls) + sum(inside), "guide": 0, "total": len(log.calls) + sum(inside)}
    assert sampler.evaluations_per_image(Guidance(scale=3.0))["total"] == 2 * len(log.calls)


def test_autoguidance_calls_the_guide_inside_the_interval_only():
    main, guide = CallLog(), CallLog()
    sampler = make_sampler("dpm++2m", 10)
    guidance = Guidance(scale=2.0, interval=(0.5, 5.0), guide=guide).for_sampler(sampler)
    model_fn = GuidedModel(main, torch.tensor([4, 5]), 10, guidance, sampler.guided_evaluations(guidance))
    sampler.sample(model_fn, torch.randn(2, 4, 2, 2), [])
    assert [c[0] for c in main.calls] == [2] * 10 and all(c[2] == [4, 5] for c in main.calls + guide.calls)
    assert [t for _, t, _ in guide.calls] == [t for _, t, _ in main.calls if 0.5 < SCHEDULE.sigma(t) <= 5.0]
    assert sampler.evaluations_per_image(guidance) == {"main": 10, "guide": len(guide.calls),
                                                       "total": 10 + len(guide.calls)}
    assert (model_fn.evaluations, model_fn.guide_evaluations) == (10, len(guide.calls))


SETTINGS = {"in_channels": 4, "latent_size": 8, "num_classes": 10, "trained_labels": list(range(10))}


@pytest.mark.parametrize("name", ["ddpm", "dpm++2m", "dpm++2m-sde"])
def test_autoguidance_with_the_main_model_as_guide_is_unguided(name, net):
    sampler = make_sampler(name, 4)
    with torch.no_grad():
        plain, _ = generate(net, None, SETTINGS, 0, range(3), sampler)
        self_guided, _ = generate(net, None, SETTINGS, 0, range(3), sampler, Guidance(scale=3.0, guide=net))
        other = TameNet(seed=1).eval()
        guided, _ = generate(net, None, SETTINGS, 0, range(3), sampler, Guidance(scale=3.0, guide=other))
    assert torch.equal(self_guided, plain)
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_guided_ddpm_is_dit_forward_with_cfg(net):
    """The DiT convention kept: guided DDPM through GuidedModel is diffusion/'s loop on DiT's doubled batch
    (U-DiT's forward_with_cfg, run on the test network)."""
    y = torch.tensor([2, 9])
    with torch.no_grad():
        ours, _ = generate(net, None, SETTINGS, 0, range(2), make_sampler("ddpm", 5),
                           Guidance(scale=4.0, channels=3), labels=y)
        _, z = initial_draws(0, range(2), (4, 8, 8), list(range(10)), y)
        gens = [seeded_generator(0, i, 1) for i in range(2)]

        def step_noise(x):
            noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
            return torch.cat([noise, noise])
        dit = create_diffusion("5").p_sample_loop(
            functools.partial(U_DiT.forward_with_cfg, net), (4, 4, 8, 8), torch.cat([z, z]), clip_denoised=False,
            model_kwargs={"y": torch.cat([y, torch.full_like(y, 10)]), "cfg_scale": 4.0}, step_noise=step_noise)[:2]
    assert torch.equal(ours, dit.clamp(-1, 1))  # generate returns decoded images, clamped to [-1, 1]


def test_images_depend_only_on_their_own_index_for_stochastic_solvers(net):
    sampler = make_sampler("dpm++2m-sde", 5)
    guidance = Guidance(scale=2.0, interval=(0.3, 20.0))
    with torch.no_grad():
        all_four, _ = generate(net, None, SETTINGS, 7, [0, 1, 2, 3], sampler, guidance)
        alone, _ = generate(net, None, SETTINGS, 7, [2], sampler, guidance)
        again, _ = generate(net, None, SETTINGS, 7, [0, 1, 2, 3], sampler, guidance)
    assert torch.equal(all_four, again)
    assert torch.allclose(all_four[2], alone[0], atol=1e-4)  # another batch size changes only float rounding
    assert not torch.allclose(all_four[0], all_four[1], atol=1e-2)


def test_cuda_graphs_record_one_graph_per_call_kind(net, monkeypatch):
    """With an interval the batch alternates between N and 2N: one graph for each, recorded once."""
    monkeypatch.setattr(cuda_graphs, "capture", lambda fn: Recorder(fn))
    Recorder.recorded = 0
    sampler = make_sampler("unipc", 8)
    guidance = Guidance(scale=3.0, interval=(0.5, 10.0))
    with torch.no_grad():
        graphed, _ = generate(net, None, SETTINGS, 0, range(2), sampler, guidance, cuda_graph=True)
        eager, _ = generate(net, None, SETTINGS, 0, range(2), sampler, guidance)
    assert Recorder.recorded == 2
    assert torch.equal(graphed, eager)


def test_bf16_solver_samples_stay_close_to_fp32(net):
    """The README's bf16 tolerance (5% relative L2) holds for the diffusers solvers too."""
    sampler = make_sampler("dpm++2m", 8)
    with torch.no_grad():
        fp32, _ = generate(net, None, SETTINGS, 0, range(4), sampler, Guidance(scale=2.0))
        bf16, _ = generate(net, None, SETTINGS, 0, range(4), sampler, Guidance(scale=2.0), precision="bf16")
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.05


def test_sampler_settings_are_checked():
    with pytest.raises(KeyError, match="unknown sampler 'dpm'.*dpm\\+\\+2m"):
        make_sampler("dpm")
    with pytest.raises(ValueError, match="settings of the diffusers solvers"):
        make_sampler("ddpm", spacing="karras")
    with pytest.raises(ValueError, match="integer stride"):
        make_sampler("ddim", 600)
    with pytest.raises(ValueError, match="1..1000"):
        make_sampler("unipc", 0)
    assert Guidance().for_sampler(SAMPLERS["ddpm"]).channels == 3 and Guidance().for_sampler(SAMPLERS["unipc"]).channels is None
    with pytest.raises(ValueError, match="for_sampler"):
        GuidedModel(CallLog(), torch.tensor([0]), 10, Guidance(scale=2.0), [True])
    assert make_sampler("euler", 12, spacing="logsnr").describe() == {
        "sampler": "euler", "steps": 12, "spacing": "logsnr", "final_sigma": "zero"}
    assert len(make_sampler("heun", 10).timesteps()) == 19  # Heun: two evaluations per step but the last


# ----------------------------------------------------------------- what the sampler says is what it runs

class ExactNet(torch.nn.Module):
    """A tiny network: the exact predictor of Gaussian data plus a label term; counts the images it is called on.

    objective "ddpm": [epsilon; v] of GaussianData; "flow": the velocity of test_flow.GaussianFlow. The label
    term (0.005 y in every channel) makes guided and unguided calls differ. `images`: images passed so far, so
    `images / N` is the network evaluations per image of a run on N images. Cheap enough for 1000-step runs.
    """

    def __init__(self, objective="ddpm"):
        super().__init__()
        from test_flow import GaussianFlow
        mu, s = (0.2, -0.1, 0.0, 0.1), (0.3, 0.4, 0.2, 0.3)
        self.predict = GaussianData(mu, s) if objective == "ddpm" else GaussianFlow(mu, s)
        self.label_weight = torch.nn.Parameter(torch.tensor(0.005))  # generate() reads the device off a parameter
        self.learn_sigma = objective == "ddpm"
        self.images = 0

    def forward(self, x, t, y):
        self.images += len(x)
        return self.predict(x, t) + self.label_weight * y.float().view(-1, 1, 1, 1)


def exact_settings(objective):
    return {"in_channels": 4, "latent_size": 2, "num_classes": 10, "trained_labels": list(range(10)),
            "objective": objective}


def noise_levels(sampler):
    """float64 sigma of each network evaluation, from the solver's float64 timesteps (the README's definition)."""
    schedule = FLOW if sampler.objective == "flow" else SCHEDULE
    return [schedule.sigma(t) for t in np.asarray(sampler.timesteps(), dtype=np.float64)]


def nfe_cases(name):
    """(sampler, guidance) over steps, shifts and intervals, including intervals whose bounds are step noise levels."""
    flow = SAMPLERS[name].objective == "flow"
    for steps in {"ddpm": (2, 3, 10), "ddim": (2, 4, 10), "flow-sde": (2, 3, 10)}.get(name, (1, 3, 10)):
        for shift in (1.0, 3.0) if flow else (None,):
            sampler = make_sampler(name, steps, shift=shift)
            levels = sorted(set(noise_levels(sampler)))
            mid = len(levels) // 2
            intervals = [(1.0, 2.0), (0.5, 10.0), (0.0, levels[mid]), (levels[max(mid - 1, 0)], levels[-1])]
            for interval in intervals:
                yield sampler, Guidance(scale=4.0, interval=interval)
            yield sampler, Guidance(scale=2.0, interval=(1.0, 2.0), guide=ExactNet(sampler.objective))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_printed_evaluations_are_the_network_calls(name):
    """accounting()'s NFE (what sample.py prints and sample_ddp.py records) = the calls generate() makes.

    The README's flow-heun 10, shift 3, interval (1, 2] has a step at sigma = 2 exactly; a run that compared
    the float32 timestep it hands the network (sigma 2.0000002) made 21 calls where 23 were printed.
    """
    for sampler, guidance in nfe_cases(name):
        net = ExactNet(sampler.objective)
        with torch.no_grad():
            generate(net, None, exact_settings(sampler.objective), 0, range(2), sampler, guidance)
        printed = accounting(sampler, guidance)
        made = {"main": net.images / 2, "guide": guidance.guide.images / 2 if guidance.guide else 0}
        assert (made["main"], made["guide"]) == (printed["nfe_main_per_image"], printed["nfe_guide_per_image"]), \
            f"{describe_run(printed)}: {made} made"
        assert printed["nfe_per_image"] == made["main"] + made["guide"]
    if name == "flow-heun":
        sampler, guidance = make_sampler(name, 10, shift=3.0), Guidance(scale=4.0, interval=(1.0, 2.0))
        net = ExactNet("flow")
        generate(net, None, exact_settings("flow"), 0, range(1), sampler, guidance)
        assert net.images == accounting(sampler, guidance)["nfe_per_image"] == 23


def accepted_settings(name):
    """Each setting of `name` the CLI can give besides the step count: spacings, time shifts (bounds included)."""
    sampler = SAMPLERS[name]
    if isinstance(sampler, DiffusersSolver):
        return [{"spacing": spacing} for spacing in SPACINGS]
    if sampler.objective == "flow":
        return [{"shift": shift} for shift in (SHIFT_RANGE[0], 0.5, 1.0, 3.0, SHIFT_RANGE[1])]
    return [{}]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_setting_is_refused_at_parse_time_or_gives_finite_images(name):
    """Over spacings / shifts and step counts 1, 2, 61, 769, 999, 1000: refused in one line, or finite images.

    diffusers' linspace timesteps repeat at 1000 steps (NaN for the multistep solvers) and its trailing ones
    add a step to timestep -1 at 61, 769, ... steps (NaN for dpm++3m and unipc at 769). A refusal names the
    count up to which every count works, which must be accepted. Sampled (a tiny exact network, cfg 4): 1 and
    2 steps, the largest accepted count and every named one.
    """
    for setting in accepted_settings(name):
        accepted, named = [], set()
        for steps in (1, 2, 61, 769, 999, 1000):
            try:
                accepted.append(make_sampler(name, steps, **setting))
            except ValueError as err:
                assert "\n" not in str(err)
                works = re.search(r"every count up to (\d+) works", str(err))
                if works:
                    named.add(int(works.group(1)))
        assert accepted, f"{name} {setting}: no count accepted"
        runs = {s.steps: s for s in accepted if s.steps <= 2 or s is accepted[-1]}
        runs.update({steps: make_sampler(name, steps, **setting) for steps in named})
        for steps, sampler in sorted(runs.items()):
            with torch.no_grad():
                images, _ = generate(ExactNet(sampler.objective), None, exact_settings(sampler.objective), 0,
                                     range(1), sampler, Guidance(scale=4.0))
            assert torch.isfinite(images).all(), f"{name} {setting} {steps} steps: non-finite images"


class DivergingNet(ExactNet):
    """The exact network with a NaN in the predictions of label 3, as a diverged or corrupted model gives."""

    def forward(self, x, t, y):
        out = super().forward(x, t, y)
        return torch.where((y == 3).view(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)


@pytest.mark.parametrize("name, objective", [("ddpm", "ddpm"), ("dpm++2m", "ddpm"), ("flow-heun", "flow")])
def test_non_finite_latents_stop_generation_with_one_line_naming_the_settings(name, objective):
    sampler = make_sampler(name, 4, **({"shift": 3.0} if objective == "flow" else {}))
    with torch.no_grad():
        ok, _ = generate(DivergingNet(objective), None, exact_settings(objective), 0, range(3), sampler,
                         Guidance(scale=2.0), labels=[1, 2, 4])
        assert torch.isfinite(ok).all()
        with pytest.raises(ValueError) as info:
            generate(DivergingNet(objective), None, exact_settings(objective), 0, [5, 6, 7], sampler,
                     Guidance(scale=2.0), labels=[1, 3, 4])
    message = str(info.value)
    assert "\n" not in message and "the latents of image 6 are not finite" in message
    assert describe_run(accounting(sampler, Guidance(scale=2.0).for_sampler(sampler))) in message
