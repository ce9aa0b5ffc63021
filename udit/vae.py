"""The Stable Diffusion VAE (diffusers AutoencoderKL): loading, encoding, decoding."""

from pathlib import Path

import torch

from udit.cli import ActionableError
from udit.hub import hub_unreachable_reason

LATENT_SCALE = 0.18215
VAE_CHOICES = ("ema", "mse", "none")


class VAEUnavailable(ActionableError):
    """The VAE could not be loaded; the message says what to fetch and where to put it."""


def vae_source(vae, vae_path=None):
    """Local folder if given, else the hub id stabilityai/sd-vae-ft-{ema,mse}."""
    return str(vae_path) if vae_path else f"stabilityai/sd-vae-ft-{vae}"


def load_vae(vae, vae_path=None, device="cpu"):
    """AutoencoderKL in eval mode without gradients, or None for pixel space (vae == 'none')."""
    if vae == "none":
        return None
    if vae not in VAE_CHOICES:
        raise ValueError(f"--vae must be one of {', '.join(VAE_CHOICES)}, got {vae!r}")
    from diffusers.models import AutoencoderKL
    source = vae_source(vae, vae_path)
    if vae_path and not Path(vae_path).is_dir():
        raise VAEUnavailable(f"--vae-path {vae_path}: no such folder; expected a diffusers VAE folder "
                             f"(config.json and diffusion_pytorch_model.safetensors)")
    fetch_by_hand = (f"download https://huggingface.co/stabilityai/sd-vae-ft-{vae} (config.json and "
                     f"diffusion_pytorch_model.safetensors) into a folder and pass --vae-path FOLDER")
    try:
        model = AutoencoderKL.from_pretrained(source, local_files_only=True)  # a local folder or the hub cache
    except (OSError, ValueError) as err:
        if vae_path:
            raise VAEUnavailable(f"--vae-path {vae_path}: not a diffusers VAE folder ({str(err).splitlines()[0]})") from None
        reason = hub_unreachable_reason()
        if reason:
            raise VAEUnavailable(f"the VAE {source} is not cached and the hub cannot be reached ({reason}); "
                                 f"{fetch_by_hand}") from None
        try:
            model = AutoencoderKL.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise VAEUnavailable(f"could not load the VAE {source} ({str(err).splitlines()[0]}); {fetch_by_hand}") from None
    return model.to(device).eval().requires_grad_(False)


def latent_factor(vae):
    """Spatial downsampling of the VAE (8 for the SD VAE); 1 in pixel space."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae):
    return 3 if vae is None else vae.config.latent_channels


@torch.no_grad()
def encode(vae, images, generator=None):
    """Images (N, 3, H, W) in [-1, 1] -> scaled posterior samples (N, C, H/f, W/f)."""
    if vae is None:
        return images
    return vae.encode(images).latent_dist.sample(generator).mul_(LATENT_SCALE)


@torch.no_grad()
def encode_moments(vae, images):
    """Images -> scaled posterior (mean, std), each (N, C, H/f, W/f)."""
    dist = vae.encode(images).latent_dist
    return dist.mean * LATENT_SCALE, dist.std * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents):
    """Scaled latents -> images (N, 3, H, W) in [-1, 1] (pixel space: the input itself)."""
    if vae is None:
        return latents
    return vae.decode(latents / LATENT_SCALE).sample


def to_uint8(images):
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), as clamp(127.5 x + 128, 0, 255)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
