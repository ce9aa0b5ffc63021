"""Diffusion schedule, respacing and sampler properties not covered by the golden vectors."""

import numpy as np
import pytest
import torch

from conftest import tiny_udit
from diffusion import create_diffusion, space_timesteps
from diffusion.gaussian_diffusion import get_named_beta_schedule


def test_linear_schedule():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and betas.dtype == np.float64
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_named_beta_schedule("quadratic", 1000)


def test_respacing():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert sorted(space_timesteps(100, "2,3")) == [0, 49, 50, 74, 99]
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(1000, "ddim3000")
    with pytest.raises(ValueError, match="must be like"):
        space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="cannot take 2000"):
        space_timesteps(1000, "2000")


def test_respaced_diffusion_keeps_alphas_cumprod_and_maps_timesteps():
    full, spaced = create_diffusion(""), create_diffusion("ddim50")
    assert spaced.num_timesteps == 50
    assert np.allclose(spaced.alphas_cumprod, full.alphas_cumprod[::20])
    seen = []
    spaced.p_mean_variance(lambda x, t: (seen.append(t), torch.zeros(1, 8, 2, 2))[1],
                           torch.zeros(1, 4, 2, 2), torch.tensor([49]))
    assert seen[0].tolist() == [980]


def sample(diffusion, method, model, z, y, **kwargs):
    return getattr(diffusion, method)(model.forward, z.shape, z.clone(), clip_denoised=False,
                                      model_kwargs={"y": y}, **kwargs)


def test_ddim_eta0_is_deterministic_and_ddpm_depends_on_the_seed():
    model = tiny_udit().eval()
    diffusion = create_diffusion("5")
    z, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 2])
    torch.manual_seed(0)
    a = sample(diffusion, "ddim_sample_loop", model, z, y)
    torch.manual_seed(1)
    b = sample(diffusion, "ddim_sample_loop", model, z, y)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = sample(diffusion, "p_sample_loop", model, z, y)
    torch.manual_seed(0)
    d = sample(diffusion, "p_sample_loop", model, z, y)
    torch.manual_seed(1)
    e = sample(diffusion, "p_sample_loop", model, z, y)
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_progressive_loop_yields_every_step():
    model = tiny_udit().eval()
    diffusion = create_diffusion("4")
    steps = list(diffusion.p_sample_loop_progressive(model.forward, (1, 4, 16, 16),
                                                     model_kwargs={"y": torch.tensor([3])}))
    assert len(steps) == 4 and all(s["sample"].shape == (1, 4, 16, 16) for s in steps)


def test_training_losses_backpropagate_and_are_finite():
    model = tiny_udit().train()
    diffusion = create_diffusion("")
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 500, 999])
    terms = diffusion.training_losses(model, x, t, {"y": torch.tensor([1, 2, 3])})
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (3,)
    assert torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fixed_variance_and_kl_variants():
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 700])
    fixed = create_diffusion("", learn_sigma=False)
    terms = fixed.training_losses(lambda x_t, t: torch.zeros_like(x_t), x, t)
    assert set(terms) == {"loss", "mse"}
    kl = create_diffusion("", use_kl=True)
    terms = kl.training_losses(lambda x_t, t: torch.zeros(2, 8, 8, 8), x, t)
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]).all()


def test_wrong_output_channels_raise():
    diffusion = create_diffusion("")
    with pytest.raises(ValueError, match="needs 8 output channels"):
        diffusion.training_losses(lambda x_t, t: torch.zeros_like(x_t), torch.randn(1, 4, 8, 8), torch.tensor([5]))
