"""Flow matching (--objective flow): the loss, the time draws, training, resume, fine-tuning and sampling."""

import json
import sys

import numpy as np
import pytest
import torch

import train
import udit.cuda_graphs as cuda_graphs
from conftest import TINY_UDIT_KWARGS, randomize, run_script, tiny_udit, torchrun
from test_cuda_graphs import Recorder
from udit.checkpoint import load_checkpoint
from udit.objectives import EpsilonObjective, FlowObjective, create_objective
from udit.sampling import generate
from udit.samplers import FLOW, SAMPLERS, Guidance, GuidedModel, make_sampler

PIXEL = ["--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS, "--vae", "none", "--image-size", "16",
         "--num-classes", "2", "--global-batch-size", "4", "--num-workers", "0", "--log-every", "1",
         "--sample-steps", "2"]


def test_flow_loss_is_the_velocity_mse_written_out():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0, 1, 1])
    weight = torch.randn(4, 4, generator=g)
    seen = {}

    def model_fn(x, timestep, y):
        seen["x"], seen["t"] = x, timestep
        return torch.einsum("dc,nchw->ndhw", weight, x) + timestep.view(-1, 1, 1, 1) / 1000

    terms = FlowObjective().losses(model_fn, x0, t, y, noise=noise)
    for i, ti in enumerate(t.tolist()):
        x_t = (1 - ti) * x0[i] + ti * noise[i]
        prediction = torch.einsum("dc,chw->dhw", weight, x_t) + ti
        expected = ((prediction - (noise[i] - x0[i])) ** 2).mean()
        assert torch.allclose(terms["loss"][i], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(seen["t"], t * 1000) and torch.equal(seen["x"][0], x0[0]) and torch.equal(seen["x"][2], noise[2])


def test_logit_normal_times_have_the_stated_distribution():
    from scipy import stats
    torch.manual_seed(0)
    loc, scale = 0.5, 1.2
    draws = FlowObjective("logit-normal", loc, scale).sample_time(20_000, "cpu").double().numpy()

    def cdf(t):
        return stats.norm.cdf((torch.logit(torch.as_tensor(t)).numpy() - loc) / scale)
    assert stats.kstest(draws, cdf).pvalue > 0.01
    assert stats.kstest(FlowObjective().sample_time(20_000, "cpu").double().numpy(), cdf).pvalue < 1e-6
    assert stats.kstest(draws, stats.uniform.cdf).pvalue < 1e-6


def test_the_paper_objective_draws_and_loses_as_diffusion_does():
    from diffusion import create_diffusion
    model = torch.nn.Conv2d(4, 8, 1)
    x0, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    objective = create_objective({})
    assert isinstance(objective, EpsilonObjective) and objective.learn_sigma

    def fn(x, t, y):
        return model(x)
    torch.manual_seed(1)
    t = objective.sample_time(2, "cpu")
    ours = objective.losses(fn, x0, t, y)
    torch.manual_seed(1)
    t_ref = torch.randint(0, 1000, (2,))
    reference = create_diffusion("").training_losses(fn, x0, t_ref, {"y": y})
    assert torch.equal(t, t_ref) and all(torch.equal(ours[k], reference[k]) for k in ("loss", "mse", "vb"))


def test_flow_run_with_two_processes_resumed_halfway_is_bitwise_the_straight_run(tiny_data, tmp_path):
    flow = ["--data-path", tiny_data["small_images"], "--objective", "flow", "--time-sampling", "logit-normal",
            "--ckpt-every", "100", *PIXEL]
    torchrun("train.py", *flow, "--max-steps", "4", "--results-dir", tmp_path / "a")
    torchrun("train.py", *flow, "--max-steps", "2", "--results-dir", tmp_path / "b")
    interrupted = next((tmp_path / "b").iterdir())
    torchrun("train.py", "--resume", interrupted, "--max-steps", "4")
    full = load_checkpoint(next((tmp_path / "a").glob("*/checkpoints/0000004.pt")))
    resumed = load_checkpoint(interrupted / "checkpoints" / "0000004.pt")
    assert full["args"]["objective"] == "flow" and full["args"]["time_sampling"] == "logit-normal"
    assert full["model"]["final_layer.out_proj.weight"].shape[0] == 3  # C outputs, no learned variance
    for key in ("model", "ema"):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs after resume"


def test_flow_trains_in_bf16_with_gradient_checkpointing(tiny_data, tmp_path):
    assert train.main(["--data-path", str(tiny_data["small_images"]), *PIXEL, "--max-steps", "2", "--objective", "flow",
                       "--precision", "bf16", "--grad-checkpointing", "--results-dir", str(tmp_path)]) == 0
    ckpt = load_checkpoint(next(tmp_path.glob("*/checkpoints/0000002.pt")))
    assert ckpt["args"]["precision"] == "bf16" and ckpt["args"]["objective"] == "flow"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_fine_tuning_across_objectives_is_refused_unless_asked(tiny_data, tmp_path, capsys):
    data = ["--data-path", str(tiny_data["small_images"]), *PIXEL, "--max-steps", "1"]
    assert train.main([*data, "--results-dir", str(tmp_path / "ddpm")]) == 0
    ddpm = next((tmp_path / "ddpm").glob("*/checkpoints/0000001.pt"))
    flow = [*data, "--objective", "flow", "--ckpt", str(ddpm), "--results-dir", str(tmp_path / "flow")]
    assert train.main(flow) == 2
    assert "trained with --objective ddpm, this run uses --objective flow; add --allow-objective-change" in \
        capsys.readouterr().err
    assert train.main([*flow, "--allow-objective-change"]) == 0
    log = next((tmp_path / "flow").glob("*/log.txt")).read_text()
    assert "2 tensors of another shape start fresh (final_layer.out_proj.weight, final_layer.out_proj.bias)" in log
    tuned = load_checkpoint(next((tmp_path / "flow").glob("*/checkpoints/0000001.pt")))
    assert tuned["args"]["objective"] == "flow"


@pytest.mark.parametrize("flags, message", [
    (["--time-sampling", "logit-normal"], "apply to --objective flow only"),
    (["--objective", "flow", "--logit-normal-scale", "2"], "apply to --time-sampling logit-normal only"),
    (["--objective", "flow", "--time-sampling", "logit-normal", "--logit-normal-scale", "0"], "must be positive"),
    (["--objective", "flow", "--model-kwargs", '{"learn_sigma": true}'], "without a learned variance"),
    (["--allow-objective-change"], "goes with --ckpt"),
    (["--objective", "flow", "--time-sampling", "logit-normal", "--logit-normal-loc", "nan"],
     "--logit-normal-loc: must be a finite number, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number, got inf"),
])
def test_objective_flags_that_cannot_work_exit_2(tiny_data, flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--data-path", str(tiny_data["small_images"]), *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_chosen_block_output_is_reachable_for_alignment_losses():
    from conftest import tiny_udit
    from models import capture_block_outputs, create_model
    model = tiny_udit().train()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2])
    torch.manual_seed(0)
    plain = model(x, t, y)
    with capture_block_outputs(model, ["latent.0", "encoder_level_2.0"]) as features:
        torch.manual_seed(0)
        out = model(x, t, y)
    assert torch.equal(out, plain)
    assert features["latent.0"].shape == (2, 4, 4, 128) and features["encoder_level_2.0"].shape == (2, 8, 8, 64)
    features["latent.0"].square().mean().backward()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0 and model.final_layer.out_proj.weight.grad is None
    assert not model.latent[0]._forward_hooks  # removed on leaving
    dit = create_model("DiT-S/8", input_size=16, hidden_size=32, num_heads=2, depth=2, num_classes=2)
    with capture_block_outputs(dit, ["blocks.1"]) as features:
        dit(x, t, torch.tensor([0, 1]))
    assert features["blocks.1"].shape == (2, 4, 32)
    with pytest.raises(KeyError, match="no block named 'latent.9'; blocks: encoder_level_1.0"):
        with capture_block_outputs(model, ["latent.9"]):
            pass


# ----------------------------------------------------------------- sampling: closed-form data

class GaussianFlow:
    """x_0 ~ N(mu_c, s_c^2) per channel c, and the exact velocity of x_t = (1 - t) x_0 + t eps.

    x_t is Gaussian with mean (1 - t) mu and variance V = (1 - t)^2 s^2 + t^2, so with
    r = x_t - (1 - t) mu: E[eps | x_t] = t r / V and E[x_0 | x_t] = mu + (1 - t) s^2 r / V,
    v = E[eps | x_t] - E[x_0 | x_t]. The ODE keeps r / sqrt(V) fixed: from x_1 = z it
    reaches x_0 = mu + s z. Called as a network: (x, 1000 t, y) -> v.
    """

    def __init__(self, mu=(0.5, -0.3), s=(0.3, 0.8)):
        self.mu, self.s = torch.tensor(mu).view(1, -1, 1, 1), torch.tensor(s).view(1, -1, 1, 1)

    def __call__(self, x, t, y=None):
        t = (t.double() / 1000).view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        r = x - (1 - t) * self.mu
        return (t * r / var - (self.mu + (1 - t) * self.s ** 2 * r / var)).float()


def run_gaussian(name, steps, n=64, **settings):
    """Samples (n, 2, 16, 16) of flow solver `name` driven by the exact velocity, and the exact ODE solution."""
    data = GaussianFlow()
    z = torch.randn(n, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler(name, steps, **settings)
    x = sampler.sample(lambda x, t: data(x, t), z, [torch.Generator().manual_seed(i) for i in range(n)])
    return x, data.mu + data.s * z, data


# Variance error |var / var_exact - 1| at the recommended steps (64 x 256 values per
# channel): Heun (25 steps, 49 evaluations) 1.3%, Euler (50) 7%, first order.
FLOW_ODE_TOLERANCE = {"flow-euler": 0.1, "flow-heun": 0.03}


@pytest.mark.parametrize("name", sorted(FLOW_ODE_TOLERANCE))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_ode_solvers_converge_to_the_exact_flow_on_gaussian_data(name, shift):
    errors = [(x - exact).pow(2).mean().sqrt().item()
              for x, exact, _ in (run_gaussian(name, steps, shift=shift) for steps in (5, 10, 20, 50))]
    assert all(a > b for a, b in zip(errors, errors[1:])), f"{name}: no convergence, rms errors {errors}"
    order = 2 if name == "flow-heun" else 1  # halving the step divides the error by about 2^order
    assert errors[-2] / errors[-1] > 0.8 * (50 / 20) ** order
    if shift == 1.0:
        x, exact, _ = run_gaussian(name, SAMPLERS[name].steps)
        assert (x.mean((0, 2, 3)) - exact.mean((0, 2, 3))).abs().max() < 0.005
        assert (x.var((0, 2, 3)) / exact.var((0, 2, 3)) - 1).abs().max() < FLOW_ODE_TOLERANCE[name]


@pytest.mark.parametrize("last_step, steps, tolerance", [
    ("mean", 50, 0.08),  # the drift-only last step drops the noise 2 t h = 0.0032 of s^2 = 0.09: 4-6% low
    ("tweedie", 50, 0.05), ("none", 250, 0.03)])
def test_flow_sde_reaches_the_data_distribution(last_step, steps, tolerance):
    """Mean and variance of the samples against the data's (sampling error: about 1% in variance)."""
    x, _, data = run_gaussian("flow-sde", steps, last_step=last_step)
    assert (x.mean((0, 2, 3)) - data.mu.flatten()).abs().max() < 0.02
    assert (x.var((0, 2, 3)) / data.s.flatten() ** 2 - 1).abs().max() < tolerance


def test_flow_solver_times_and_evaluation_counts():
    assert np.allclose(make_sampler("flow-euler", 4).times(), [1, 0.75, 0.5, 0.25, 0])
    assert np.allclose(make_sampler("flow-euler", 4, shift=3.0).times(), [1, 0.9, 0.75, 0.5, 0])
    sde = make_sampler("flow-sde", 5, shift=3.0).times()
    assert sde[0] == 1 and np.isclose(sde[-2], 0.04) and sde[-1] == 0 and len(sde) == 6
    assert np.allclose(make_sampler("flow-heun", 3).timesteps(), [1000, 2000 / 3, 2000 / 3, 1000 / 3, 1000 / 3])
    assert FLOW.sigma(1000) == float("inf") and FLOW.sigma(0) == 0 and np.isclose(FLOW.sigma(750), 3.0)
    assert make_sampler("flow-sde", 10, last_step="none").describe() == {
        "sampler": "flow-sde", "steps": 10, "time_shift": 1.0, "last_step": "none"}


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "ddpm", "shift": 2.0}, "--time-shift is a setting of the flow solvers"),
    ({"name": "flow-euler", "shift": 0.0}, "must be in \\[0.001, 1000\\]"),
    ({"name": "flow-euler", "shift": float("inf")}, "must be in \\[0.001, 1000\\]"),
    ({"name": "flow-sde", "shift": 1e4}, "float32 rounding of t = 0 or 1"),
    ({"name": "flow-heun", "last_step": "mean"}, "--last-step is a setting of flow-sde"),
    ({"name": "flow-sde", "last_step": "euler"}, "unknown last step"),
    ({"name": "flow-sde", "steps": 1}, "at least 2 steps"),
    ({"name": "flow-euler", "spacing": "karras"}, "settings of the diffusers solvers"),
])
def test_flow_sampler_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**kwargs)


# ----------------------------------------------------------------- sampling: guidance and determinism

class VelocityLog:
    """A network that records each call's batch size, timestep and labels; output depends on all three."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((len(x), float(t[0]), y.tolist()))
        return 0.1 * x + 1e-3 * t.view(-1, 1, 1, 1) + 0.01 * y.view(-1, 1, 1, 1)


@pytest.mark.parametrize("name", ["flow-heun", "flow-sde"])
def test_flow_guidance_interval_is_in_sigma_and_skips_the_unconditional_pass(name):
    log = VelocityLog()
    sampler = make_sampler(name, 10)
    guidance = Guidance(scale=3.0, interval=(0.5, 3.0)).for_sampler(sampler)
    model_fn = GuidedModel(log, torch.tensor([1, 0]), 2, guidance, sampler.guided_evaluations(guidance))
    sampler.sample(model_fn, torch.randn(2, 3, 2, 2), [torch.Generator().manual_seed(i) for i in range(2)])
    # sigma = t / (1 - t): the interval (0.5, 3] is 1/3 < t <= 3/4
    inside = [1 / 3 < t / 1000 <= 3 / 4 for _, t, _ in log.calls]
    assert 0 < sum(inside) < len(inside)
    for (batch, _, labels), guided in zip(log.calls, inside):
        assert (batch, labels) == ((4, [1, 0, 2, 2]) if guided else (2, [1, 0]))
    assert model_fn.evaluations == sampler.evaluations_per_image(guidance)["total"] == len(log.calls) + sum(inside)
    assert guidance.channels is None  # flow solvers guide the whole velocity by default


TINY = {"in_channels": 3, "latent_size": 16, "num_classes": 4, "trained_labels": [0, 1, 2, 3], "objective": "flow"}


@pytest.fixture(scope="module")
def flow_net():
    return randomize(tiny_udit(in_channels=3, num_classes=4, learn_sigma=False), seed=0).eval()


def test_flow_autoguidance_with_the_main_model_as_guide_is_unguided(flow_net):
    sampler = make_sampler("flow-sde", 4)
    with torch.no_grad():
        plain, _ = generate(flow_net, None, TINY, 0, range(3), sampler)
        self_guided, _ = generate(flow_net, None, TINY, 0, range(3), sampler, Guidance(scale=3.0, guide=flow_net))
        other = randomize(tiny_udit(in_channels=3, num_classes=4, learn_sigma=False), seed=1).eval()
        guided, _ = generate(flow_net, None, TINY, 0, range(3), sampler, Guidance(scale=3.0, guide=other))
    assert torch.equal(self_guided, plain)
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_flow_sde_images_depend_only_on_their_own_index(flow_net):
    sampler = make_sampler("flow-sde", 5)
    with torch.no_grad():
        all_four, _ = generate(flow_net, None, TINY, 7, [0, 1, 2, 3], sampler, Guidance(scale=2.0))
        alone, _ = generate(flow_net, None, TINY, 7, [2], sampler, Guidance(scale=2.0))
        again, _ = generate(flow_net, None, TINY, 7, [0, 1, 2, 3], sampler, Guidance(scale=2.0))
    assert torch.equal(all_four, again)
    assert torch.allclose(all_four[2], alone[0], atol=1e-4)  # another batch size changes only float rounding
    assert not torch.allclose(all_four[0], all_four[1], atol=1e-2)


def test_flow_solvers_replay_cuda_graphs(flow_net, monkeypatch):
    """With an interval the batch alternates between N and 2N: one graph for each, recorded once."""
    monkeypatch.setattr(cuda_graphs, "capture", lambda fn: Recorder(fn))
    Recorder.recorded = 0
    guidance = Guidance(scale=3.0, interval=(0.5, 3.0))
    with torch.no_grad():
        graphed, _ = generate(flow_net, None, TINY, 0, range(2), make_sampler("flow-heun", 6), guidance,
                              cuda_graph=True)
        eager, _ = generate(flow_net, None, TINY, 0, range(2), make_sampler("flow-heun", 6), guidance)
    assert Recorder.recorded == 2
    assert torch.equal(graphed, eager)


def test_a_sampler_of_the_other_objective_is_refused(flow_net):
    with pytest.raises(ValueError, match="unipc samples models trained with --objective ddpm.*flow-euler, flow-heun, "
                                         "flow-sde"):
        generate(flow_net, None, TINY, 0, range(1), "unipc")


# ----------------------------------------------------------------- sampling: the scripts

@pytest.fixture(scope="module")
def flow_ckpt(tiny_data, tmp_path_factory):
    """A train.py checkpoint of a tiny pixel-space U-DiT trained for 2 steps with --objective flow."""
    results = tmp_path_factory.mktemp("flow")
    assert train.main(["--data-path", str(tiny_data["small_images"]), *PIXEL, "--max-steps", "2", "--objective",
                       "flow", "--results-dir", str(results)]) == 0
    return next(results.glob("*/checkpoints/0000002.pt"))


@pytest.mark.parametrize("flags", [
    [],  # the default for a flow checkpoint: flow-sde
    ["--sampler", "flow-heun", "--time-shift", "2", "--cfg-interval", "0.5", "inf"],
])
def test_flow_one_and_two_processes_and_a_resumed_run_give_one_npz(flow_ckpt, tmp_path, flags):
    args = ["--ckpt", str(flow_ckpt), "--num-sampling-steps", "4", "--num-fid-samples", "5",
            "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "one"), *flags]
    run_script([sys.executable, "sample_ddp.py", *args])
    two = [str(tmp_path / "two") if a == str(tmp_path / "one") else a for a in args]
    out = torchrun("sample_ddp.py", *two)
    (npz,) = (tmp_path / "one").glob("*.npz")
    (npz_two,) = (tmp_path / "two").glob("*.npz")
    assert npz.read_bytes() == npz_two.read_bytes()
    info = json.loads(npz.with_suffix(".json").read_text())
    if flags:  # Heun: 7 evaluations, guided where sigma > 0.5 (t > 1/3): t = 1, 0.86, 0.86, 0.67, 0.67, 0.4, 0.4
        assert (info["sampler"], info["time_shift"], info["cfg_interval"]) == ("flow-heun", 2.0, [0.5, "inf"])
        assert info["nfe_per_image"] == 7 + 7
    else:
        assert (info["sampler"], info["last_step"], info["nfe_per_image"], info["cfg_channels"]) == \
            ("flow-sde", "mean", 8, "all")
    assert f"{info['nfe_per_image']} network evaluations per image" in out
    folder = npz_two.with_suffix("")
    for png in sorted(folder.glob("*.png"))[1::2]:
        png.unlink()
    npz_two.unlink()
    assert "(3 already there)" in run_script([sys.executable, "sample_ddp.py", *two])
    assert npz_two.read_bytes() == npz.read_bytes()


@pytest.mark.parametrize("which, sampler, message", [
    ("flow", "ddpm", "--sampler ddpm samples models trained with --objective ddpm; this one was trained with "
                     "--objective flow: use one of flow-euler, flow-heun, flow-sde"),
    ("ddpm", "flow-sde", "--sampler flow-sde samples models trained with --objective flow; this one was trained with "
                         "--objective ddpm: use one of ddpm, ddim, dpm++2m"),
])
def test_a_sampler_that_does_not_fit_the_checkpoint_exits_2(flow_ckpt, tiny_data, tmp_path, which, sampler, message,
                                                            capsys):
    import sample
    if which == "ddpm":
        assert train.main(["--data-path", str(tiny_data["small_images"]), *PIXEL, "--max-steps", "1",
                           "--results-dir", str(tmp_path)]) == 0
    ckpt = flow_ckpt if which == "flow" else next(tmp_path.glob("*/checkpoints/0000001.pt"))
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ckpt), "--sampler", sampler, "--output", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1


def test_a_flow_guide_for_a_ddpm_model_exits_2(flow_ckpt, tiny_data, tmp_path, capsys):
    import sample
    assert train.main(["--data-path", str(tiny_data["small_images"]), *PIXEL, "--max-steps", "1",
                       "--results-dir", str(tmp_path)]) == 0
    ddpm = next(tmp_path.glob("*/checkpoints/0000001.pt"))
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ddpm), "--guide-ckpt", str(flow_ckpt), "--output", str(tmp_path / "g.png")])
    assert info.value.code == 2 and "it differs in objective (guide flow, main ddpm)" in capsys.readouterr().err


def test_flow_runs_draw_sample_grids(flow_ckpt):
    grids = sorted((flow_ckpt.parents[1] / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["0000002.png"]
