"""Sample many images with DDP into a folder of PNGs and one .npz for the evaluator (resumable).

    torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --ckpt U-DiT-B-400K --cfg-scale 1.5
    torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --ckpt U-DiT-B-400K --cfg-scale 1.5 --sampler dpm++2m-sde
    torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --ckpt results/001-U-DiT-B/checkpoints/0400000.pt  # flow: flow-sde

Image i depends only on (--global-seed, i), so the same command gives the same images on
any number of processes. Batches are fixed runs of --per-proc-batch-size consecutive
indices dealt round-robin to the processes; a rerun after a crash skips finished
batches, and the final .npz is identical to that of an uninterrupted run. The sample
folder is named after a hash of everything that decides the images (checkpoint and
guide contents included) and keeps it in manifest.json: images are reused only by the
run that would have made them. Beside the .npz, a .json records the settings and the
network evaluations per image.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from udit.cli import ArgumentParser, number, output_dir, positive_int, run_guarded, seed
from udit.data import load_rgb
from udit.distributed import (barrier, broadcast_object, cleanup, configure_matmul_precision, init_distributed,
                              open_shared_folder, parse_on_every_process)
from udit.releases import resolve_checkpoint
from udit.sampling import (accounting, add_sampling_args, batches_of_rank, check_sampling_args, describe_run,
                           LABEL_MODES, check_balanced_count, file_sha256, generate, guidance_from_args, labels_for,
                           load_guide_model,
                           load_sampling_model, manifest_digest, open_sample_folder, sampler_from_args,
                           save_png_atomic,
                           write_npz_streaming)
from udit.vae import to_uint8, vae_source

# Accounting entries that are not settings: derived from them, or named by their contents instead.
NOT_IN_MANIFEST = ("guide_ckpt", "nfe_per_image", "nfe_main_per_image", "nfe_guide_per_image")


def run_manifest(args, settings, info, checkpoint_sha256, guide_sha256):
    """Everything that decides image i besides i; the sample folder is named after it and keeps a copy.

    info: the accounting() of the run (solver, steps, spacing, guidance). Not in it:
    --num-fid-samples under random labels (image i does not depend on the count; under
    balanced labels it does, and is recorded) and --cuda-graph (a replay computes the
    same values).
    """
    labels = {"labels": "balanced", "num_fid_samples": args.num_fid_samples} if args.labels == "balanced" else {}
    return {"checkpoint_sha256": checkpoint_sha256, "model": settings["model"],
            "model_kwargs": settings["model_kwargs"], "image_size": settings["image_size"],
            "num_classes": settings["num_classes"], "trained_labels": settings["trained_labels"],
            "vae": vae_source(settings["vae"], args.vae_path) if settings["vae"] != "none" else "none",
            **{k: v for k, v in info.items() if k not in NOT_IN_MANIFEST}, "guide_sha256": guide_sha256,
            "global_seed": args.global_seed, "per_proc_batch_size": args.per_proc_batch_size,
            "precision": args.precision, **labels}


def protocol_card(args, settings, manifest, info, count):
    """What a reader of the numbers needs: the manifest, network evaluations, weights, labels and count.

    Stored inside the .npz (protocol.json) and beside it (.json); evaluator.py prints it.
    weights: "ema" (the EMA of a training checkpoint), "model" (raw weights) or what else
    the checkpoint held.
    """
    return {"ckpt": args.ckpt, **manifest, **info, "weights": settings["weights"], "labels": args.labels,
            "num_samples": count}


def run_name(args, settings, info, manifest):
    """Readable settings, then the manifest's hash: another checkpoint or setting gets another folder."""
    def stem(ckpt):
        return Path(ckpt).stem if Path(ckpt).is_file() else ckpt
    name = (f"{settings['model'].replace('/', '-')}-{stem(args.ckpt)}-size-{settings['image_size']}-"
            f"vae-{settings['vae']}-cfg-{args.cfg_scale}-{info['sampler']}{info['steps']}")
    if info["cfg_interval"] is not None:
        name += "-interval-" + "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in info["cfg_interval"])
    if args.guide_ckpt is not None:
        name += f"-guided-by-{stem(args.guide_ckpt)}"
    return f"{name}-seed-{args.global_seed}-{manifest_digest(manifest)}"


def write_json_atomic(path, data):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def build_parser():
    p = ArgumentParser(prog="sample_ddp.py", description=__doc__.strip().splitlines()[0])
    add_sampling_args(p)
    p.add_argument("--cfg-scale", type=number(float, min=1), default=1.5,
                   help="1.5 as the paper's guided FIDs; 1 = no guidance")
    p.add_argument("--num-fid-samples", type=positive_int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=positive_int, default=32)
    p.add_argument("--global-seed", type=seed, default=0)
    p.add_argument("--labels", choices=LABEL_MODES, default="random",
                   help="random: each image's class drawn uniformly (the paper's protocol, default); balanced: "
                        "exactly N / classes images per class in a seeded order (N must be a multiple of the classes)")
    p.add_argument("--sample-dir", type=output_dir, default="samples")
    return p


def main(argv=None):
    p = build_parser()

    def parse():
        args = p.parse_args(argv)
        check_sampling_args(p, args)
        return args

    args = parse_on_every_process("sample_ddp.py", parse)
    ctx = init_distributed()
    try:
        return run_guarded("sample_ddp.py", lambda: sample_all(args, ctx))
    finally:
        cleanup()


def sample_all(args, ctx):
    """Sample this rank's missing batches, then (rank 0) write the .npz from the PNGs."""
    configure_matmul_precision(args.precision, ctx.device)
    model, vae, settings = load_sampling_model(args, ctx.device)
    if args.labels == "balanced":
        check_balanced_count(args.num_fid_samples, len(settings["trained_labels"]))  # before any folder exists
    sampler = sampler_from_args(args, settings["objective"])
    guide = load_guide_model(args.guide_ckpt, settings, ctx.device) if args.guide_ckpt else None
    guidance = guidance_from_args(args, sampler, guide)
    info = accounting(sampler, guidance, args.guide_ckpt)
    checkpoint_sha256, guide_sha256 = broadcast_object(
        (file_sha256(resolve_checkpoint(args.ckpt)), args.guide_ckpt and file_sha256(resolve_checkpoint(args.guide_ckpt)))
        if ctx.is_main else None)
    manifest = run_manifest(args, settings, info, checkpoint_sha256, guide_sha256)
    folder = Path(args.sample_dir) / run_name(args, settings, info, manifest)
    open_shared_folder(folder, "--sample-dir", lambda: open_sample_folder(folder, manifest))
    n = args.num_fid_samples
    labels = labels_for(n, args.global_seed, settings["trained_labels"], args.labels)
    todo = [b for b in batches_of_rank(n, args.per_proc_batch_size, ctx.rank, ctx.world_size)
            if not all((folder / f"{i:06d}.png").is_file() for i in b)]
    already = sum(1 for i in range(n) if (folder / f"{i:06d}.png").is_file()) if ctx.is_main else 0
    if ctx.is_main:
        print(f"sampling {n} images into {folder} with {ctx.world_size} processes ({already} already there), "
              f"{describe_run(info)}")
    # Closed on a failure too, so that the error line comes after the bar, not inside it.
    with tqdm(total=n, initial=already, unit="img", desc="sampling", disable=not ctx.is_main, smoothing=0.1) as bar:
        for batch in todo:
            images, _ = generate(model, vae, settings, args.global_seed, batch, sampler, guidance, labels=labels[batch],
                                 precision=args.precision, cuda_graph=args.cuda_graph)
            for i, array in zip(batch, to_uint8(images).numpy()):
                save_png_atomic(array, folder / f"{i:06d}.png")
            bar.update(min(len(batch) * ctx.world_size, n - bar.n))  # rank 0 reports for all
    barrier()
    if ctx.is_main:
        missing = [i for i in range(n) if not (folder / f"{i:06d}.png").is_file()]
        if missing:
            raise ValueError(f"{len(missing)} images missing (e.g. {missing[:3]}); rerun the same command")
        size = settings["image_size"]
        pngs = (np.asarray(load_rgb(folder / f"{i:06d}.png"))
                for i in tqdm(range(n), desc="writing .npz", unit="img"))
        npz = folder.parent / f"{folder.name}.npz"
        card = protocol_card(args, settings, manifest, info, n)
        write_npz_streaming(npz, n, (size, size, 3), pngs, labels, protocol=card)
        write_json_atomic(npz.with_suffix(".json"), {**card, "npz": npz.name})
        print(f"wrote {npz}: arr_0 uint8 ({n}, {size}, {size}, 3), arr_1 labels ({n},); settings and "
              f"{info['nfe_per_image']} network evaluations per image in {npz.with_suffix('.json').name}")
    barrier()


if __name__ == "__main__":
    sys.exit(main())
