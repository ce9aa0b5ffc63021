"""Sample a grid of images from a U-DiT or DiT checkpoint in one process (CPU or GPU).

    python sample.py --ckpt U-DiT-B-400K --class-labels 207 360 387 974 --cfg-scale 4.0
    python sample.py --ckpt results/000-U-DiT-B/checkpoints/0400000.pt   # settings from the checkpoint
"""

import argparse
import sys
from pathlib import Path

import torch

from udit.cli import ActionableError, finite_float
from udit.distributed import configure_matmul_precision
from udit.sampling import (DEFAULT_CLASSES, accounting, add_sampling_args, check_sampling_args, default_labels,
                           describe_run, generate, guidance_from_args, image_grid_png, load_guide_model,
                           load_sampling_model, sampler_from_args, save_png_atomic)
from udit.vae import to_uint8

def describe_labels(labels):
    if labels == list(range(len(labels))):
        return f"classes 0..{len(labels) - 1}"
    return "classes " + ", ".join(map(str, labels[:8])) + (f", ... ({len(labels)} in all)" if len(labels) > 8 else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_sampling_args(p)
    p.add_argument("--class-labels", type=int, nargs="+",
                   help=f"one image per label (default {' '.join(map(str, DEFAULT_CLASSES))} for ImageNet models, "
                        f"else the first 8 classes the model was trained on)")
    p.add_argument("--cfg-scale", type=finite_float, default=4.0, help="4.0 for pictures (FID uses 1.5); 1 = no guidance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nrow", type=int, default=4, help="images per row of the grid")
    p.add_argument("--output", default="sample.png", help="grid PNG")
    p.add_argument("--save-individual", metavar="DIR", help="also write each image as DIR/{i:03d}_{label}.png")
    args = p.parse_args(argv)
    check_sampling_args(p, args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_matmul_precision(args.precision, device)
    try:
        model, vae, settings = load_sampling_model(args, device)
        sampler = sampler_from_args(args, settings["objective"])
        guide = load_guide_model(args.guide_ckpt, settings, device) if args.guide_ckpt else None
    except (ActionableError, ValueError) as err:
        p.exit(2, f"sample.py: error: {err}\n")
    trained = settings["trained_labels"]
    labels = args.class_labels or default_labels(trained)
    bad = [label for label in labels if not 0 <= label < settings["num_classes"]]
    if bad:
        p.exit(2, f"sample.py: error: class labels {bad} are outside 0..{settings['num_classes'] - 1} for this model\n")
    untrained = [label for label in labels if label not in set(trained)]
    if untrained:
        p.exit(2, f"sample.py: error: class labels {untrained} were never trained: this model learned "
                  f"{describe_labels(trained)}\n")

    guidance = guidance_from_args(args, sampler, guide)
    print(f"sampling {len(labels)} images: {settings['model']} at {settings['image_size']} px, "
          f"{describe_run(accounting(sampler, guidance, args.guide_ckpt))}, on {device}")
    try:
        images, _ = generate(model, vae, settings, args.seed, range(len(labels)), sampler, guidance, labels=labels,
                             precision=args.precision, cuda_graph=args.cuda_graph, progress=True)
    except ValueError as err:  # non-finite samples: nothing is written
        p.exit(2, f"sample.py: error: {err}\n")
    image_grid_png(images, args.output, args.nrow)
    print(f"wrote {args.output}")
    if args.save_individual:
        folder = Path(args.save_individual)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (array, label) in enumerate(zip(to_uint8(images).numpy(), labels)):
            save_png_atomic(array, folder / f"{i:03d}_{label}.png")
        print(f"wrote {len(labels)} images to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
