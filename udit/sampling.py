"""What sample.py and sample_ddp.py share: settings from checkpoints, seeded noise, generation, outputs.

Image i of a run depends only on (seed, i): its class label and initial noise come
from a CPU generator and the noise of every sampling step from a device generator,
both seeded by those two numbers, so the same command gives the same images whatever
the number of processes. The solvers and guidance live in udit/samplers.py.
"""

import argparse
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import DiT_models
from udit.checkpoint import (build_model, dit_name, learned_variance, load_checkpoint, load_weights, model_state_dict,
                             recorded_objective, weights_source)
from udit.cli import json_object, number, positive_float, positive_int
from udit.objectives import SiTVelocity
from udit.releases import RELEASED, resolve_checkpoint
from udit.samplers import (DEFAULT_SAMPLERS, LAST_STEPS, SAMPLERS, SPACINGS, Guidance, GuidedModel, check_step_count,
                           make_sampler, samplers_for, schedule_for)
from udit.vae import (SD_VAE_SCALE, check_latent_normalization, decode, latent_channels, latent_factor,
                      latent_normalization, load_vae, vae_source)

FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # so that the same images give the same .npz bytes
DEFAULT_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes


#################################################################################
#                                  Settings                                     #
#################################################################################

def cfg_channels(text):
    """--cfg-channels: 3 (the DiT convention) or 'all' (every output channel)."""
    if text not in ("3", "all"):
        raise argparse.ArgumentTypeError(f"must be 3 or all, got {text!r}")
    return 3 if text == "3" else "all"


def add_sampling_args(p):
    """The flags sample.py and sample_ddp.py share, each numeric one with its range (udit.cli.number)."""
    p.add_argument("--ckpt", required=True,
                   help="a train.py checkpoint, a state dict / .safetensors file, or a released name "
                        "(python download.py --list)")
    p.add_argument("--model", choices=list(DiT_models), help="default: from the checkpoint")
    p.add_argument("--model-kwargs", type=json_object, help="architecture overrides (JSON); default: from the checkpoint")
    p.add_argument("--image-size", type=positive_int, help="default: from the checkpoint, else 256")
    p.add_argument("--num-classes", type=positive_int, help="default: from the checkpoint, else 1000")
    p.add_argument("--vae", choices=["ema", "mse", "none"], help="default: from the checkpoint, else ema")
    p.add_argument("--vae-path", help="local diffusers VAE folder (default: the hub id stabilityai/sd-vae-ft-{ema,mse})")
    p.add_argument("--sampler", choices=list(SAMPLERS),
                   help="default: ddpm (the paper's protocol) for ddpm checkpoints, flow-sde for --objective flow "
                        "ones; " + "; ".join(f"{objective}: {', '.join(samplers_for(objective))}"
                                              for objective in DEFAULT_SAMPLERS) + " (README, Sampling)")
    p.add_argument("--num-sampling-steps", type=positive_int,
                   help="default: the sampler's recommended count (" +
                        ", ".join(f"{name} {s.steps}" for name, s in SAMPLERS.items()) + ")")
    p.add_argument("--spacing", choices=SPACINGS, help="timestep spacing of a diffusers solver (default: its "
                                                       "measured best)")
    p.add_argument("--time-shift", type=positive_float, metavar="SHIFT",
                   help="flow solvers: t = SHIFT u / (1 + (SHIFT - 1) u) for uniform u (SD3's shift; > 1: more steps "
                        "at high noise; default 1)")
    p.add_argument("--last-step", choices=LAST_STEPS,
                   help="flow-sde: the step from t = 0.04 to 0 (mean: SiT's default, the drift without noise; "
                        "tweedie: the x_0 estimate; none: stochastic steps all the way)")
    p.add_argument("--cfg-channels", type=cfg_channels, metavar="{3,all}",
                   help="guide the first 3 output channels (the DiT convention, default for ddpm and ddim) or all "
                        "of them (default for the other solvers, which guide epsilon, or the velocity for flow)")
    p.add_argument("--cfg-interval", type=number(float, min=0, max=float("inf")), nargs=2, metavar=("LOW", "HIGH"),
                   help="guide only at noise levels LOW < sigma <= HIGH, sigma = sqrt((1 - abar_t) / abar_t) "
                        "(0.01 .. 157; flow: t / (1 - t), 0 .. inf); elsewhere the unconditional pass is skipped")
    p.add_argument("--guide-ckpt", metavar="CKPT",
                   help="autoguidance: a weaker checkpoint (smaller model or earlier step, same latent space and "
                        "classes) whose conditional prediction replaces the null-label one")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--tf32", action="store_true", help="same as --precision tf32")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the model from a CUDA graph (GPU only): U-DiT's many small kernels make eager "
                        "sampling launch-bound")


def check_sampling_args(parser, args):
    """Exit with status 2 and one line on values argparse cannot check."""
    for flag, ckpt in (("--ckpt", args.ckpt), ("--guide-ckpt", args.guide_ckpt)):
        if ckpt is not None and not Path(ckpt).is_file() and ckpt not in RELEASED:
            parser.error(f"{flag} {ckpt}: neither a file nor a released checkpoint ({', '.join(RELEASED)})")
    if args.cfg_scale == 1.0:
        for flag, value in (("--cfg-interval", args.cfg_interval), ("--guide-ckpt", args.guide_ckpt),
                            ("--cfg-channels", args.cfg_channels)):
            if value is not None:
                parser.error(f"{flag} has no effect without guidance; give --cfg-scale > 1 or drop it")
    if args.cfg_interval is not None and not args.cfg_interval[0] < args.cfg_interval[1]:
        parser.error(f"--cfg-interval LOW HIGH needs 0 <= LOW < HIGH, got {args.cfg_interval[0]} {args.cfg_interval[1]}")
    try:
        if args.num_sampling_steps is not None:
            check_step_count(args.num_sampling_steps)
        if args.sampler is not None:  # the default depends on the checkpoint's objective: checked once it is read
            sampler_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.vae_path and not Path(args.vae_path).is_dir():
        parser.error(f"--vae-path {args.vae_path}: no such directory")
    if args.tf32:
        args.precision = "tf32"
    if args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph needs a CUDA GPU (it replays recorded GPU kernels); drop it on this machine")


def sampler_from_args(args, objective=None):
    """The configured sampler of --sampler and its settings for a model of `objective` (ValueError if impossible).

    Without --sampler: the objective's default (DEFAULT_SAMPLERS). A sampler of another
    objective is refused with the list of those that fit.
    """
    name = args.sampler or DEFAULT_SAMPLERS[objective or "ddpm"]
    if objective is not None and SAMPLERS[name].objective != objective:
        raise ValueError(f"--sampler {name} samples models trained with --objective {SAMPLERS[name].objective}; "
                         f"this one was trained with --objective {objective}: use one of "
                         f"{', '.join(samplers_for(objective))}")
    return make_sampler(name, args.num_sampling_steps, args.spacing, shift=args.time_shift, last_step=args.last_step)


def guidance_from_args(args, sampler, guide=None):
    """The Guidance of the flags: the sampler's default channels unless --cfg-channels says otherwise."""
    channels = {None: "default", 3: 3, "all": None}[args.cfg_channels]
    interval = tuple(args.cfg_interval) if args.cfg_interval is not None else None
    return Guidance(scale=args.cfg_scale, channels=channels, interval=interval, guide=guide).for_sampler(sampler)


def accounting(sampler, guidance, guide_ckpt=None):
    """What determines the images and what they cost: solver settings, guidance, network evaluations per image."""
    nfe = sampler.evaluations_per_image(guidance)
    return {**sampler.describe(), **guidance.for_sampler(sampler).describe(), "guide_ckpt": guide_ckpt,
            "nfe_per_image": nfe["total"], "nfe_main_per_image": nfe["main"], "nfe_guide_per_image": nfe["guide"]}


def describe_run(info):
    """One line for the logs from an accounting() dict."""
    text = f"{info['sampler']} {info['steps']} steps"
    if "spacing" in info:
        text += f" ({info['spacing']} spacing)"
    if info.get("time_shift", 1.0) != 1.0:
        text += f" (time shift {info['time_shift']:g})"
    if info["cfg_scale"] != 1.0:
        text += f", {'autoguidance' if info['autoguidance'] else 'cfg'} {info['cfg_scale']} on {info['cfg_channels']} channels"
        if info["cfg_interval"] is not None:
            text += f" for sigma in ({info['cfg_interval'][0]}, {info['cfg_interval'][1]}]"
    return text + f", {info['nfe_per_image']} network evaluations per image"


# The settings of the original U-DiT / DiT / fast-DiT / SiT train.py (an argparse.Namespace)
# that describe the network they trained; of the rest, only SiT's transport is read
# (udit.checkpoint.recorded_objective).
FOREIGN_RELIABLE = ("model", "image_size", "num_classes", "vae")


def resolve_settings(args, saved, state_dict):
    """Model settings: explicit flags win, then the checkpoint's saved args, then the weights, then defaults.

    saved: a checkpoint's `args` (ours: everything the network needs; the original
    trainers': only FOREIGN_RELIABLE, and the objective SiT's records). Whether the label
    tables have a null row (trained with label dropout, so guidance works) and whether the
    output has learned-variance channels are read off the weights when not recorded. A
    SiT checkpoint is a flow model whose SiT-X/p is our DiT-X/p, with "time_convention"
    "sit" (sampling_network converts its time direction). Raises ValueError (one line).
    """
    released = RELEASED.get(args.ckpt, {})
    objective, time_convention = recorded_objective(saved, args.ckpt)
    if "latent_size" not in saved:
        saved = {k: saved[k] for k in FOREIGN_RELIABLE if k in saved}
        if time_convention == "sit" and "model" in saved:
            saved["model"] = dit_name(saved["model"])
    defaults = {"model": "U-DiT-B", "model_kwargs": {}, "image_size": 256, "num_classes": 1000, "vae": "ema"}
    if args.model is not None and args.model != saved.get("model", released.get("model")):
        # Another architecture: none of the checkpoint's settings apply but the latent space it
        # was trained in, so that a mismatch is reported as one of weights, not of a VAE.
        saved = {k: saved[k] for k in ("vae", "latent_scale", "latent_shift") if k in saved}
    settings = {}
    for key, default in defaults.items():
        value = getattr(args, key)
        settings[key] = value if value is not None else saved.get(key, released.get(key, default))
    if settings["model"] not in DiT_models:
        raise ValueError(f"{args.ckpt}: the checkpoint names the model {settings['model']!r}, which is not one of "
                         f"{', '.join(DiT_models)}; pass --model")
    settings["objective"] = objective
    if time_convention is not None:
        settings["time_convention"] = time_convention
    inferred_variance = learned_variance(state_dict)
    if "learn_sigma" in saved:
        settings["learn_sigma"] = saved["learn_sigma"]
    elif inferred_variance is not None:
        settings["learn_sigma"] = inferred_variance
    elif objective == "flow":  # our flow networks have no learned-variance channels
        settings["learn_sigma"] = False
    settings["label_dropout"] = saved.get("label_dropout", "shared")
    label_rows = [v.shape[0] for k, v in state_dict.items() if k.endswith("embedding_table.weight")]
    inferred_dropout = 0.0 if label_rows and label_rows[0] == settings["num_classes"] else 0.1
    settings["class_dropout_prob"] = saved.get("class_dropout_prob", inferred_dropout)
    if "x_embedder.proj.weight" in state_dict:
        settings["in_channels"] = state_dict["x_embedder.proj.weight"].shape[1]
    trained = [label for label in saved.get("trained_labels") or [] if label < settings["num_classes"]]
    settings["trained_labels"] = trained or list(range(settings["num_classes"]))
    if "latent_scale" in saved:
        settings["latent_normalization"] = (saved["latent_scale"], saved["latent_shift"])
    elif "vae" in saved or released:
        settings["latent_normalization"] = (SD_VAE_SCALE, 0.0)  # every earlier VAE-space checkpoint used it
    return settings


def has_null_label(settings):
    """Whether the label tables have the null row that classifier-free guidance feeds.

    resolve_settings always records it (saved, or read off the weights); settings made by
    hand without "class_dropout_prob" are taken to have the default label dropout's row.
    """
    return settings.get("class_dropout_prob", 0.1) > 0


def check_guidance_fits(settings, scale, autoguided, source):
    """ValueError (one line) for classifier-free guidance (scale > 1, no guide) of a model without a null label."""
    if scale != 1.0 and not autoguided and not has_null_label(settings):
        raise ValueError(f"{source} was trained without label dropout (--class-dropout-prob 0), so it "
                         f"has no null label and classifier-free guidance cannot work; sample with --cfg-scale 1 "
                         f"or with autoguidance (--guide-ckpt)")


def load_sampling_model(args, device):
    """(model in eval mode with the checkpoint's weights, VAE or None, settings dict).

    Raises ValueError (one line) when the checkpoint cannot give what the flags ask: another
    architecture, guidance without a null label, a VAE with other latent constants.
    """
    path = resolve_checkpoint(args.ckpt)
    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("args", {}) if isinstance(checkpoint, dict) and "ema" in checkpoint else {}
    state_dict = model_state_dict(checkpoint)
    settings = resolve_settings(args, saved if isinstance(saved, dict) else {}, state_dict)
    settings["weights"] = weights_source(checkpoint)
    check_guidance_fits(settings, args.cfg_scale, args.guide_ckpt is not None, f"the model of {path}")
    if settings["vae"] == "none" and args.vae_path:
        raise ValueError(f"--vae-path {args.vae_path} does not apply: this model works in pixel space (--vae none)")
    vae = load_vae(settings["vae"], args.vae_path, device)
    if settings["vae"] != "none":
        check_latent_normalization(settings.get("latent_normalization"), latent_normalization(vae),
                                   f"{path}", f"the VAE {vae_source(settings['vae'], args.vae_path)}")
    settings.setdefault("in_channels", latent_channels(vae))
    settings["latent_size"] = settings["image_size"] // latent_factor(vae)
    return sampling_network(settings, state_dict, path, device), vae, settings


def sampling_network(settings, state_dict, source, device):
    """The network of `settings` with the weights `state_dict`, in eval mode on `device`.

    Called in this project's convention of its objective: a SiT network ("time_convention"
    "sit") is wrapped in udit.objectives.SiTVelocity. Raises CheckpointError (one line)
    when the weights are for another architecture.
    """
    model = build_model(settings)
    load_weights(model, state_dict, source)
    if settings.get("time_convention") == "sit":
        model = SiTVelocity(model)
    return model.to(device).eval()


# The SD VAEs ft-EMA and ft-MSE fine-tuned the decoder only: one latent space.
LATENT_SPACES = {"none": "pixels", "ema": "sd-vae", "mse": "sd-vae"}


def load_guide_model(ckpt, settings, device):
    """The autoguidance network (eval mode) of checkpoint `ckpt` for the main model's `settings`.

    Its settings come from the checkpoint (saved args, released name, weights) as for the
    main model; what the checkpoint does not record is taken to be the main model's (an
    earlier checkpoint of the same run saved as a state dict). Raises ValueError (one
    line) when its latent space, latent shape or classes differ from the main model's.
    """
    path = resolve_checkpoint(ckpt)
    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("args", {}) if isinstance(checkpoint, dict) and "ema" in checkpoint else {}
    saved = saved if isinstance(saved, dict) else {}
    state_dict = model_state_dict(checkpoint)
    known = {**RELEASED.get(ckpt, {}), **saved}
    flags = argparse.Namespace(ckpt=ckpt, **{key: None if key in known else settings[key]
                                             for key in ("model", "image_size", "num_classes", "vae")})
    flags.model_kwargs = (settings["model_kwargs"] if "model_kwargs" not in known and
                          dit_name(known.get("model", settings["model"])) == settings["model"] else None)
    guide = resolve_settings(flags, saved, state_dict)
    if not known:  # a bare state dict: of the main model's objective and time convention, as for its other settings
        guide["objective"] = settings["objective"]
        if "time_convention" in settings:
            guide["time_convention"] = settings["time_convention"]
    guide.setdefault("in_channels", settings["in_channels"])
    guide["latent_size"] = guide["image_size"] * settings["latent_size"] // settings["image_size"]
    differ = [f"{what} (guide {guide[key]}, main {settings[key]})" for what, key in
              (("objective", "objective"), ("latent channels", "in_channels"), ("latent size", "latent_size"),
               ("classes", "num_classes"))
              if guide[key] != settings[key]]
    if LATENT_SPACES[guide["vae"]] != LATENT_SPACES[settings["vae"]]:
        differ.insert(0, f"latent space (vae; guide {guide['vae']}, main {settings['vae']})")
    elif LATENT_SPACES[settings["vae"]] != "pixels":  # pixel space has no latent normalisation to share
        norms = guide.get("latent_normalization"), settings.get("latent_normalization")
        if None not in norms and norms[0] != norms[1]:  # unrecorded: taken to be the main model's
            differ.insert(0, f"latent normalisation (guide {norms[0]}, main {norms[1]})")
    if differ:
        raise ValueError(f"--guide-ckpt {ckpt}: the guide must share the main model's latent space and classes; "
                         f"it differs in {', '.join(differ)}")
    return sampling_network(guide, state_dict, path, device)


#################################################################################
#                                  Sampling                                     #
#################################################################################

def seeded_generator(seed, index, stream, device="cpu"):
    """A generator determined by (seed, image index, stream) alone."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def default_labels(trained):
    """DiT's eight ImageNet classes for a model of all 1000, else the first trained classes (8 images)."""
    if len(trained) >= 1000:
        return DEFAULT_CLASSES
    return [trained[i % len(trained)] for i in range(8)]


def batches_of_rank(count, batch_size, rank, world_size):
    """Index runs [b B, (b + 1) B) for b = rank, rank + W, ... (the last may be shorter)."""
    starts = range(rank * batch_size, count, world_size * batch_size)
    return [list(range(s, min(s + batch_size, count))) for s in starts]


LABEL_MODES = ("random", "balanced")
BALANCED_STREAM = 2  # seeded_generator stream of the balanced order (0: an image's label and noise)


def labels_for(count, seed, label_pool, mode="random"):
    """The class label (count,) of every image index 0..count-1.

    random: each image's label is drawn uniformly from `label_pool`, as the sampler draws
    it (the paper's protocol). balanced: every class of the pool exactly count / classes
    times (recent papers' 50 per class for 50K, SPEC §11), in an order shuffled by
    (seed, count) alone, so any process count and any resumed run get the same labels.
    Raises ValueError when a balanced count is not a multiple of the class count.
    """
    if mode == "random":
        return initial_draws(seed, range(count), (1,), label_pool)[0].numpy()
    if mode != "balanced":
        raise ValueError(f"label mode {mode!r}: use one of {', '.join(LABEL_MODES)}")
    pool = np.asarray(list(label_pool), dtype=np.int64)
    check_balanced_count(count, len(pool))
    order = torch.randperm(count, generator=seeded_generator(seed, count, BALANCED_STREAM)).numpy()
    return np.repeat(pool, count // len(pool))[order]


def check_balanced_count(count, classes):
    """ValueError naming the counts that work when `count` images cannot be spread evenly over `classes`."""
    if count % classes:
        below, above = count // classes * classes, -(-count // classes) * classes
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(f"--labels balanced: {count} images do not split evenly over {classes} classes; "
                         f"use --num-fid-samples a multiple of {classes} (e.g. {nearest})")


def initial_draws(seed, indices, shape, label_pool, labels=None):
    """Labels (N,) and initial noise (N, *shape) on the CPU: the label first, then the noise.

    Each image's label is drawn uniformly from `label_pool` (the trained class indices;
    with every class, label = the drawn index, as before pools existed). Drawn on the CPU
    so that they do not depend on the device; `labels` overrides the drawn labels (the
    noise stays the same).
    """
    ys, zs = [], []
    for i in indices:
        g = seeded_generator(seed, i, 0)
        ys.append(torch.randint(len(label_pool), (1,), generator=g))
        zs.append(torch.randn(shape, generator=g))
    pool = torch.as_tensor(list(label_pool), dtype=torch.long)
    y = pool[torch.cat(ys)] if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return y, torch.stack(zs)


def generate(model, vae, settings, seed, indices, sampler=None, guidance=Guidance(), labels=None,
             precision="fp32", cuda_graph=False, progress=False):
    """Images (N, 3, H, W) in [-1, 1] and labels (N,) for the image indices given.

    settings: as load_sampling_model returns them ("objective" picks the noise process,
    "ddpm" when absent). sampler: a name of udit.samplers.SAMPLERS (recommended
    settings), a configured sampler (udit.samplers.make_sampler), or None for the
    objective's default; it must be one of the objective's. guidance: udit.samplers.Guidance (scale,
    channels, interval, guide network). The network evaluations per image are
    `sampler.evaluations_per_image(guidance)`: the run follows the same list of guided
    evaluations. cuda_graph: replay each network call from a CUDA graph recorded for this
    batch (one per batch shape). Raises ValueError (one line naming the settings) when the
    latents or the decoded images are not finite (NaN or inf), so that no caller writes
    them as black images.

        from udit.samplers import Guidance, make_sampler
        images, labels = generate(model, vae, settings, seed=0, indices=range(8),
                                  sampler=make_sampler("dpm++2m-sde", 10),
                                  guidance=Guidance(scale=4.0, interval=(0.5, 10.0)))
    """
    objective = settings.get("objective", "ddpm")
    if sampler is None or isinstance(sampler, str):
        sampler = make_sampler(sampler or DEFAULT_SAMPLERS[objective])
    if sampler.objective != objective:
        raise ValueError(f"{sampler.name} samples models trained with --objective {sampler.objective}, this one was "
                         f"trained with --objective {objective}: use one of {', '.join(samplers_for(objective))}")
    check_guidance_fits(settings, guidance.scale, guidance.guide is not None, "this model")
    device = next(model.parameters()).device
    shape = (settings["in_channels"], settings["latent_size"], settings["latent_size"])
    y, z = initial_draws(seed, indices, shape, settings["trained_labels"], labels)
    y, z = y.to(device), z.to(device)
    generators = [seeded_generator(seed, i, 1, device) for i in indices]
    schedule = schedule_for(objective, model.learn_sigma)
    guidance = guidance.for_sampler(sampler)
    model_fn = GuidedModel(model, y, settings["num_classes"], guidance, sampler.guided_evaluations(guidance, schedule),
                           precision, cuda_graph)
    with torch.no_grad():
        latents = sampler.sample(model_fn, z, generators, schedule, progress=progress)
        check_finite(latents, "latents", indices, sampler, guidance)
        images = decode(vae, latents)
        if vae is not None:
            check_finite(images, "decoded images", indices, sampler, guidance)
    return images.clamp(-1, 1), y


def check_finite(x, what, indices, sampler, guidance):
    """ValueError (one line naming the settings) unless every value of x (N, ...) of images `indices` is finite."""
    finite = torch.isfinite(x).flatten(1).all(dim=1).cpu()
    if bool(finite.all()):
        return
    bad = [i for i, ok in zip(indices, finite.tolist()) if not ok]
    shown = ", ".join(map(str, bad[:4])) + (f", ... ({len(bad)} of {len(finite)})" if len(bad) > 4 else "")
    raise ValueError(f"sampling diverged: the {what} of image {shown} are not finite (NaN or inf) with "
                     f"{describe_run(accounting(sampler, guidance))}; nothing was written for them. A checkpoint "
                     f"with non-finite weights does this at every setting; else try fewer steps, another "
                     f"--spacing or --time-shift, or a lower --cfg-scale")


#################################################################################
#                                  Outputs                                      #
#################################################################################

def file_sha256(path):
    """Hex SHA-256 of a file's bytes (a 3.7 GB U-DiT-L checkpoint takes a few seconds)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_digest(manifest):
    """A short stable hash of a manifest: part of the sample folder's name."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:8]


def open_sample_folder(folder, manifest):
    """Create `folder` with manifest.json, or check that the images already in it were made for `manifest`.

    The manifest holds everything that decides image i besides i (checkpoint contents,
    model, VAE, sampler, guidance, seed, batch size, precision), so a rerun reuses only
    images it would have made itself. Raises ValueError (one line) otherwise.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diffs = [f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in sorted({*old, *manifest})
                 if old.get(k) != manifest.get(k)]
        if diffs:
            raise ValueError(f"{folder} holds images made with other settings ({'; '.join(diffs[:3])}); "
                             f"delete it or pass another --sample-dir")
        return
    if folder.is_dir() and any(folder.glob("*.png")):
        raise ValueError(f"{folder} holds images but no manifest.json saying how they were made (an older "
                         f"version, or another program); delete it or pass another --sample-dir")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def save_png_atomic(array, path):
    """uint8 (H, W, 3) -> PNG; written under a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_npy_member(zf, name, shape, dtype, chunks):
    info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
    with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


PROTOCOL_MEMBER = "protocol.json"


def write_npz_streaming(path, count, image_shape, images, labels, protocol=None):
    """An .npz with arr_0 uint8 (count, H, W, 3) from an iterable of images and arr_1 labels (count,).

    The images are streamed into the file, never held together in memory; the file is
    written under a temporary name and renamed, and its bytes depend only on its content.
    protocol: a JSON-able dict stored as the member protocol.json (the run's protocol
    card, which evaluator.py prints beside the numbers; np.load returns it as bytes, and
    readers of arr_0 / arr_1 such as ADM's evaluator ignore it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_member(zf, "arr_0.npy", (count, *image_shape), np.uint8, images)
        _write_npy_member(zf, "arr_1.npy", (count,), np.int64, [np.asarray(labels, dtype=np.int64)])
        if protocol is not None:
            zf.writestr(zipfile.ZipInfo(PROTOCOL_MEMBER, date_time=FIXED_ZIP_TIME),
                        json.dumps(protocol, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_protocol(path):
    """The protocol card (dict) stored in an .npz by write_npz_streaming, or None when it has none.

    Raises ValueError naming the file when the member is there but is not a JSON object.
    """
    with zipfile.ZipFile(path) as zf:
        if PROTOCOL_MEMBER not in zf.namelist():
            return None
        text = zf.read(PROTOCOL_MEMBER)
    try:
        card = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: {PROTOCOL_MEMBER} is not valid JSON ({err}); rewrite the .npz with sample_ddp.py "
                         f"or delete the member") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: {PROTOCOL_MEMBER} is not a JSON object")
    return card


def image_grid(images, nrow):
    """Images (N, 3, H, W) in [-1, 1] -> one uint8 (H', W', 3) grid, `nrow` images per row (2 px padding)."""
    from torchvision.utils import make_grid
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def image_grid_png(images, path, nrow):
    """Save images (N, 3, H, W) in [-1, 1] as one grid PNG with `nrow` images per row (2 px padding)."""
    save_png_atomic(image_grid(images, nrow), path)

