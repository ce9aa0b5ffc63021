"""Encode an ImageFolder with the SD VAE into our compact feature layout (torchrun DDP, resumable).

    torchrun --nproc_per_node=8 extract_features.py --data-path imagenet/train --features-path imagenet256_vae
    python extract_features.py --convert imagenet_feature --features-path imagenet256_vae   # a public folder

For every image the posterior mean and std of the image and of its mirror image are
stored (float16, normalised with the VAE's scaling and shift factors, recorded in meta.json), so training draws a fresh flip and posterior sample
each epoch. A killed run continues where it stopped when rerun with the same command;
the result is identical to an uninterrupted run. --keep-images also stores each centre
crop (uint8) for representation alignment (train.py --repa): training then feeds the
encoder the very image of the latent it draws, mirrored with the mirrored latent.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from udit.cli import ArgumentParser, given_flags, inside, non_negative_int, output_dir, positive_int, run_guarded
from udit.data import COMPACT_LAYOUT, DataError, ImageDataset, open_feature_folder
from udit.distributed import (barrier, cleanup, init_distributed, open_shared_folder, parameter_digest,
                              parse_on_every_process)
from udit.vae import SD_VAE_SCALE, encode_moments, latent_channels, latent_factor, latent_normalization, load_vae


class FeatureStore:
    """features.npy (N, F, 2, C, h, w) float16, labels.npy (N,), done.npy (N,) and meta.json in `root`;
    with meta "images" also images.npy (N, S, S, 3) uint8, the centre crops that were encoded."""

    def __init__(self, root):
        self.root = Path(root)

    @property
    def meta_path(self):
        return self.root / "meta.json"

    def create_or_check(self, meta, shape):
        """Create the arrays, or check that an earlier run made them for the same job."""
        if self.meta_path.is_file():
            old = json.loads(self.meta_path.read_text())
            keys = ("layout", "count", "flips", "latent_shape", "source", "image_size", "vae", "scaling_factor",
                    "shift_factor", "images")
            if "vae_digest" in old and "vae_digest" in meta:
                # The VAE's weights, not its path: a moved copy may finish the store, other weights may not
                # (their latents, mixed in, were silent before).
                keys = tuple(k for k in keys if k != "vae") + ("vae_digest",)
            # Stores from before these were recorded.
            old = {"scaling_factor": SD_VAE_SCALE, "shift_factor": 0.0, "images": False, **old}
            diffs = [f"{k}: {old.get(k)} vs {meta[k]}" for k in keys if old.get(k) != meta[k]]
            if diffs:
                raise DataError(f"{self.root} holds features of another job ({'; '.join(diffs)}); choose another "
                                f"--features-path or delete it")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(self.root / "features.npy", mode="w+", dtype=np.float16, shape=shape).flush()
        np.lib.format.open_memmap(self.root / "labels.npy", mode="w+", dtype=np.int64, shape=(shape[0],)).flush()
        np.lib.format.open_memmap(self.root / "done.npy", mode="w+", dtype=np.uint8, shape=(shape[0],)).flush()
        if meta["images"]:
            size = meta["image_size"]
            np.lib.format.open_memmap(self.root / "images.npy", mode="w+", dtype=np.uint8,
                                      shape=(shape[0], size, size, 3)).flush()
        self.write_meta({**meta, "complete": False})

    def write_meta(self, meta):
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.meta_path)

    def open(self):
        return tuple(np.load(self.root / f"{name}.npy", mmap_mode="r+", allow_pickle=False)
                     for name in ("features", "labels", "done"))

    def open_images(self):
        """images.npy (N, S, S, 3) uint8 for writing, or None for a store without images."""
        path = self.root / "images.npy"
        return np.load(path, mmap_mode="r+", allow_pickle=False) if path.is_file() else None


def chunks_of_rank(count, rank, world_size, batch_size):
    """Fixed batches of this rank's indices (rank, rank + W, ...): the same on every rerun."""
    indices = list(range(rank, count, world_size))
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def extract(store, dataset, to_moments, rank, world_size, batch_size, num_workers, device, show_progress):
    """Fill the store's missing rows; each batch is flushed, then marked done."""
    features, labels, done = store.open()
    images = store.open_images()
    todo = [chunk for chunk in chunks_of_rank(len(dataset), rank, world_size, batch_size) if not done[chunk].all()]
    flat = [i for chunk in todo for i in chunk]
    if not flat:
        return 0
    # Batches of the loader coincide with the fixed chunks: every chunk but the last is full.
    loader = DataLoader(Subset(dataset, flat), batch_sampler=_ChunkSampler([len(c) for c in todo]),
                        num_workers=num_workers)
    skipped = 0
    bar = tqdm(total=len(flat) * world_size, desc="features", unit="img", disable=not show_progress)
    for chunk, (x, y, ok) in zip(todo, loader):
        features[chunk] = to_moments(x.to(device)).cpu().numpy().astype(np.float16)
        labels[chunk] = y.numpy()
        features.flush()
        labels.flush()
        if images is not None:
            images[chunk] = image_bytes(x)
            images.flush()
        done[chunk] = 1
        done.flush()
        skipped += int((~ok).sum())
        bar.update(len(chunk) * world_size)
    bar.close()
    return skipped


class _ChunkSampler:
    """Batch sampler over positions 0..sum(sizes) in consecutive runs of the given sizes."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __iter__(self):
        start = 0
        for size in self.sizes:
            yield list(range(start, start + size))
            start += size


def image_moments(vae, flips):
    def to_moments(x):
        views = [x, x.flip(-1)][:flips]
        moments = [torch.stack(encode_moments(vae, v), dim=1) for v in views]  # each (B, 2, C, h, w)
        return torch.stack(moments, dim=1)  # (B, F, 2, C, h, w)
    return to_moments


def image_bytes(x):
    """(B, 3, S, S) in [-1, 1] from udit.data.image_to_tensor -> the uint8 (B, S, S, 3) it was made of."""
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_moments(x):
    """A stored posterior sample as moments: mean = sample, std = 0, one flip."""
    return torch.stack([x, torch.zeros_like(x)], dim=1)[:, None]


def build_parser():
    p = ArgumentParser(prog="extract_features.py", description=__doc__.strip().splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-path", help="ImageFolder root to encode")
    source.add_argument("--convert", metavar="FOLDER", help="a fast-DiT or U-DiT feature folder to convert")
    p.add_argument("--features-path", required=True, type=output_dir, help="output folder (created; rerun to resume)")
    p.add_argument("--image-size", type=int, choices=[256, 512], default=256)
    p.add_argument("--vae", choices=["ema", "mse"], default="ema")
    p.add_argument("--vae-path", help="local diffusers VAE folder (default: the hub id stabilityai/sd-vae-ft-{ema,mse})")
    p.add_argument("--flips", type=int, choices=[1, 2], default=2, help="store the mirror image's moments too")
    p.add_argument("--keep-images", action="store_true",
                   help="also store the centre-cropped images (uint8, 3 S^2 bytes each) for representation "
                        "alignment (train.py --repa)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per process and batch")
    p.add_argument("--num-workers", type=non_negative_int, default=4, help="data loading processes per process")
    return p


def parse(p, argv):
    """The command line, checked before any work: exits 2 with one line on a bad value."""
    args = p.parse_args(argv)
    ignored = [flag for flag in given_flags(p, argv) if flag in ("image_size", "vae", "vae_path", "flips",
                                                                 "keep_images")]
    if args.convert and ignored:
        p.error(f"--{ignored[0].replace('_', '-')} does not apply to --convert (the folder's latents are stored "
                f"as they are); drop it")
    for flag in ("data_path", "convert", "vae_path"):
        value = getattr(args, flag)
        if value and not Path(value).exists():
            p.error(f"--{flag.replace('_', '-')} {value}: no such file or directory")
    source_flag, source = ("--data-path", args.data_path) if args.data_path else ("--convert", args.convert)
    if inside(args.features_path, source):
        p.error(f"--features-path {args.features_path} is inside {source_flag} {source}: the store would be read "
                f"as part of the input (a class folder, feature files); choose a folder outside it")
    return args


def main(argv=None):
    p = build_parser()
    args = parse_on_every_process("extract_features.py", lambda: parse(p, argv))
    ctx = init_distributed()
    try:
        return run_guarded("extract_features.py", lambda: extract_all(args, ctx))
    finally:
        cleanup()


def extract_all(args, ctx):
    """Create or resume the store, fill this rank's rows, and mark the store complete."""
    store = FeatureStore(args.features_path)
    if args.convert:
        dataset = open_feature_folder(args.convert)
        latent_shape = list(dataset[0][0].shape)
        to_moments, flips = sample_moments, 1
        meta = {"source": str(Path(args.convert).resolve()), "vae": "unknown (converted)",
                "image_size": latent_shape[-1] * 8, "images": False}
        normalization = dataset.latent_normalization
    else:
        dataset = ImageDataset(args.data_path, args.image_size, flip=False)
        vae = load_vae(args.vae, args.vae_path, ctx.device)
        factor = latent_factor(vae)
        latent_shape = [latent_channels(vae), args.image_size // factor, args.image_size // factor]
        to_moments, flips = image_moments(vae, args.flips), args.flips
        meta = {"source": str(Path(args.data_path).resolve()), "vae": args.vae_path or args.vae,
                "vae_digest": parameter_digest(vae), "image_size": args.image_size, "classes": dataset.classes,
                "images": args.keep_images}
        normalization = latent_normalization(vae)
    meta.update(scaling_factor=normalization[0], shift_factor=normalization[1])
    meta.update(layout=COMPACT_LAYOUT, count=len(dataset), flips=flips, latent_shape=latent_shape)
    open_shared_folder(store.root, "--features-path",
                       lambda: store.create_or_check(meta, (len(dataset), flips, 2, *latent_shape)))
    if not ctx.is_main:
        store.create_or_check(meta, None)
    skipped = extract(store, dataset, to_moments, ctx.rank, ctx.world_size, args.batch_size,
                      args.num_workers, ctx.device, ctx.is_main)
    barrier()
    if ctx.is_main:
        done = store.open()[2]
        if not done.all():
            raise DataError(f"{int((done == 0).sum())} images still missing; rerun the same command")
        store.write_meta({**json.loads(store.meta_path.read_text()), "complete": True})
        print(f"wrote {len(dataset)} feature sets to {store.root}"
              + (f" ({skipped} unreadable images replaced by their neighbours)" if skipped else ""))

if __name__ == "__main__":
    sys.exit(main())
