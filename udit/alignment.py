"""Representation alignment: REPA for DiT, U-REPA for U-DiT, as a wrapper around any objective.

REPA (Yu et al., ICLR 2025, arXiv 2410.06940, Eq. 8): a hidden state h of the network on
the noisy input, projected per token by a small MLP g, is pulled towards the patch
features y of a frozen encoder on the clean image (udit/encoders.py):

    L_align = -1/T sum_t cos(g(h)_t, y_t),        loss = L_denoise + align_coeff * L_align

at DiT block 4 of 12 (B) or 8 of 24 / 28 (L, XL), counting from 1 (--align-block), with
g = Linear(hidden, 2048), SiLU, Linear(2048, 2048), SiLU, Linear(2048, D) and
align_coeff 0.5.

U-REPA (Tian et al., NeurIPS 2025, arXiv 2503.18414) adapts it to U-shaped networks: the
middle stage is aligned (its skip connections make the outer stages poor places; here
the output of U-DiT's `latent` stage, --align-stage), the stage's low-resolution tokens
pass through the MLP first and are then upsampled to the encoder's token grid, and a
manifold loss matches the relative similarity between the samples of a batch:

    s^h_ij = 1/T sum_t cos(g(h)_i,t, g(h)_j,t),   s^y_ij = 1/T sum_t cos(y_i,t, y_j,t)
    L_manifold = 1/N^2 sum_i sum_j (s^h_ij - s^y_ij)^2,   loss += manifold_coeff * L_manifold

with coefficients 0.5 (alignment) and 3.0 (manifold). U-REPA's code is not released: the
sample similarity as the token-averaged cosine is our reading of the paper's "relative
similarity between samples". The N samples are those of one process's batch, so the
manifold term depends on the per-process batch size (as BatchNorm statistics do).

Token grids: the aligned state has a g x g grid (DiT: latent / patch; U-DiT: latent /
stride of the stage), the encoder a G x G grid. After the projector the grid is
resampled to G x G: average pooling over (g/G)^2 tokens when G divides g, bilinear
upsampling (align_corners False) when g divides G. Grids of which neither divides the
other are refused (EncoderError), as are non-square ones.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import DiT, U_DiT, create_model
from udit.checkpoint import check_recorded_weights
from udit.cli import number, positive_int
from udit.encoders import DINOV2, EncoderError, load_encoder

U_DIT_STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
U_REPA_STAGE = "latent"
REPA_BLOCKS = {12: 4, 24: 8, 28: 8}  # DiT depth -> REPA's aligned block (SiT-B: 4; SiT-L, SiT-XL: 8)
ALIGN_COEFF = 0.5  # REPA and U-REPA
MANIFOLD_COEFF = {"U-DiT": 3.0, "DiT": 0.0}  # U-REPA's; REPA has no manifold term
ALIGNMENT_FLAGS = ("encoder", "encoder_weights", "align_block", "align_stage", "align_coeff", "manifold_coeff",
                   "projector_width")


class Projector(nn.Sequential):
    """REPA's per-token MLP: (..., hidden) -> (..., out): Linear(hidden, width), SiLU, Linear(width, width), SiLU,
    Linear(width, out). width 2048 in REPA."""

    def __init__(self, hidden, out, width=2048):
        super().__init__(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, out))


def negative_cosine(projected, target):
    """REPA's alignment loss per sample: (N, T, D), (N, T, D) -> (N,) = -1/T sum_t cos(projected_t, target_t).

    Normalised in float32 whatever the inputs' dtype: fp16 normalisation overflows (REPA #46).
    """
    p, y = F.normalize(projected.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return -(p * y).sum(-1).mean(-1)


def sample_similarity(tokens):
    """(N, T, D) -> (N, N): s_ij = 1/T sum_t cos(tokens_i,t, tokens_j,t), in float32."""
    unit = F.normalize(tokens.float(), dim=-1)
    return torch.einsum("itd,jtd->ij", unit, unit) / tokens.shape[1]


def manifold_loss(projected, target):
    """U-REPA's manifold loss per sample: (N, T, D) x 2 -> (N,) = 1/N sum_j (s^h_ij - s^y_ij)^2.

    Its batch mean is 1/N^2 sum_ij (s^h_ij - s^y_ij)^2 (module docstring).
    """
    return (sample_similarity(projected) - sample_similarity(target)).square().mean(1)


def check_resamplable(grid, target_grid, where):
    """Raise EncoderError unless a grid x grid token map can be resampled to target_grid x target_grid."""
    if grid % target_grid and target_grid % grid:
        raise EncoderError(f"{where}: its {grid}x{grid} tokens cannot be resampled to the encoder's "
                           f"{target_grid}x{target_grid} (neither side divides the other); choose another "
                           f"--align-stage/--align-block, --image-size or encoder")


def resample_grid(tokens, size):
    """(N, g, g, D) -> (N, size, size, D): average pooling when size divides g, bilinear when g divides size."""
    g = tokens.shape[1]
    if g == size:
        return tokens
    x = tokens.permute(0, 3, 1, 2)
    if g % size == 0:
        x = F.avg_pool2d(x, g // size)
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)


def default_align_block(depth):
    """REPA's block for a DiT of `depth` blocks (counting from 1); a third of the depth for other depths."""
    return REPA_BLOCKS.get(depth, max(1, depth // 3))


def alignment_site(model, align_block=None, align_stage=None):
    """(block name for capture_block_outputs, its width, its token grid side) of the aligned state.

    DiT: block `align_block` (1..depth; REPA's default by depth). U-DiT: the last block of
    stage `align_stage` (U-REPA: the middle one). Raises EncoderError naming the flag.
    """
    if isinstance(model, DiT):
        depth = len(model.blocks)
        block = align_block or default_align_block(depth)
        if not 1 <= block <= depth:
            raise EncoderError(f"--align-block {block}: this DiT has blocks 1..{depth}")
        return f"blocks.{block - 1}", model.pos_embed.shape[-1], model.input_size // model.patch_size
    stage = align_stage or U_REPA_STAGE
    if stage not in U_DIT_STAGES:
        raise EncoderError(f"--align-stage {stage}: U-DiT has the stages {', '.join(U_DIT_STAGES)}")
    index = U_DIT_STAGES.index(stage)
    level = model.levels()[index]
    if not len(level):
        raise EncoderError(f"--align-stage {stage}: this U-DiT has no block in that stage (depth "
                           f"{[len(lv) for lv in model.levels()]}); choose another stage")
    width = level[-1].adaLN_modulation1[-1].in_features
    return f"{stage}.{len(level) - 1}", width, model.input_size // model.level_strides[index]


class Aligner(nn.Module):
    """The projector of one aligned state and the alignment losses: state_dict holds `projector.*` only.

    model: the DiT or U-DiT whose state is aligned (alignment_site); encoder_grid G and
    encoder_width D: the encoder's tokens per side and width; align_coeff and
    manifold_coeff: the weights of the two terms (a zero manifold weight skips it).
    project(hidden) maps the captured block output (DiT (N, g*g, C); U-DiT channels-last
    (N, g, g, C)) through the projector, then to the encoder's grid: (N, G*G, D). Raises
    EncoderError if the grids cannot be resampled.
    """

    def __init__(self, model, encoder_grid, encoder_width, align_block=None, align_stage=None, align_coeff=0.5,
                 manifold_coeff=0.0, projector_width=2048):
        super().__init__()
        self.block_name, hidden, self.grid = alignment_site(model, align_block, align_stage)
        check_resamplable(self.grid, encoder_grid, f"aligned block {self.block_name}")
        self.encoder_grid = encoder_grid
        self.align_coeff, self.manifold_coeff = align_coeff, manifold_coeff
        self.projector = Projector(hidden, encoder_width, projector_width)

    def project(self, hidden):
        n = hidden.shape[0]
        z = self.projector(hidden.reshape(n, self.grid, self.grid, hidden.shape[-1]))
        return resample_grid(z, self.encoder_grid).reshape(n, self.encoder_grid ** 2, z.shape[-1])

    def losses(self, projected, target):
        """Per-sample terms (N,): "align" and, with a manifold coefficient, "manifold"; target (N, G*G, D)."""
        if target.shape != projected.shape:
            raise ValueError(f"encoder features {tuple(target.shape)} do not match the projection "
                             f"{tuple(projected.shape)}")
        terms = {"align": negative_cosine(projected, target)}
        if self.manifold_coeff:
            terms["manifold"] = manifold_loss(projected, target)
        return terms


class AlignedObjective:
    """An objective (udit/objectives.py) with the alignment terms added to its loss.

    losses(model_fn, x0, t, y, target) runs the base objective's one forward pass, reads
    the aligned block's output from `captured` (the dict of models.capture_block_outputs,
    entered for the whole run), projects it under `autocast` and adds
    align_coeff * align + manifold_coeff * manifold to "loss". target: the encoder's
    features of the clean images, computed outside (and before) the possibly graphed step.
    """

    def __init__(self, base, aligner, captured, autocast):
        self.base, self.aligner, self.captured, self.autocast = base, aligner, captured, autocast
        self.name, self.learn_sigma = base.name, base.learn_sigma

    def sample_time(self, n, device):
        return self.base.sample_time(n, device)

    def losses(self, model_fn, x0, t, y, target):
        terms = self.base.losses(model_fn, x0, t, y)
        with self.autocast():
            projected = self.aligner.project(self.captured[self.aligner.block_name])
        extra = self.aligner.losses(projected, target)
        loss = terms["loss"] + self.aligner.align_coeff * extra["align"]
        if "manifold" in extra:
            loss = loss + self.aligner.manifold_coeff * extra["manifold"]
        return {**terms, **extra, "loss": loss}


@torch.no_grad()
def encoder_targets(encoder, images, autocast):
    """The encoder's features (N, T, D) float32 of clean images (N, 3, S, S) in [-1, 1], without grad.

    Computed outside the (possibly graphed) training step and fed to it, like the time draw.
    """
    with autocast():
        return encoder(images).float()


def average_gradients(parameters):
    """All-reduce-average the gradients of parameters that DDP does not wrap (the projector), one call."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])


#################################################################################
#                               Command line                                    #
#################################################################################

def add_alignment_args(parser):
    g = parser.add_argument_group("representation alignment (REPA for DiT, U-REPA for U-DiT)")
    g.add_argument("--repa", action="store_true",
                   help="align a hidden state with a frozen encoder's patch features of the clean image")
    g.add_argument("--encoder", default="dinov2-vitb14",
                   help=f"{', '.join(DINOV2)}, or a file written by udit.encoders.save_encoder")
    g.add_argument("--encoder-weights", metavar="PATH",
                   help="DINOv2 weights file (timm .safetensors or the original .pth); default: the Hugging Face cache")
    g.add_argument("--align-block", type=positive_int,
                   help="DiT: the aligned block, counting from 1 (default REPA's: 4 for 12 blocks, 8 for 24 or 28)")
    g.add_argument("--align-stage", choices=U_DIT_STAGES,
                   help=f"U-DiT: the stage whose output is aligned (default U-REPA's middle stage, {U_REPA_STAGE})")
    g.add_argument("--align-coeff", type=number(float, min=0), default=ALIGN_COEFF,
                   help="weight of the alignment loss (REPA: 0.5)")
    g.add_argument("--manifold-coeff", type=number(float, min=0),
                   help="weight of U-REPA's manifold loss (default 3.0 for U-DiT, 0 for DiT)")
    g.add_argument("--projector-width", type=positive_int, default=2048, help="hidden width of the projector MLP")


def check_alignment_args(parser, args):
    """Exit 2 with one line on alignment settings that cannot work; fills in the defaults by family.

    Runs before any data, weights or folder is touched.
    """
    given = [k for k in ALIGNMENT_FLAGS if k in args.given]
    if not args.repa:
        if given:
            parser.error(f"--{given[0].replace('_', '-')} applies with --repa only")
        return
    if args.encoder not in DINOV2 and not Path(args.encoder).is_file():
        looks_like_a_path = "/" in args.encoder or Path(args.encoder).suffix in (".pt", ".pth", ".safetensors")
        if looks_like_a_path and getattr(args, "encoder_digest", None) and "encoder" not in args.given:
            parser.error(f"--encoder {args.encoder}: no such file, where the experiment's encoder was; if it moved, "
                         f"resume with --encoder NEW_PATH (its weights are checked against the recorded SHA-256)")
        parser.error(f"--encoder {args.encoder}: " + ("no such file" if looks_like_a_path else "unknown encoder")
                     + f"; use one of {', '.join(DINOV2)} or the path of a file written by "
                       f"udit.encoders.save_encoder")
    if args.encoder_weights and not Path(args.encoder_weights).is_file():
        parser.error(f"--encoder-weights {args.encoder_weights}: no such file")
    family = "U-DiT" if args.model.startswith("U-DiT") else "DiT"
    if family == "U-DiT" and args.align_block is not None:
        parser.error("--align-block chooses a DiT block; U-DiT aligns a stage: use --align-stage")
    if family == "DiT" and args.align_stage is not None:
        parser.error("--align-stage chooses a U-DiT stage; DiT aligns a block: use --align-block")
    if args.manifold_coeff is None:
        args.manifold_coeff = MANIFOLD_COEFF[family]
    for flag in ("align_coeff", "manifold_coeff"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.align_coeff == 0 and args.manifold_coeff == 0:
        parser.error("--align-coeff 0 and --manifold-coeff 0 align nothing (the encoder would run for no loss): "
                     "drop --repa, or give one of them a positive weight")
    latent_size = args.image_size // (1 if args.vae == "none" else 8)
    try:
        with torch.device("meta"):
            model = create_model(args.model, input_size=latent_size, **args.model_kwargs)
    except (TypeError, ValueError):
        return  # the trainer reports the architecture's own error
    try:
        block, _, _ = alignment_site(model, args.align_block, args.align_stage)
    except EncoderError as err:
        parser.error(str(err))
    if isinstance(model, U_DiT):
        args.align_stage = block.split(".")[0]
    else:
        args.align_block = int(block.split(".")[1]) + 1


def open_encoder(args, device):
    """The frozen encoder of --encoder on `device`, or None without --repa (EncoderError when unusable).

    Records the SHA-256 of its weights and, on resume, refuses others (check_recorded_weights):
    unchecked, a rewritten encoder file of another width failed in the projector's state dict
    with a traceback, and one of the same width trained on silently against another target.
    """
    if not getattr(args, "repa", False):
        return None
    encoder = load_encoder(args.encoder, args.image_size, args.encoder_weights)
    source = (f"--encoder-weights {args.encoder_weights}" if args.encoder_weights else
              f"--encoder {args.encoder}" + (" (its cached weights)" if args.encoder in DINOV2 else ""))
    check_recorded_weights(args, "encoder_digest", encoder, source)
    return encoder.to(device)


def build_aligner(args, model, encoder):
    """The Aligner of the run's settings for `model` and `encoder` (EncoderError when the grids do not fit)."""
    return Aligner(model, encoder.grid, encoder.width, args.align_block, args.align_stage, args.align_coeff,
                   args.manifold_coeff, args.projector_width)
