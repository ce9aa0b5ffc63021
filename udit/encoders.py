"""Frozen image encoders for representation alignment: clean images -> patch features (N, T, D).

REPA (Yu et al., ICLR 2025, arXiv 2410.06940; sihyun-yu/REPA) aligns a hidden state of the
diffusion transformer with the patch tokens of DINOv2 (Oquab et al. 2023) on the clean
image. As REPA feeds it: image / 255, ImageNet mean/std, bicubic resize to 224 px for a
256-px image (448 for 512), the final-normed patch tokens without the class token
(`x_norm_patchtokens`), here built with timm (`vit_{small,base,large}_patch14_dinov2.lvd142m`)
so that no network code is copied. 224 / 14 = 16 x 16 = 256 tokens: the token count of a
/2-patch DiT on 32 x 32 latents.

    encoder = load_encoder("dinov2-vitb14", image_size=256)        # or a file of save_encoder
    features = encoder(images)                                     # (N, 256, 768) float32

A small ViT built and saved by our own code (save_encoder) loads through the same
load_encoder; the digits demo and the tests use one.
"""

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from udit.cli import ActionableError
from udit.hub import hub_unreachable_reason

DINOV2 = {"dinov2-vits14": "vit_small_patch14_dinov2.lvd142m",
          "dinov2-vitb14": "vit_base_patch14_dinov2.lvd142m",
          "dinov2-vitl14": "vit_large_patch14_dinov2.lvd142m"}
LOCAL_FORMAT = "udit-encoder-v1"
PIXELS_PER_TOKEN = 16  # REPA: a 256-px image gives a 16 x 16 token grid


class EncoderError(ActionableError):
    """An encoder that cannot be built or loaded; the message names the file or flag to fix."""


class PatchEncoder(nn.Module):
    """A frozen timm ViT: images (N, 3, S, S) in [-1, 1] -> final-normed tokens, float32.

    The images are mapped to [0, 1], normalised with the ImageNet mean/std and resized
    (bicubic) to `resolution`, a multiple of the patch size. tokens="patch" (REPA): the
    patch tokens (N, T, D), T = (resolution / patch)^2 (`grid` per side), prefix tokens
    (class, registers) dropped. tokens="class" (FD-DINOv2 as EDM2 / dgm-eval compute it):
    the class token (N, D). D = `width`. antialias: low-pass the bicubic downsampling, as
    EDM2's FD-DINOv2 does (REPA does not). The ViT stays in eval mode, never takes gradients.
    """

    def __init__(self, vit, resolution, name, tokens="patch", antialias=False):
        super().__init__()
        patch = vit.patch_embed.patch_size[0]
        if resolution % patch:
            raise EncoderError(f"encoder {name}: resolution {resolution} is not a multiple of its patch size {patch}")
        if tokens not in ("patch", "class"):
            raise EncoderError(f"encoder {name}: tokens={tokens!r}, expected 'patch' or 'class'")
        self.vit = vit.eval().requires_grad_(False)
        self.name, self.resolution, self.grid, self.width = name, resolution, resolution // patch, vit.embed_dim
        self.tokens, self.antialias = tokens, antialias
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        return super().train(False)  # frozen: dropout and the like stay off

    @torch.no_grad()
    def forward(self, images):
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                              antialias=self.antialias)
        tokens = self.vit.forward_features(x)
        if self.tokens == "class":
            return tokens[:, 0].float()
        return tokens[:, self.vit.num_prefix_tokens:].float()


def dinov2_resolution(image_size, patch=14):
    """REPA's input size: one patch per 16 image pixels (224 for 256 px, 448 for 512)."""
    return patch * max(1, image_size // PIXELS_PER_TOKEN)


def encoder_names():
    return list(DINOV2)


def weights_url(name):
    return f"https://huggingface.co/timm/{DINOV2[name]}/resolve/main/model.safetensors"


def cached_weights(name):
    """The timm weights of a DINOv2 name from the Hugging Face cache, downloading them if online.

    Raises EncoderError naming the file to fetch and --encoder-weights when neither works.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    repo = f"timm/{DINOV2[name]}"
    path = try_to_load_from_cache(repo, "model.safetensors")
    if isinstance(path, str):
        return path
    fetch_by_hand = f"download {weights_url(name)} and pass --encoder-weights PATH"
    reason = hub_unreachable_reason()
    if reason:
        raise EncoderError(f"--encoder {name}: no weights in the Hugging Face cache and the hub cannot be reached "
                           f"({reason}); {fetch_by_hand}")
    try:
        return hf_hub_download(repo, "model.safetensors")
    except Exception as err:  # a proxy refusal or hub outage after the reachability check
        raise EncoderError(f"--encoder {name}: could not download its weights ({type(err).__name__}); "
                           f"{fetch_by_hand}") from None


def load_dinov2(name, image_size, weights=None, resolution=None, **options):
    """DINOv2 `name` (see DINOV2) at REPA's resolution for `image_size`, weights from a file or the cache.

    weights: a timm (.safetensors) or original DINOv2 (.pth) state dict; the position
    embedding is resampled to the grid by timm's checkpoint filter. resolution: another
    input size (FD-DINOv2: 224 at every image size); options: PatchEncoder's tokens, antialias.
    """
    path = weights or cached_weights(name)
    if not Path(path).is_file():
        raise EncoderError(f"--encoder-weights {path}: no such file; download {weights_url(name)} there")
    resolution = resolution or dinov2_resolution(image_size)
    vit = timm.create_model(DINOV2[name], pretrained=False, img_size=resolution, num_classes=0)
    try:
        state = timm.models.load_state_dict(str(path), use_ema=False)
        missing, unexpected = vit.load_state_dict(checkpoint_filter_fn(state, vit), strict=False)
    except Exception as err:
        reason = " ".join(str(err).split())[:300] or "unreadable"  # torch's messages span lines
        raise EncoderError(f"--encoder-weights {path}: not {name} weights ({type(err).__name__}: {reason})")
    if missing:
        raise EncoderError(f"--encoder-weights {path}: not {name} weights ({len(missing)} tensors missing, e.g. "
                           f"{missing[0]}); download {weights_url(name)}")
    return PatchEncoder(vit, resolution, name, **options)


def build_local_vit(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0):
    """A small timm VisionTransformer with a class token and a final norm, no head (DINOv2's layout)."""
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=0, global_pool="token")


def save_encoder(vit, config, path):
    """Write a local encoder: its build_local_vit keywords (`config`) and weights, loadable by load_encoder."""
    torch.save({"format": LOCAL_FORMAT, "config": dict(config), "state_dict": vit.state_dict()}, path)


def load_local(path, **options):
    """A PatchEncoder from a save_encoder file, at the resolution it was built for (options: tokens, antialias)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EncoderError(f"--encoder {path}: not an encoder file of udit.encoders.save_encoder ({type(err).__name__})")
    if not isinstance(saved, dict) or saved.get("format") != LOCAL_FORMAT:
        raise EncoderError(f"--encoder {path}: not an encoder file of udit.encoders.save_encoder (no "
                           f"format {LOCAL_FORMAT!r})")
    vit = build_local_vit(**saved["config"])
    vit.load_state_dict(saved["state_dict"])
    return PatchEncoder(vit, saved["config"]["img_size"], str(path), **options)


def load_encoder(name, image_size, weights=None, resolution=None, **options):
    """The frozen encoder `name`: a DINOv2 name (DINOV2) or the path of a save_encoder file.

    resolution (DINOv2 only; a local file keeps its own) and options (PatchEncoder's
    tokens, antialias) default to REPA's use.

    Raises EncoderError (exit 2, one line) for an unknown name, unusable weights, or DINOv2
    weights that are neither given nor in the cache while offline.
    """
    if name in DINOV2:
        return load_dinov2(name, image_size, weights, resolution, **options)
    if weights:
        raise EncoderError(f"--encoder-weights applies to the DINOv2 encoders ({', '.join(DINOV2)}); "
                           f"{name} is a local encoder file")
    if Path(name).is_file():
        return load_local(name, **options)
    raise EncoderError(f"--encoder {name}: unknown encoder; use one of {', '.join(DINOV2)} or the path of a "
                       f"file written by udit.encoders.save_encoder")
