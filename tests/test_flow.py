"""Flow matching (--objective flow): the loss, the time draws, training, resume and fine-tuning."""

import pytest
import torch

import train
from conftest import TINY_UDIT_KWARGS, torchrun
from udit.checkpoint import load_checkpoint
from udit.objectives import EpsilonObjective, FlowObjective, create_objective

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


def test_a_flow_checkpoint_is_not_sampled_with_a_diffusion_sampler(tiny_data, tmp_path, capsys):
    import sample
    assert train.main(["--data-path", str(tiny_data["small_images"]), *PIXEL, "--max-steps", "1", "--objective",
                       "flow", "--results-dir", str(tmp_path)]) == 0
    ckpt = next(tmp_path.glob("*/checkpoints/0000001.pt"))
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ckpt), "--num-sampling-steps", "2", "--output", str(tmp_path / "g.png")])
    assert info.value.code == 2 and "trained with --objective flow" in capsys.readouterr().err
