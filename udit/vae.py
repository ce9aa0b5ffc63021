"""The Stable Diffusion VAE (diffusers AutoencoderKL): loading, encoding, decoding.

Latents are normalised with the VAE's own config: z = (posterior sample - shift_factor) *
scaling_factor (0.18215 and no shift for sd-vae-ft-ema/mse; other VAEs differ, e.g. SDXL's
0.13025). The normalisation is recorded in checkpoints and feature stores, and a VAE whose
normalisation differs from the recorded one is refused.
"""

import json
import math
from pathlib import Path

import torch

from udit.cli import ActionableError
from udit.hub import hub_unreachable_reason

SD_VAE_SCALE = 0.18215  # sd-vae-ft-ema/mse; also what the public feature sets were stored with
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


def latent_normalization(vae):
    """(scaling_factor, shift_factor) of a loaded VAE's config; (1, 0) in pixel space."""
    if vae is None:
        return 1.0, 0.0
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_config_normalization(vae, vae_path=None):
    """(scaling_factor, shift_factor) of --vae / --vae-path without loading weights (reads config.json)."""
    if vae == "none":
        return 1.0, 0.0
    if not vae_path:
        return SD_VAE_SCALE, 0.0  # the config of stabilityai/sd-vae-ft-{ema,mse}
    config_file = Path(vae_path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise VAEUnavailable(f"--vae-path {vae_path}: cannot read {config_file} ({err}); expected a diffusers "
                             f"VAE folder") from None
    return float(config.get("scaling_factor", SD_VAE_SCALE)), float(config.get("shift_factor") or 0.0)


def check_latent_normalization(recorded, actual, recorded_by, vae_name):
    """Refuse latents normalised with other constants than the VAE that will decode or extend them."""
    if recorded is None:
        return
    if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(recorded, actual)):
        raise ValueError(f"{recorded_by} holds latents normalised with scaling factor {recorded[0]:g} and shift "
                         f"{recorded[1]:g}, but {vae_name} has {actual[0]:g} and {actual[1]:g}; name the VAE "
                         f"the latents were made with (--vae / --vae-path)")


@torch.no_grad()
def encode(vae, images, generator=None):
    """Images (N, 3, H, W) in [-1, 1] -> normalised posterior samples (N, C, H/f, W/f)."""
    if vae is None:
        return images
    scale, shift = latent_normalization(vae)
    return (vae.encode(images).latent_dist.sample(generator) - shift) * scale


@torch.no_grad()
def encode_moments(vae, images):
    """Images -> normalised posterior (mean, std), each (N, C, H/f, W/f)."""
    scale, shift = latent_normalization(vae)
    dist = vae.encode(images).latent_dist
    return (dist.mean - shift) * scale, dist.std * scale


@torch.no_grad()
def decode(vae, latents):
    """Normalised latents -> images (N, 3, H, W) in [-1, 1] (pixel space: the input itself)."""
    if vae is None:
        return latents
    scale, shift = latent_normalization(vae)
    return vae.decode(latents / scale + shift).sample


def to_uint8(images):
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), as clamp(127.5 x + 128, 0, 255)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
