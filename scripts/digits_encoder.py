"""The demo's alignment encoder: a small ViT trained on the digits without labels (masked patches).

REPA needs a frozen self-supervised encoder of the clean images; DINOv2 knows nothing of
8 x 8 digits, so `make demo` with REPA=1 trains its own first, on the training split only
and never on labels (the classifier that scores the samples plays no part). The
objective is masked image modelling as in SimMIM (Xie et al., CVPR 2022): half of the
2 x 2 patches are replaced by a learned mask token and a linear head predicts their
pixels from the encoder's final-normed patch tokens, so every token has to carry its
neighbourhood's shape. The ViT sees the images as udit.encoders.PatchEncoder feeds it
(ImageNet normalisation, as PatchEncoder applies it), 4 x 4 tokens of width 32, and is saved with save_encoder.

    python scripts/digits_encoder.py OUT.pt     # on the demo's training digits
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

from udit.encoders import build_local_vit, save_encoder  # noqa: E402

CONFIG = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2)
MASK_RATIO = 0.5


def patchify(images, patch):
    """(N, C, H, W) -> (N, H W / p^2, p^2 C): each patch's pixels, in the token order of timm's ViT."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


class MaskedPatchModel(nn.Module):
    """A ViT (build_local_vit) with a mask token and a pixel head: the SimMIM objective on its patch tokens."""

    def __init__(self, config=CONFIG):
        super().__init__()
        self.vit = build_local_vit(**config)
        self.patch = config["patch_size"]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config["embed_dim"]))
        self.head = nn.Linear(config["embed_dim"], self.patch ** 2 * 3)
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    def loss(self, images, generator=None):
        """Mean squared error on the masked patches of images (N, 3, S, S) in [-1, 1] (their pixels in [-1, 1])."""
        x = ((images + 1) / 2 - self.mean) / self.std
        tokens = self.vit.patch_embed(x)
        mask = torch.rand(tokens.shape[:2], generator=generator) < MASK_RATIO
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        hidden = self.vit.norm(self.vit.blocks(self.vit._pos_embed(tokens)))[:, self.vit.num_prefix_tokens:]
        error = (self.head(hidden) - patchify(images, self.patch)).square().mean(-1)
        return (error * mask).sum() / mask.sum().clamp(min=1)


def train_encoder(images, out, steps=1500, batch_size=128, lr=1e-3, seed=0):
    """Train on uint8 digits (N, 8, 8) and save the ViT to `out` (udit.encoders.save_encoder); returns the losses."""
    torch.manual_seed(seed)
    data = torch.from_numpy(np.asarray(images, dtype=np.float32) / 127.5 - 1)[:, None].expand(-1, 3, -1, -1)
    model = MaskedPatchModel()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = data[torch.randint(len(data), (batch_size,), generator=generator)]
        loss = model.loss(batch, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
        losses.append(loss.item())
    save_encoder(model.vit, CONFIG, out)
    return losses


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo import digits, split
    (train_x, _), _ = split(*digits())
    start = time.time()
    losses = train_encoder(train_x, argv[0])
    print(f"masked-patch loss {np.mean(losses[:50]):.4f} -> {np.mean(losses[-50:]):.4f} in "
          f"{time.time() - start:.0f} s; encoder written to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
