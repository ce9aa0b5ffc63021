"""The training loop shared by train.py (torchrun DDP) and train_accelerate.py (Accelerate).

A backend supplies what differs (process group, wrapping, mixed precision, backward);
everything else — data, model, EMA, logging, checkpoints, exact resume — lives here.
"""

import argparse
import errno
import logging
import math
import re
import secrets
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from models import DiT_models, cache_rope_tables, capture_block_outputs
from udit.alignment import (AlignedObjective, add_alignment_args, average_gradients, build_aligner,
                            check_alignment_args, encoder_targets, open_encoder)
from udit.checkpoint import (CheckpointError, build_model, check_model_kwargs, check_recorded_weights,
                             load_checkpoint, load_weights, model_state_dict, recorded_objective, save_atomic)
from udit.cli import (ActionableError, ArgumentParser, finite_float, given_flags, inside, json_object,
                      non_negative_int, number, output_dir, positive_float, positive_int, seed)
from udit.data import DataError, ImageDataset, ResumableDistributedSampler, open_feature_folder
from udit.cuda_graphs import GraphedTrainingStep
from udit.distributed import (all_gather_objects, all_reduce_mean, barrier, broadcast_module, broadcast_object,
                               configure_matmul_precision, init_distributed, open_shared_folder, parameter_digest)
from udit.ema import TrainingEMAs, check_posthoc_args, sigma_rel_flag, snapshot_schedule_note
from udit.monitor import MONITOR_SETTINGS, Monitor, add_monitor_args, check_monitor_args, grid_labels
from udit.objectives import OBJECTIVES, TIME_SAMPLINGS, create_objective
from udit.vae import (check_latent_normalization, encode, latent_channels, latent_factor, latent_normalization,
                      load_vae, vae_config_normalization)

log = logging.getLogger("train")

# What --resume may change. Any other flag given with --resume must equal the experiment's
# value: it shapes the network, the data order or the meaning of the saved step.
RESUMABLE = ("max_steps", "max_minutes", "epochs", "log_every", "ckpt_every", "num_workers", "data_path",
             "feature_path", "vae_path", "compile", "grad_checkpointing", "skip_nonfinite", "lr", "ema_decay",
             "ema_warmup", "precision", "cuda_graph", "resume", "max_grad_norm", "encoder_weights",
             "posthoc_every", "posthoc_dtype",
             *MONITOR_SETTINGS)
# Flags naming a file of weights whose SHA-256 the experiment records: {flag: args key of the digest}.
DIGEST_CHECKED = {"encoder": "encoder_digest"}
# Flags that switch a feature on, reported first when they change with its settings.
SWITCHES = ("repa", "posthoc_ema")
# Flags whose change can change a tensor's shape, so that the old weights may not load.
NETWORK_SHAPING = ("model", "model_kwargs", "num_classes", "class_dropout_prob", "vae", "image_size")


class NonFiniteLoss(ActionableError):
    """A NaN/Inf loss or weights: training stops before anything broken is saved."""
    exit_status = 1


#################################################################################
#                                 Arguments                                     #
#################################################################################

def training_parser(description, prog="train.py"):
    """The flags train.py and train_accelerate.py share, each numeric one with its range."""
    p = ArgumentParser(prog=prog, description=description)
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-path", help="ImageFolder root (e.g. imagenet/train): images encoded on the fly")
    data.add_argument("--feature-path", help="VAE features: extract_features.py output, or a fast-DiT / U-DiT release folder")
    p.add_argument("--results-dir", type=output_dir, default="results")
    p.add_argument("--model", choices=list(DiT_models), default="U-DiT-B")
    p.add_argument("--model-kwargs", type=json_object, default={},
                   help="architecture overrides as a JSON object, e.g. '{\"depth\": [1,2,4,2,1]}'")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--epochs", type=positive_int, default=None, help="stop after this many epochs (default: no limit)")
    p.add_argument("--max-steps", type=positive_int, default=400_000, help="iterations, as the paper counts them")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="also stop (with a checkpoint) after this much wall time, e.g. a job's time limit")
    p.add_argument("--global-batch-size", type=positive_int, default=256)
    p.add_argument("--global-seed", type=seed, default=0)
    p.add_argument("--vae", choices=["ema", "mse", "none"], default="ema", help="'none': pixel space")
    p.add_argument("--vae-path", help="local diffusers VAE folder (default: the hub id stabilityai/sd-vae-ft-{ema,mse})")
    p.add_argument("--num-workers", type=non_negative_int, default=4, help="data loading processes per process")
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--ckpt-every", type=positive_int, default=50_000)
    p.add_argument("--ckpt", help="initialise the weights from this checkpoint (fine-tuning), not a resume")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR", type=output_dir,
                   help="continue this experiment from its latest checkpoint")
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--ema-decay", type=number(float, min=0, max=1, max_inclusive=False), default=0.9999)
    p.add_argument("--ema-warmup", action="store_true",
                   help="EMA decay min(decay, (1 + step) / (10 + step)): useful for short runs")
    p.add_argument("--posthoc-ema", type=sigma_rel_flag, nargs="+", metavar="SIGMA_REL",
                   help="also keep EDM2's power-function EMAs of these relative widths (EDM2: 0.05 0.10) and save "
                        "snapshots, from which `python -m udit.phema` makes the EMA of any width after training")
    p.add_argument("--posthoc-every", type=positive_int, default=10_000,
                   help="post-hoc EMA: a snapshot of each power-function EMA every N steps (posthoc/)")
    p.add_argument("--posthoc-dtype", choices=["fp16", "fp32"], default="fp16",
                   help="post-hoc EMA: precision of the snapshots (EDM2: fp16, half the disk)")
    p.add_argument("--label-dropout", choices=["shared", "per-level"], default="shared",
                   help="U-DiT: one drop decision per sample for all levels (default) or the reference's per-level draws")
    p.add_argument("--class-dropout-prob", type=number(float, min=0, max=1, max_inclusive=False), default=0.1)
    p.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flips (for data where a mirror image is not a sample, e.g. digits)")
    p.add_argument("--objective", choices=OBJECTIVES, default="ddpm",
                   help="ddpm: the paper's epsilon prediction with learned variance; flow: velocity prediction on "
                        "SiT's linear interpolant (udit/objectives.py states the time convention)")
    p.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default="uniform",
                   help="flow: how training times are drawn (logit-normal as in SD3 / LightningDiT)")
    p.add_argument("--logit-normal-loc", type=finite_float, default=0.0, help="flow, logit-normal: location")
    p.add_argument("--logit-normal-scale", type=positive_float, default=1.0, help="flow, logit-normal: scale")
    p.add_argument("--allow-objective-change", action="store_true",
                   help="let --ckpt come from a run of the other objective (its output layer is not loaded)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) steps whose loss is NaN/Inf instead of stopping")
    p.add_argument("--max-grad-norm", type=positive_float,
                   help="clip the gradients' total L2 norm to this (default: no clipping, as the paper)")
    add_monitor_args(p)
    add_alignment_args(p)
    return p


def parse_training_args(parser, argv=None):
    """Parse, apply --resume, and validate what argparse cannot; exits with status 2 and one line on a bad value.

    `args.given` lists the flags typed on the command line (whatever their value); with
    --resume the experiment's saved settings are the base and those flags are applied.
    """
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)
    if not args.resume and not (args.data_path or args.feature_path):
        parser.error("give --data-path (images) or --feature-path (VAE features), or --resume EXPERIMENT_DIR")
    for flag in ("data_path", "feature_path", "vae_path", "resume", "ckpt"):
        value = getattr(args, flag)
        if value and not Path(value).exists():
            parser.error(f"--{flag.replace('_', '-')} {value}: no such file or directory")
    if not args.resume and args.data_path and inside(args.results_dir, args.data_path):
        parser.error(f"--results-dir {args.results_dir} is inside --data-path {args.data_path}: the next run would "
                     f"read its experiment folders as classes; choose a folder outside it")
    if args.resume:
        args = resumed_args(parser, args)
    if args.objective != "flow" and {"time_sampling", "logit_normal_loc", "logit_normal_scale"} & set(args.given):
        parser.error("--time-sampling and --logit-normal-* apply to --objective flow only")
    if args.time_sampling != "logit-normal" and {"logit_normal_loc", "logit_normal_scale"} & set(args.given):
        parser.error("--logit-normal-loc/--logit-normal-scale apply to --time-sampling logit-normal only")
    try:
        check_model_kwargs(args.model, args.model_kwargs)
    except ValueError as err:
        parser.error(f"--model-kwargs: {err}")
    if args.objective == "flow" and args.model_kwargs.get("learn_sigma"):
        parser.error("--objective flow predicts a velocity without a learned variance: drop learn_sigma from "
                     "--model-kwargs")
    if args.allow_objective_change and not args.ckpt:
        parser.error("--allow-objective-change goes with --ckpt")
    if args.vae == "none" and args.vae_path:
        parser.error(f"--vae-path {args.vae_path} does not apply to pixel space (--vae none): drop one of them")
    if args.vae == "none" and args.feature_path:
        parser.error("--feature-path holds VAE latents, --vae none is for pixel-space training from --data-path; "
                     "name the VAE of the features (--vae / --vae-path)")
    if getattr(args, "cuda_graph", False) and (args.compile or args.grad_checkpointing):
        parser.error("--cuda-graph does not combine with --compile or --grad-checkpointing (given now or kept by "
                     "the resumed experiment): train without --cuda-graph")
    check_monitor_args(parser, args)
    check_alignment_args(parser, args)
    check_posthoc_args(parser, args)
    return args


def resumed_args(parser, args):
    """The experiment's saved settings with the resumable flags given now applied; exits 2 on any other change."""
    try:
        path = latest_checkpoint(args.resume)
        saved = load_checkpoint(path, mmap=True)["args"]
    except (CheckpointError, KeyError) as err:
        parser.error(f"--resume {args.resume}: {err}")
    if "latent_size" not in saved:  # what every checkpoint of this train.py records
        parser.error(f"--resume {args.resume}: {path} was written by another trainer (DiT's, SiT's, ...), which "
                     f"saves no state to resume from; start a new experiment with --ckpt {path} to train from "
                     f"its weights")
    # A flag naming weights the experiment recorded the digest of may point elsewhere (the file moved); the
    # digest decides whether they are the same weights (check_recorded_weights, when they are loaded).
    movable = [k for k, digest in DIGEST_CHECKED.items() if saved.get(digest)]
    changed = [k for k in args.given if k not in (*RESUMABLE, *movable)
               and saved.get(k, parser.get_default(k)) != getattr(args, k)]
    if changed:
        # A switch first: adding --repa to a run without it is the change, not the default --encoder it has.
        k = min(changed, key=lambda k: k not in SWITCHES)
        if k == "objective":
            restart = f"with --ckpt {path} --allow-objective-change to start from its weights"
        elif k in NETWORK_SHAPING:  # the weights may no longer fit: say so rather than promise they load
            restart = f"--ckpt {path} starts it from these weights if the network keeps every tensor's shape"
        else:
            restart = f"with --ckpt {path} to start from its weights"
        had = saved.get(k, parser.get_default(k))
        had = "was trained without it" if had is None or had is False else f"has {had!r}"  # 0.0 is a value
        parser.error(f"--{k.replace('_', '-')} cannot change on resume (the experiment {had}, given "
                     f"{getattr(args, k)!r}); start a new experiment (without --resume), {restart}")
    merged = {**{k: v for k, v in vars(args).items() if k not in args.given}, **saved,
              **{k: getattr(args, k) for k in args.given}}
    if "data_path" in args.given:
        merged["feature_path"] = None
    if "feature_path" in args.given:
        merged["data_path"] = None
    merged.update(resume=args.resume, resume_checkpoint=str(path), given=args.given)
    return argparse.Namespace(**merged)


#################################################################################
#                                  Backend                                      #
#################################################################################

class DDPBackend:
    """torchrun / plain python: torch.distributed DDP, fp32, TF32 or bf16 autocast.

    cuda_graph: each step's forward and backward replay from a CUDA graph
    (udit.cuda_graphs.GraphedTrainingStep) and the processes average gradients with one
    all-reduce after it, instead of DDP's hooks inside the backward pass.
    """

    def __init__(self, precision="fp32", cuda_graph=False):
        self.ctx = init_distributed()
        self.device, self.rank, self.world_size = self.ctx.device, self.ctx.rank, self.ctx.world_size
        self.local_rank = self.ctx.local_rank
        self.precision = precision
        self.cuda_graph = cuda_graph
        configure_matmul_precision(precision, self.device)

    def prepare(self, model, opt):
        if self.world_size > 1 and self.cuda_graph:
            broadcast_module(model)  # the start DDP would give: every process with rank 0's weights
        elif self.world_size > 1:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model, opt

    def autocast(self):
        if self.precision == "bf16":
            # A graph must record the weights' casts, not reuse casts cached outside it.
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graph)
        return nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, parameters, max_norm=None):
        """Total L2 norm of the gradients (0-dim tensor, before clipping); scaled down to max_norm if above it."""
        if max_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=True)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)

    def unwrap(self, model):
        model = getattr(model, "_orig_mod", model)
        return model.module if isinstance(model, DDP) else model

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass


#################################################################################
#                                 Helpers                                       #
#################################################################################

def create_logger(exp_dir, is_main):
    log.handlers.clear()
    log.propagate = False
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(Path(exp_dir) / "log.txt")):
            handler.setFormatter(fmt)
            log.addHandler(handler)
        log.setLevel(logging.INFO)
    else:
        log.addHandler(logging.NullHandler())
        log.setLevel(logging.ERROR)
    return log


def checkpoint_files(exp_dir):
    """The experiment's checkpoints/NNNNNNN.pt files, oldest first."""
    return sorted(Path(exp_dir, "checkpoints").glob("[0-9][0-9][0-9][0-9][0-9][0-9][0-9].pt"))


def latest_checkpoint(exp_dir):
    ckpts = checkpoint_files(exp_dir)
    if not ckpts:
        raise CheckpointError(f"--resume {exp_dir}: no checkpoints/NNNNNNN.pt in this experiment folder")
    return ckpts[-1]


def recovery_advice(exp_dir, change, bad_from=None, skipping=False):
    """What to do after a run stopped, true in the state it stopped in.

    With a checkpoint: resume from it. Before the first one there is nothing to resume
    (--resume would exit 2), so: start again. `change` says how, e.g. "with a lower --lr".
    bad_from: the first checkpoint step whose weights gave the non-finite loss (the loss
    of step s is computed from the weights after s - 1 updates). Resuming from such a
    checkpoint replays that very forward pass, so a lower --lr cannot help there: only
    --skip-nonfinite can (a bad batch), and once the run was `skipping` already, nothing.
    """
    ckpts = checkpoint_files(exp_dir)
    if ckpts and (bad_from is None or int(ckpts[-1].stem) < bad_from):
        return f"the last checkpoint {ckpts[-1]} is intact: resume {change} (--resume {exp_dir})"
    if ckpts and not skipping:
        return (f"the last checkpoint {ckpts[-1]} holds the weights that gave this loss, so resuming replays it "
                f"whatever the --lr: resume with --skip-nonfinite if only some batches are bad (--resume "
                f"{exp_dir}); if the loss stays non-finite, the weights have diverged: start the run again with a "
                f"lower --lr")
    if ckpts:
        return (f"the last checkpoint {ckpts[-1]} holds weights that give a non-finite loss, so resuming fails "
                f"again: start the run again {change} (and check the data for non-finite values)")
    return (f"no checkpoint was written yet, so there is nothing to resume: start the run again {change} "
            f"({exp_dir} holds no checkpoint and can be deleted)")


# --skip-nonfinite passes over a rare bad batch; this many non-finite losses in a row (the
# weights unchanged all along) mean the weights themselves have diverged.
MAX_SKIPPED_IN_A_ROW = 10


def remove_stale_temporaries(exp_dir):
    """Delete checkpoint files left half-written by a run killed while saving; the final files are intact."""
    for stale in (Path(exp_dir) / "checkpoints").glob(".*.tmp-*"):
        stale.unlink()


def new_experiment_dir(results_dir, model_name):
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for d in results_dir.iterdir() if (m := re.match(r"(\d{3,})-", d.name))]
    exp_dir = results_dir / f"{max(numbers, default=-1) + 1:03d}-{model_name.replace('/', '-')}"
    (exp_dir / "checkpoints").mkdir(parents=True)
    return exp_dir


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


#################################################################################
#                                 Training                                      #
#################################################################################

def open_training_data(args, seed):
    """(dataset, VAE or None, latent normalisation (scale, shift), model input channels, model input size).

    Feature folders hold latents already normalised by the VAE that made them; images are
    encoded on the fly with the VAE of --vae / --vae-path. Either way the normalisation is
    recorded in the checkpoint, and a VAE named for sampling must have the same.
    """
    if args.feature_path:
        dataset = open_feature_folder(args.feature_path, seed, flip=not args.no_flip, num_classes=args.num_classes,
                                      images=getattr(args, "repa", False))
        sample = dataset[0][0]
        expected = args.image_size // 8
        if sample.shape[-1] != expected:
            raise DataError(f"--feature-path {args.feature_path}: latents are {sample.shape[-1]}x{sample.shape[-2]}, "
                            f"but --image-size {args.image_size} needs {expected}x{expected} (the SD VAE divides by 8)")
        normalization = dataset.latent_normalization
        check_latent_normalization(normalization, vae_config_normalization(args.vae, args.vae_path),
                                   f"--feature-path {args.feature_path}", f"the VAE of --vae {args.vae}"
                                   + (f" --vae-path {args.vae_path}" if args.vae_path else ""))
        return dataset, None, normalization, sample.shape[0], sample.shape[-1]
    dataset = ImageDataset(args.data_path, args.image_size, seed, flip=not args.no_flip)
    if len(dataset.classes) > args.num_classes:
        raise DataError(f"--data-path {args.data_path}: {len(dataset.classes)} class folders, more than "
                        f"--num-classes {args.num_classes}")
    return dataset, "vae", None, None, None


def model_config(args, in_channels, latent_size, normalization, trained_labels):
    """What sampling needs to rebuild the network and its inputs: stored as `args` in every checkpoint.

    trained_labels: the class indices the data holds (sorted), or None when unknown
    (the per-file public feature layouts); samplers draw only these.
    """
    return {"model": args.model, "model_kwargs": dict(args.model_kwargs), "image_size": args.image_size,
            "latent_size": latent_size, "in_channels": in_channels, "num_classes": args.num_classes,
            "vae": args.vae, "label_dropout": args.label_dropout, "class_dropout_prob": args.class_dropout_prob,
            "latent_scale": normalization[0], "latent_shift": normalization[1], "trained_labels": trained_labels,
            "objective": args.objective, "time_sampling": args.time_sampling,
            "logit_normal_loc": args.logit_normal_loc, "logit_normal_scale": args.logit_normal_scale,
            "learn_sigma": args.model_kwargs.get("learn_sigma", args.objective == "ddpm")}


def class_coverage_warning(args, trained_labels, class_folders=0):
    """A log line when the data holds fewer classes than the model has label rows; None otherwise.

    The --num-classes it suggests must hold every label and, for an image folder, every
    class folder (empty ones too: they take an index): max(labels) + 1 and class_folders.
    """
    if trained_labels is None or len(trained_labels) >= args.num_classes:
        return None
    smallest = max(max(trained_labels) + 1, class_folders)
    fix = (f"pass --num-classes {smallest} for a model of this data" if smallest < args.num_classes else
           "the classes without data have indices below the largest one, so no smaller --num-classes holds it")
    return (f"warning: the data holds {len(trained_labels)} classes but --num-classes is {args.num_classes}: "
            f"{args.num_classes - len(trained_labels)} label rows are never trained (samplers draw only the "
            f"trained classes {format_labels(trained_labels)}); {fix}")


def format_labels(labels):
    return ", ".join(map(str, labels[:8])) + (f", ... ({len(labels)} in all)" if len(labels) > 8 else "")


def load_initial_weights(model, args):
    """--ckpt: weights of another run to fine-tune from; refuses another objective unless allowed.

    Returns a log line when the objective changes (the output layer, whose shape differs,
    keeps its fresh zero initialisation).
    """
    checkpoint = load_checkpoint(args.ckpt)
    saved = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    source_objective, time_convention = recorded_objective(saved if isinstance(saved, dict) else {}, args.ckpt)
    if time_convention == "sit":  # our flow, but its network runs time and velocity the other way round
        source_objective = "flow in SiT's time direction"
    state_dict = model_state_dict(checkpoint)
    if source_objective == args.objective:
        load_weights(model, state_dict, args.ckpt)
        return None
    if not args.allow_objective_change:
        raise ActionableError(f"--ckpt {args.ckpt} was trained with --objective {source_objective}, this run uses "
                              f"--objective {args.objective}; add --allow-objective-change to fine-tune across them")
    skipped = load_weights(model, state_dict, args.ckpt, skip_mis_shaped=True)
    return (f"fine-tuning a {source_objective} checkpoint with --objective {args.objective}: "
            f"{len(skipped)} tensors of another shape start fresh ({', '.join(skipped)})")


class TrainingInputs:
    """Stage 1 of a run: data, VAE, network, encoder and projector, all opened and checked.

    Everything that can fail on the user's settings is opened here, before the experiment
    folder exists, so a bad setting leaves nothing behind (the flags' ranges and paths were
    checked when parsed). The random draws (network, projector initialisation) happen here,
    in a fixed order after the per-rank seed: exact resume and the bitwise tests rely on it.
    """

    def __init__(self, args, backend):
        device, rank, world = backend.device, backend.rank, backend.world_size
        print(f"[rank {rank}/{world}] local rank {backend.local_rank}, device {device}", flush=True)
        if args.global_batch_size % world:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
        self.local_batch = args.global_batch_size // world
        torch.manual_seed(args.global_seed * world + rank)

        self.encoder = open_encoder(args, device)  # before the data: missing weights must not wait for a data scan
        self.dataset, vae, normalization, in_channels, latent_size = open_training_data(args, args.global_seed)
        if vae is not None:
            vae = load_vae(args.vae, args.vae_path, device)
            if vae is not None:  # None in pixel space (--vae none)
                check_recorded_weights(args, "vae_digest", vae, f"--vae-path {args.vae_path}" if args.vae_path
                                       else f"--vae {args.vae} (its cached weights)")
            in_channels, latent_size = latent_channels(vae), args.image_size // latent_factor(vae)
            normalization = latent_normalization(vae)
        self.vae = vae
        self.trained_labels = self.dataset.labels_present()
        self.steps_per_epoch = (len(self.dataset) // world) // self.local_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.dataset)} samples are fewer than one global batch of {args.global_batch_size}")
        self.config = model_config(args, in_channels, latent_size, normalization, self.trained_labels)
        grid_labels(args, self.config)  # --sample-classes against the data's classes
        self.model = build_model(self.config).to(device)
        self.initial_weights_note = None
        if args.ckpt and not args.resume:
            self.initial_weights_note = load_initial_weights(self.model, args)
        self.aligner = None
        if self.encoder is not None:
            self.aligner = build_aligner(args, self.model, self.encoder).to(device)
            broadcast_module(self.aligner)  # drawn from each rank's seed: start all from rank 0's, as DDP does

    def notes(self, args):
        """Log lines about the data and the initial weights, or nothing."""
        coverage = class_coverage_warning(args, self.trained_labels, len(getattr(self.dataset, "classes", [])))
        return [note for note in (coverage, self.initial_weights_note, snapshot_schedule_note(args)) if note]

    def trained_parameters(self):
        """The network's and the projector's: the projector trains with the network but stays out of its state dict
        and EMA."""
        return [*self.model.parameters(), *(self.aligner.parameters() if self.aligner is not None else ())]


def open_experiment(args, rank):
    """Stage 2: the experiment folder (a new numbered one, or --resume's), the same for every process.

    A new experiment draws args.run_id, which its checkpoints and post-hoc snapshots carry
    and a resumed run keeps: python -m udit.phema refuses to combine the snapshots of two
    runs of one network (copied into one folder), which nothing else tells apart.
    """
    # Every process reads the checkpoints on resume: the folder must be one folder for all nodes.
    if args.resume:
        exp_dir = Path(args.resume)
        open_shared_folder(exp_dir, "--resume", lambda: remove_stale_temporaries(exp_dir))
        return exp_dir
    open_shared_folder(args.results_dir, "--results-dir",
                       lambda: Path(args.results_dir).mkdir(parents=True, exist_ok=True))
    exp_dir, args.run_id = broadcast_object((str(new_experiment_dir(args.results_dir, args.model)),
                                             secrets.token_hex(8)) if rank == 0 else None)
    return Path(exp_dir)


class Position:
    """Where training stands: steps done, epoch, batches done in that epoch (what exact resume restores)."""

    def __init__(self, step=0, epoch=0, batch=0):
        self.step, self.epoch, self.batch = step, epoch, batch

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "position": self.batch}


def resume_training(args, checkpoint, inputs, emas, opt, backend, logger):
    """Stage 3 with --resume: weights, EMAs, projector, optimizer, random streams; returns the Position.

    The random streams continue only with the process count that saved them.
    """
    path, world = args.resume_checkpoint, backend.world_size
    load_weights(inputs.model, checkpoint["model"], path)
    emas.load_state_dict(checkpoint, path)
    if inputs.aligner is not None:
        inputs.aligner.load_state_dict(checkpoint["aligner"])
    opt.load_state_dict(checkpoint["opt"])
    for group in opt.param_groups:
        group["lr"] = args.lr  # the saved one unless --lr was given with --resume
    position = Position(checkpoint["step"], checkpoint["epoch"], checkpoint["position"])
    states = checkpoint.get("rng", [])
    if len(states) == world:
        set_rng_state(states[backend.rank], backend.device)
    else:
        logger.info("resuming with %d processes instead of %d: random streams restart", world, len(states))
    backend.load_extra_state(checkpoint.get("backend", {}))
    changed = [k for k in args.given if k != "resume" and checkpoint["args"].get(k) != getattr(args, k)]
    logger.info("resumed from %s at step %d (epoch %d, batch %d)%s", path, position.step, position.epoch,
                position.batch, "".join(f"; {k} {checkpoint['args'].get(k)!r} -> {getattr(args, k)!r}"
                                        for k in changed))
    return position


class LogWindow:
    """The steps since the last log line: device sums of the loss terms, counts of skipped and clipped steps."""

    def __init__(self):
        self.running, self.steps, self.clipped = None, 0, 0
        self.start = time.time()

    def add(self, terms):
        self.running = terms if self.running is None else self.running + terms
        self.steps += 1

    def means(self, count):
        return (self.running / self.steps).tolist() if self.steps else [math.nan] * count


class NonFiniteGuard:
    """--skip-nonfinite's bookkeeping: a non-finite loss stops the run, or skips its step up to a limit."""

    def __init__(self, args, exp_dir, logger):
        self.args, self.exp_dir, self.logger = args, exp_dir, logger
        self.skipped, self.in_a_row = 0, 0

    def finite(self):
        self.in_a_row = 0

    def non_finite(self, loss, step):
        """Raises NonFiniteLoss unless the step may be skipped."""
        if not self.args.skip_nonfinite:
            advice = recovery_advice(self.exp_dir, "with a lower --lr or with --skip-nonfinite", step - 1)
            raise NonFiniteLoss(f"loss is {loss} at step {step}: stopping; {advice}")
        self.skipped += 1
        self.in_a_row += 1
        self.logger.info("step %d: non-finite loss, step skipped (%d so far)", step, self.skipped)
        if self.in_a_row == MAX_SKIPPED_IN_A_ROW:
            first = step - self.in_a_row + 1
            advice = recovery_advice(self.exp_dir, "with a lower --lr", first - 1, skipping=True)
            raise NonFiniteLoss(f"{self.in_a_row} non-finite losses in a row (steps {first}-{step}): the "
                                f"weights have diverged, stopping; {advice}")

    def check_run(self, steps_run, first_step):
        if steps_run and self.skipped == steps_run:
            advice = recovery_advice(self.exp_dir, "with a lower --lr", first_step, skipping=True)
            raise NonFiniteLoss(f"every one of the {self.skipped} steps of this run had a non-finite loss: nothing "
                                f"was trained; {advice}")


class Trainer:
    """Stages 3 to 5 of a run: optimiser and resume, the compiled or graphed step, the loop with its logs and
    checkpoints. `train()` below is the whole run in order."""

    def __init__(self, args, backend, inputs, exp_dir, logger):
        self.args, self.backend, self.inputs, self.exp_dir, self.logger = args, backend, inputs, exp_dir, logger
        self.device, self.rank, self.world = backend.device, backend.rank, backend.world_size
        model, aligner = inputs.model, inputs.aligner
        model.grad_checkpointing = args.grad_checkpointing
        self.emas = TrainingEMAs(model, args, inputs.config, exp_dir, self.rank)
        self.trained = inputs.trained_parameters()
        # The fused kernel exists for CPUs too, where it is 3x faster than the per-tensor loop.
        opt = torch.optim.AdamW(self.trained, lr=args.lr, weight_decay=0, fused=True)
        self.position = Position()
        if args.resume:
            checkpoint = load_checkpoint(args.resume_checkpoint)
            self.position = resume_training(args, checkpoint, inputs, self.emas, opt, backend, logger)
            del checkpoint

        model.train()
        self.hooks = ExitStack()
        if aligner is not None:  # registered before wrapping and compiling, after the EMA copy
            captured = self.hooks.enter_context(capture_block_outputs(model, [aligner.block_name]))
        self.train_model, self.opt = backend.prepare(model, opt)
        if args.compile:
            cache_rope_tables(model)  # before compiling: the compiled code reads them, not recomputes them
            self.train_model = torch.compile(self.train_model)
        self.objective = create_objective(inputs.config)
        if aligner is not None:
            self.objective = AlignedObjective(self.objective, aligner, captured, backend.autocast)
        graphed = getattr(backend, "cuda_graph", False)  # train_accelerate's backend has no graphs
        self.graphed_step = GraphedTrainingStep(self.loss_terms, self.trained) if graphed else None

        logger.info("experiment %s: %s (%s params), %d samples, %d processes x batch %d, %d steps/epoch",
                    exp_dir, args.model, f"{sum(p.numel() for p in model.parameters()):,}", len(inputs.dataset),
                    self.world, inputs.local_batch, inputs.steps_per_epoch)
        self.monitor = Monitor(args, exp_dir, inputs.config, self.rank, self.world, self.device, inputs.vae,
                               inputs.local_batch, self.position.step, logger)
        if aligner is not None:
            encoder = inputs.encoder
            logger.info("alignment: %s (%dx%d tokens) -> %s (%dx%d x %d), align %g, manifold %g, projector %s "
                        "params", aligner.block_name, aligner.grid, aligner.grid, encoder.name, encoder.grid,
                        encoder.grid, encoder.width, aligner.align_coeff, aligner.manifold_coeff,
                        f"{sum(p.numel() for p in aligner.parameters()):,}")
        self.guard = NonFiniteGuard(args, exp_dir, logger)
        self.window = LogWindow()
        self.grad_norm = torch.tensor(math.nan)
        self.skipped_images = 0

    # ------------------------------------------------------------------ the step

    def model_fn(self, x, t, **kwargs):
        with self.backend.autocast():
            return self.train_model(x, t, **kwargs).float()

    def loss_terms(self, x, t, y, **features):
        """Batch means of the objective's terms: "loss" (minimised) and its parts (e.g. "mse", "vb", "align")."""
        return {name: value.mean() for name, value in self.objective.losses(self.model_fn, x, t, y, **features).items()}

    def batch_inputs(self, x, y, images):
        """Device latents, labels and, with alignment, the encoder's targets for the clean images of this batch."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        features = {}
        if self.inputs.encoder is not None:  # the clean image of this very latent: the store's, or x before the VAE
            clean = images[0].to(self.device, non_blocking=True) if images else x
            features = {"target": encoder_targets(self.inputs.encoder, clean, self.backend.autocast)}
        if self.inputs.vae is not None:
            with self.backend.autocast():
                x = encode(self.inputs.vae, x).float()
        return x, y, features

    def step(self, x, y, ok, images, run_start):
        """One training step on a batch; returns True when the run must stop after it (max steps or minutes)."""
        args = self.args
        x, y, features = self.batch_inputs(x, y, images)
        t = self.objective.sample_time(x.shape[0], self.device)
        # Graphed: forward and backward (and the gradient all-reduce) happen here.
        terms = (self.loss_terms(x, t, y, **features) if self.graphed_step is None else
                 self.graphed_step(x, t, y, **features))
        names = ["loss", *sorted(terms.keys() - {"loss"})]
        # One all-reduce per step carries the loss terms, the unreadable images and every rank's out-of-time flag.
        out_of_time = args.max_minutes is not None and time.time() - run_start > 60 * args.max_minutes
        flags = torch.tensor([float((~ok).sum()), float(out_of_time)], device=self.device)
        reduced = all_reduce_mean(torch.cat([torch.stack([terms[name].detach() for name in names]), flags]))
        mean_loss, stop_now = reduced[0], bool(reduced[-1] > 0)
        self.skipped_images += reduced[-2] * self.world
        position = self.position
        position.step += 1
        position.batch += 1
        stop_now = stop_now or position.step >= args.max_steps
        log_now = position.step % args.log_every == 0 or stop_now
        if not torch.isfinite(mean_loss):
            self.guard.non_finite(mean_loss.item(), position.step)
        else:
            self.guard.finite()
            self.update(terms["loss"], log_now)
            self.window.add(reduced[:len(names)])
        if log_now:
            self.log(names, run_start)
        self.emas.save_snapshots(position.step)
        if position.step % args.ckpt_every == 0 or stop_now:
            self.save_checkpoint()
        self.window.start += self.monitor.after_step(position.step, self.emas.fixed)  # not training time
        return stop_now

    def update(self, loss, log_now):
        """Backward (unless graphed), clipping, the optimiser step and the EMAs."""
        if self.graphed_step is None:
            self.opt.zero_grad(set_to_none=True)
            self.backend.backward(loss)
            if self.inputs.aligner is not None:
                average_gradients(self.inputs.aligner.parameters())
        # The norm costs a pass over the gradients: every step when clipping, else at log steps only.
        if self.args.max_grad_norm is not None or log_now:
            self.grad_norm = self.backend.clip_grad_norm(self.trained, self.args.max_grad_norm)
            if self.args.max_grad_norm is not None:
                self.window.clipped += self.grad_norm > self.args.max_grad_norm
        self.opt.step()
        self.emas.update(self.backend.unwrap(self.train_model), self.position.step)

    # ------------------------------------------------------------------ logs and checkpoints

    def log(self, names, run_start):
        """The log line and the monitor's scalars for the window since the last one; starts a new window."""
        args, step, window = self.args, self.position.step, self.window
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        steps_per_sec = window.steps / (time.time() - window.start) if window.steps else 0.0
        means = window.means(len(names))
        eta = (args.max_steps - step) / steps_per_sec if steps_per_sec else math.inf
        if args.max_minutes is not None:
            eta = min(eta, max(0.0, 60 * args.max_minutes - (time.time() - run_start)))
        values = {**dict(zip(names, means)), "grad_norm": float(self.grad_norm), "lr": self.opt.param_groups[0]["lr"],
                  "steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * args.global_batch_size,
                  "skipped_images": round(float(self.skipped_images)), "skipped_steps": self.guard.skipped}
        # The alignment terms beside the total: whether the projection is learned shows here first.
        extra = "".join(f", {name.capitalize()}: {values[name]:.4f}" for name in ("align", "manifold") if name in values)
        extra += f", skipped images: {values['skipped_images']}" if values["skipped_images"] else ""
        if args.max_grad_norm is not None:
            values["clipped_fraction"] = float(window.clipped) / max(window.steps, 1)
            extra += f", clipped: {values['clipped_fraction']:.0%}"
        self.logger.info("(step=%07d) Train Loss: %.4f, Grad Norm: %.3g, Train Steps/Sec: %.2f, Images/Sec: %.1f, "
                         "ETA: %s%s", step, means[0], values["grad_norm"], steps_per_sec, values["images_per_sec"],
                         format_seconds(eta), extra)
        self.monitor.log(step, values)
        self.window = LogWindow()

    def save_checkpoint(self):
        """Every rank's random state, gathered; rank 0 writes the checkpoint atomically. Refuses non-finite weights."""
        aligner = self.inputs.aligner
        # The projector is outside DDP, whose gradient averaging keeps the network equal on every rank; its
        # own averaging (average_gradients) is checked here, in the gather the random states need anyway.
        gathered = all_gather_objects((rng_state(self.device),
                                       parameter_digest(aligner) if aligner is not None else None))
        states = [state for state, _ in gathered]
        if len({digest for _, digest in gathered}) > 1:
            raise RuntimeError(f"step {self.position.step}: the processes hold different projector weights "
                               f"(--repa); this is a bug, please report it with the command line")
        if self.rank == 0:
            step, exp_dir = self.position.step, self.exp_dir
            unwrapped = self.backend.unwrap(self.train_model)
            if not (all_finite(unwrapped) and all_finite(self.emas.fixed)):
                raise NonFiniteLoss(f"non-finite weights at step {step}: checkpoint not written; "
                                    f"{recovery_advice(exp_dir, 'with a lower --lr')}")
            path = exp_dir / "checkpoints" / f"{step:07d}.pt"
            try:
                save_atomic({"model": unwrapped.state_dict(), **self.emas.state_dict(), "opt": self.opt.state_dict(),
                             **self.position.state_dict(), "rng": states, "backend": self.backend.extra_state(),
                             "args": {**vars(self.args), **self.inputs.config},
                             **({"aligner": aligner.state_dict()} if aligner is not None else {})}, path)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                raise OSError(errno.ENOSPC, f"{err.strerror}; {recovery_advice(exp_dir, 'after freeing space')}") \
                    from None
            self.logger.info("saved checkpoint %s", path)
        barrier()

    # ------------------------------------------------------------------ the loop

    def done(self):
        return self.position.step >= self.args.max_steps or (self.args.epochs is not None and
                                                              self.position.epoch >= self.args.epochs)

    def loader(self):
        """The data of the current epoch from the current batch on, this rank's share."""
        args, inputs, position = self.args, self.inputs, self.position
        inputs.dataset.set_epoch(position.epoch)
        sampler = ResumableDistributedSampler(len(inputs.dataset), self.rank, self.world, args.global_seed,
                                              position.epoch, start_index=position.batch * inputs.local_batch)
        # The loader gets its own generator: creating an iterator must not draw from the
        # global RNG, whose state the checkpoints carry for exact resume.
        return DataLoader(inputs.dataset, batch_size=inputs.local_batch, sampler=sampler,
                          num_workers=args.num_workers, pin_memory=self.device.type == "cuda", drop_last=True,
                          generator=torch.Generator().manual_seed(args.global_seed + position.epoch))

    def run(self):
        """Train to --max-steps / --epochs / --max-minutes; the last step is always checkpointed."""
        first_step, run_start = self.position.step, time.time()
        self.window.start = run_start
        while not self.done():
            stopped = False
            for x, y, ok, *images in self.loader():
                if self.step(x, y, ok, images, run_start):
                    stopped = True
                    break
            if stopped:
                break
            self.position.epoch += 1
            self.position.batch = 0
            if self.args.epochs is not None and self.position.epoch >= self.args.epochs and \
                    self.position.step % self.args.ckpt_every:
                self.save_checkpoint()
        self.hooks.close()
        self.guard.check_run(self.position.step - first_step, first_step)
        self.monitor.close(self.position.step, self.emas.fixed)
        self.logger.info("done: step %d, epoch %d", self.position.step, self.position.epoch)


def train(args, backend):
    """Run (or resume) a training experiment. Returns the experiment folder.

    Stages: the inputs, opened and checked before anything is created (TrainingInputs);
    the experiment folder and its log; the optimiser, resume and the step (Trainer); the loop.
    """
    inputs = TrainingInputs(args, backend)
    exp_dir = open_experiment(args, backend.rank)
    logger = create_logger(exp_dir, backend.rank == 0)
    for note in inputs.notes(args):
        logger.info(note)
    Trainer(args, backend, inputs, exp_dir, logger).run()
    return exp_dir


def format_seconds(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
