"""U-DiT and DiT: class-conditional diffusion transformers, one registry.

U-DiT ("U-DiTs: Downsample Tokens in U-Shaped Diffusion Transformers", NeurIPS 2024)
is a three-level U-Net whose blocks are adaLN-Zero transformer layers with
downsampled-token self-attention and a re-parameterisable convolutional FFN. DiT
(Peebles & Xie) is the isotropic patch transformer it is compared against.

Module and parameter names follow the published checkpoints exactly (see
../shared/SPEC.md and the golden state-dict manifest): they are the checkpoint format.

Run `python models.py` for the parameter and GMAC table of every registered model.
"""

import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


#################################################################################
#                         Shared embedding layers                               #
#################################################################################

def modulate(x, shift, scale):
    """adaLN modulation of tokens x (N, L, C) by shift, scale (N, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> sinusoidal features (N, 256) -> MLP -> (N, hidden_size)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) timesteps, possibly fractional -> (N, dim) features, cos half first."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> (N, hidden_size); the extra row `num_classes` is the null label.

    The null row exists only when dropout_prob > 0 at construction (as in DiT), so
    released checkpoints keep their exact table shape. Setting `dropout_prob` to 0
    afterwards turns dropout off and keeps the row.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace dropped labels by the null label; one uniform draw per sample."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def run_blocks(blocks, x, c, grad_checkpointing):
    """Apply blocks in sequence; with grad_checkpointing (training only), recompute activations in backward."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, c, use_reentrant=False)
        else:
            x = block(x, c)
    return x


def compile_blocks(model, **compile_kwargs):
    """torch.compile every transformer block of a U_DiT or DiT in place; returns model.

    Regional compilation: blocks of one shape share their compiled code, so a U-DiT
    compiles four block graphs (one per width and resolution) instead of its whole
    unrolled network, in seconds rather than minutes; the glue between blocks stays
    eager. Shapes are static (dynamic=False); the process-wide recompile limit is raised
    so that training, eval and guided-batch shapes all keep their compiled code.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    cache_rope_tables(model)
    for block in (model.blocks() if isinstance(model, U_DiT) else model.blocks):
        block.compile(**{"dynamic": False, **compile_kwargs})
    return model


@contextmanager
def capture_block_outputs(model, names):
    """Inside the `with`, every forward pass stores the outputs of the named blocks: {name: tensor}.

    names: block names as in the state dict, e.g. "latent.3" or "encoder_level_2.1" (U-DiT:
    channels-last (N, H, W, width)) or "blocks.7" (DiT: (N, tokens, hidden_size)). The
    tensors keep their autograd graph, so a loss on them trains the layers below: the hook
    for representation alignment (REPA, Yu et al. 2025; U-REPA), without a second forward
    pass. An unknown name raises KeyError listing the blocks.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        blocks = [n for n, m in modules.items() if isinstance(m, (U_DiTBlock, DiTBlock))]
        raise KeyError(f"no block named {unknown[0]!r}; blocks: {', '.join(blocks)}")
    outputs = {}
    handles = [modules[name].register_forward_hook(lambda module, args, out, name=name: outputs.__setitem__(name, out))
               for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def guided_output(model_out, cfg_scale, cfg_channels=3):
    """Classifier-free guidance on a batch [cond; uncond] of model outputs (2B, C, H, W).

    Guidance is applied to the first `cfg_channels` channels (3, the DiT reproduction
    convention; None for all channels); the rest pass through. Both halves of the
    result carry the guided value.
    """
    if cfg_channels is None:
        cfg_channels = model_out.shape[1]
    eps, rest = model_out[:, :cfg_channels], model_out[:, cfg_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


#################################################################################
#              U-DiT: channels-last building blocks                             #
#################################################################################
# Inside U-DiT, feature maps are (N, H, W, C) tensors: layer norms and 1x1
# convolutions (as matrix products) work on the contiguous channel dimension, and the
# spatial convolutions see a channels-last NCHW view, which is also what makes the
# depthwise convolutions' backward pass fast on CPUs. The parameters keep the
# reference's Conv2d shapes, so checkpoints load unchanged.

def pointwise(x, conv):
    """A 1x1 Conv2d applied to (N, H, W, C_in) -> (N, H, W, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def spatial_conv(x, weight, bias=None, padding=0, groups=1):
    """Conv2d on (N, H, W, C) through its channels-last NCHW view -> (N, H', W', C_out)."""
    return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=padding, groups=groups).permute(0, 2, 3, 1)


def pixel_unshuffle(x, factor=2):
    """(N, H, W, C) -> (N, H/f, W/f, C f^2), channel order of nn.PixelUnshuffle."""
    n, h, w, c = x.shape
    return x.view(n, h // factor, factor, w // factor, factor, c).permute(0, 1, 3, 5, 2, 4).reshape(
        n, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x, factor=2):
    """(N, H, W, C f^2) -> (N, H f, W f, C), channel order of nn.PixelShuffle."""
    n, h, w, c = x.shape
    c_out = c // (factor * factor)
    return x.view(n, h, w, c_out, factor, factor).permute(0, 1, 4, 2, 5, 3).reshape(n, h * factor, w * factor, c_out)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an (N, H, W, C) map, no affine, eps 1e-6."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x):
        return F.layer_norm(x, (self.dim,), eps=self.eps)


class DerivedWeightsModule(nn.Module):
    """Base of the U-DiT modules whose forward uses tensors derived from their parameters
    (folded kernels, merged biases).

    derived() returns derive()'s tensors. It recomputes them whenever autograd may need
    their gradients (in training, with grad enabled, while compiling: the derivation is
    part of the graph, so every parameter gets its gradient); otherwise (eval mode without
    grad, i.e. sampling) it keeps them against the version counters, data pointers and
    dtypes of derived_from(), so parameters are never written and any change to them
    (optimizer step, EMA update, load_state_dict, .to()) re-derives. Cached tensors are
    derived in the parameters' precision; autocast, if active, casts where they are used.
    """

    def __init__(self):
        super().__init__()
        self._derived, self._derived_key = None, None

    def train(self, mode=True):
        # Writes through `.data` bypass the version counters; a mode switch always re-derives.
        self._derived, self._derived_key = None, None
        return super().train(mode)

    def derive(self):
        raise NotImplementedError

    def derived_from(self):
        """The parameters derive() reads."""
        return self.parameters()

    def derived(self):
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.derive()
        params = list(self.derived_from())
        key = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        if self._derived_key != key:
            device_type = params[0].device.type
            with torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
                    else nullcontext():
                self._derived = self.derive()
            self._derived_key = key
        return self._derived


#################################################################################
#                 U-DiT: 2D rotary embedding and attention                      #
#################################################################################

# The reference clamps the learned log temperature at 4.6052 (~ln 100); the released
# weights were trained against that exact constant.
LOGIT_SCALE_MAX = 4.6052
_ROPE_TABLES = {}


def rope_2d_tables(grid_h, grid_w, head_dim, device):
    """Rotation tables for tokens on a grid_h x grid_w grid: cos, sin (L, head_dim) and
    rotation (L, head_dim / 2), complex64.

    Token n sits at column n % grid_w and row n // grid_w. Channel pair p (channels 2p,
    2p + 1) rotates by column * f[p // 2] when p is even and row * f[p // 2] when p is
    odd, with f[i] = 10000 ** (-4 i / head_dim). rotation[n, p] = exp(i angle); cos
    fills both channels of a pair with cos(angle) and sin holds (-sin, +sin), the real
    form of the same product (see apply_rope_2d). Built once per (grid, head_dim, device)
    and kept. torch.compile reads kept tables as inputs; tables it has to build itself
    become part of its kernels, which then recompute cosines element by element (call
    cache_rope_tables before compiling).
    """
    key = (grid_h, grid_w, head_dim, torch.device(device))
    if key in _ROPE_TABLES:
        return _ROPE_TABLES[key]
    tables = _build_rope_2d_tables(grid_h, grid_w, head_dim, device)
    if not torch.compiler.is_compiling():
        _ROPE_TABLES[key] = tables
    return tables


def cache_rope_tables(model, input_size=None):
    """Build the RoPE tables a U_DiT uses at input_size (default: its own) on its device; returns model.

    For torch.compile: call before compiling, so that the compiled code reads the tables
    instead of recomputing them. Models without 2D RoPE are returned as they are.
    """
    if not isinstance(model, U_DiT):
        return model
    size = input_size or model.input_size
    for stride, level in zip(model.level_strides, model.levels()):
        for block in level:
            for attn in (block.attn1, block.attn2):
                if attn.posemb_type == "rope2d":
                    grid = size // stride // attn.down_factor
                    rope_2d_tables(grid, grid, attn.head_dim, attn.to_qkv.weight.device)
    return model


def _build_rope_2d_tables(grid_h, grid_w, head_dim, device):
    n = torch.arange(grid_h * grid_w, device=device)
    col, row = (n % grid_w).float(), torch.div(n, grid_w, rounding_mode="floor").float()
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 4, device=device).float() / head_dim))
    angles = torch.stack([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1)  # L, d/4, 2
    angles = angles.flatten(1)  # L, d/2: x and y frequencies interleaved pair by pair
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = torch.stack([-angles.sin(), angles.sin()], dim=-1).flatten(1)
    return cos, sin, torch.polar(torch.ones_like(angles), angles)


def apply_rope_2d(x, cos, sin, rotation):
    """Rotate consecutive channel pairs of x (..., L, d) by the tables of rope_2d_tables, in float32.

    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos): in eager mode one complex product
    (x0 + i x1) * rotation, a single pass; when compiled, the real form
    x * cos + (x1, x0) * (-sin, sin), because inductor generates no code for complex
    arithmetic but fuses the real one.
    """
    x = x.float() if x.dtype != torch.float32 else x
    if torch.compiler.is_compiling():
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return torch.addcmul(x * cos, swapped, sin)
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()  # view_as_complex needs (real, imag) pairs adjacent and aligned
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)


class ScaledUnitVectors(torch.autograd.Function):
    """x * scale / max(|x|, 1e-12) over the last dimension, with a hand-written backward.

    The cosine attention normalises q and k at every layer; autograd's backward of the
    composed version takes seven passes over them, this one four:
    dx = r g - x r (x.g) / |x|^2 with r = scale / |x| (and r g alone where |x| is clamped).
    x: (..., d), any strides; scale broadcasts against x's norms (..., 1).
    """

    @staticmethod
    def forward(ctx, x, scale):
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        clamped = norms.clamp_min(1e-12)
        ratio = scale / clamped
        ctx.save_for_backward(x, scale, norms, clamped, ratio)
        return x * ratio

    @staticmethod
    def backward(ctx, grad):
        x, scale, norms, clamped, ratio = ctx.saved_tensors
        dots = (x * grad).sum(-1, keepdim=True)
        # Norms under the clamp were divided by a constant: no term through the norm there.
        unclamped = norms >= 1e-12
        dx = torch.addcmul(grad * ratio, x, ratio * dots / clamped.square() * unclamped, value=-1.0)
        dscale = None
        if ctx.needs_input_grad[1]:
            dscale = (dots / clamped).sum_to_size(scale.shape)
        return dx, dscale


class TokenDownsampler(nn.Module):
    """Depthwise KxK conv with optional identity shortcut, applied before token splitting.

    Holds the parameters (state-dict name `downsampler.layer`, the reference layout);
    DownsampledTokenAttention applies them, moving the bias into its q/k/v projection.
    """

    def __init__(self, dim, kernel_size, shortcut):
        super().__init__()
        self.layer = nn.Conv2d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)
        self.shortcut = bool(shortcut)
        # The identity as a KxK kernel: conv(x, W) + x = conv(x, W + I). Not in the state dict.
        identity = torch.zeros(1, 1, kernel_size, kernel_size)
        identity[..., kernel_size // 2, kernel_size // 2] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def kernel(self):
        """The depthwise kernel (C, 1, K, K), identity shortcut included."""
        return self.layer.weight + self.identity if self.shortcut else self.layer.weight


class DownsampledTokenAttention(DerivedWeightsModule):
    """Self-attention over down_factor**2 interleaved sub-maps of an (N, H, W, dim) map.

    Pixel (f*i + a, f*j + b) joins group a*f + b as token i*(W/f) + j; tokens attend only
    within their group, then return to their pixels. Input and output: (N, H, W, dim);
    forward(x, residual, gate) returns residual + gate * attention(x) (gate: (N, 1, 1, dim)),
    the residual update made by the same pass that returns tokens to their pixels.

    attn_type 'v2': cosine attention with a learned per-head temperature
    (`logit_scale`); None: scaled dot product. posemb_type 'rope2d': 2D rotary
    embedding on q and k; None: no positional signal inside attention.
    downsampler 'dwconvK': depthwise KxK conv (+ identity if down_shortcut) before
    splitting; None: split the raw map.
    """

    def __init__(self, dim, num_heads, down_factor=2, attn_type="v2", posemb_type="rope2d",
                 downsampler="dwconv5", down_shortcut=1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        if attn_type not in ("v2", None):
            raise ValueError(f"attn_type must be 'v2' (cosine) or None, got {attn_type!r}")
        if posemb_type not in ("rope2d", None):
            raise ValueError(f"posemb_type must be 'rope2d' or None, got {posemb_type!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.down_factor = down_factor
        self.attn_type = attn_type
        self.posemb_type = posemb_type
        if posemb_type == "rope2d" and self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4; width {dim} with "
                             f"{num_heads} heads gives {self.head_dim}")

        if attn_type == "v2":
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.to_out = nn.Conv2d(dim, dim, 1)
        if downsampler is None:
            self.downsampler = None
        else:
            if not (isinstance(downsampler, str) and downsampler.startswith("dwconv")
                    and downsampler[6:].isdigit() and int(downsampler[6:]) % 2 == 1):
                raise ValueError(f"downsampler must be 'dwconvK' with odd K (e.g. 'dwconv5') "
                                 f"or None, got {downsampler!r}")
            self.downsampler = TokenDownsampler(dim, int(downsampler[6:]), down_shortcut)

    def derive(self):
        """Downsampler kernel (dim, 1, K, K) or None; q/k/v bias (3 dim,); scales of q and
        k (2, 1, heads, 1, 1) or None."""
        kernel, qkv_bias, scales = None, self.to_qkv.bias, None
        if self.downsampler is not None:
            # The downsampler's bias passes through the (linear) regrouping and projection
            # as W b: oneDNN's depthwise bias gradient costs more than the whole input gradient.
            kernel = self.downsampler.kernel()
            qkv_bias = torch.addmv(qkv_bias, self.to_qkv.weight, self.downsampler.layer.bias)
        if self.attn_type == "v2":
            # The cosine attention's temperature scales q; k is only normalised.
            temperature = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()
            scales = F.pad(temperature.view(1, 1, self.num_heads, 1, 1), (0, 0, 0, 0, 0, 0, 0, 0, 0, 1), value=1.0)
        return kernel, qkv_bias, scales

    def forward(self, x, residual=None, gate=None):
        n, h, w, c = x.shape
        f, heads, hd = self.down_factor, self.num_heads, self.head_dim
        gh, gw = h // f, w // f
        kernel, qkv_bias, scales = self.derived()
        if kernel is not None:
            x = spatial_conv(x, kernel, padding=self.downsampler.layer.padding, groups=c)
        # Pixels to token groups before the projection (one copy of the C-wide map, not
        # of the 3C-wide q, k, v): (N, gh, f, gw, f, C) -> (N f f, L, C), L = gh gw.
        x = x.view(n, gh, f, gw, f, c).permute(0, 2, 4, 1, 3, 5).reshape(n * f * f, gh * gw, c)
        qk, v = F.linear(x, self.to_qkv.weight, qkv_bias).view(n * f * f, gh * gw, 3, heads, hd).split((2, 1), dim=2)
        # Strided views, (2, N f f, heads, L, d) and (N f f, heads, L, d): the element-wise
        # passes below write their results in this layout, which attention reads as is.
        qk, v = qk.permute(2, 0, 3, 1, 4), v.squeeze(2).transpose(1, 2)
        if self.attn_type == "v2":
            # Cosine attention as q / |q| * temperature and k / |k| in a single pass over
            # both; RoPE rotates channel pairs, so the norms are taken before it.
            qk = ScaledUnitVectors.apply(qk.float() if qk.dtype != torch.float32 else qk, scales)
        if self.posemb_type == "rope2d":
            qk = apply_rope_2d(qk, *rope_2d_tables(gh, gw, hd, x.device))
        q, k = qk.to(v.dtype).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 if self.attn_type == "v2" else None)
        # Tokens go home after the (per-pixel) output projection:
        # (N, f, f, gh, gw, C) -> (N, gh, f, gw, f, C) -> (N, H, W, C)
        out = pointwise(out.transpose(1, 2).reshape(n, f, f, gh, gw, c), self.to_out).permute(0, 3, 1, 4, 2, 5)
        if residual is None:
            return out.reshape(n, h, w, c)
        gate = gate.reshape(gate.shape[0], 1, 1, 1, 1, c)
        return torch.addcmul(residual.view(n, gh, f, gw, f, c), gate, out).view(n, h, w, c)


#################################################################################
#                      U-DiT: feed-forward networks                             #
#################################################################################

def fold_pointwise_pair(first, second):
    """Two stacked 1x1 convs as one linear map: weight (out, in), bias (out,)."""
    w0, w1 = first.weight.flatten(1), second.weight.flatten(1)
    return w1 @ w0, torch.addmv(second.bias, w1, first.bias)


class RepFFN(DerivedWeightsModule):
    """Re-parameterised convolutional FFN, (N, H, W, dim) -> (N, H, W, dim).

    The function (reference training form): 1x1 dim->h/2, 1x1 h/2->h, exact GELU,
    u + dw5(u) + dw3(u) + dw1(u), 1x1 h->h/2, 1x1 h/2->dim. Since the branches are
    linear in their parameters, the forward pass folds them: the three depthwise kernels
    and the identity into one 5x5 kernel always, and each 1x1 pair into one matrix when
    the feature map is large enough for that to save work. In training the fold is part
    of the autograd graph (the same gradients for every branch parameter); in eval mode
    the fully folded weights are used, cached when no gradient is needed (see
    DerivedWeightsModule).
    """

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dim, self.hidden = dim, hidden
        self.project_in = nn.Sequential(nn.Conv2d(dim, hidden // 2, 1), nn.Conv2d(hidden // 2, hidden, 1))
        self.dwconv = nn.ModuleList([
            nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.Conv2d(hidden, hidden, 1, groups=hidden),
        ])
        self.project_out = nn.Sequential(nn.Conv2d(hidden, hidden // 2, 1), nn.Conv2d(hidden // 2, dim, 1))

    def folded_depthwise(self):
        """Identity + dw5 + dw3 + dw1 as one 5x5 depthwise kernel (h, 1, 5, 5) and bias (h,)."""
        k5, k3, k1 = (conv.weight for conv in self.dwconv)
        kernel = k5 + F.pad(k3, (1, 1, 1, 1)) + F.pad(k1 + 1.0, (2, 2, 2, 2))
        return kernel, self.dwconv[0].bias + self.dwconv[1].bias + self.dwconv[2].bias

    def fold(self):
        """Fully folded (w_in (h, dim), b_in, kernel (h, 1, 5, 5), b_k, w_out (dim, h), b_out)."""
        return (*fold_pointwise_pair(*self.project_in), *self.folded_depthwise(),
                *fold_pointwise_pair(*self.project_out))

    def derive(self):
        return self.fold()

    def _project(self, x, pair, fold, input_bias=None):
        """pair applied to x + input_bias (a bias of x's channels, folded into the pair's)."""
        weight, bias = fold_pointwise_pair(*pair) if fold else (pair[0].weight.flatten(1), pair[0].bias)
        if input_bias is not None:
            # Under autocast a folded weight comes out in low precision; linear casts to it anyway.
            bias = torch.addmv(bias.to(weight.dtype), weight, input_bias.to(weight.dtype))
        return F.linear(x, weight, bias) if fold else pointwise(F.linear(x, weight, bias), pair[1])

    def forward(self, x):
        if self.training:
            # Folding a 1x1 pair costs h * h/2 * dim multiply-adds once and saves
            # (h/2) * (h - dim) per pixel.
            fold_pairs = (self.hidden - self.dim) * (x.numel() // self.dim) > self.hidden * self.dim
            u = F.gelu(self._project(x, self.project_in, fold_pairs))
            # The depthwise bias moves into the next projection (see DownsampledTokenAttention).
            kernel, kernel_bias = self.folded_depthwise()
            u = spatial_conv(u, kernel, padding=2, groups=self.hidden)
            return self._project(u, self.project_out, fold_pairs, input_bias=kernel_bias)
        w_in, b_in, kernel, b_k, w_out, b_out = self.derived()
        u = F.gelu(F.linear(x, w_in, b_in))
        u = spatial_conv(u, kernel, b_k, padding=2, groups=self.hidden)
        return F.linear(u, w_out, b_out)

    def folded_module(self):
        """A ConvFFN holding this FFN's folded weights (same function, fewer parameters)."""
        ffn = ConvFFN(self.dim, self.hidden / self.dim).to(self.project_in[0].weight)
        with torch.no_grad():
            w_in, b_in, kernel, b_k, w_out, b_out = self.fold()
            ffn.project_in.weight.copy_(w_in[:, :, None, None])
            ffn.project_in.bias.copy_(b_in)
            ffn.dwconv.weight.copy_(kernel)
            ffn.dwconv.bias.copy_(b_k)
            ffn.project_out.weight.copy_(w_out[:, :, None, None])
            ffn.project_out.bias.copy_(b_out)
        return ffn


class ConvFFN(DerivedWeightsModule):
    """Plain convolutional FFN (reference `rep=0`, and the permanent fold of RepFFN).

    1x1 dim->h, exact GELU, depthwise 5x5, 1x1 h->dim. (N, H, W, dim) -> same.
    """

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.project_in = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
        self.project_out = nn.Conv2d(hidden, dim, 1)

    def derive(self):
        """The output projection (dim, h) and its bias with the depthwise bias moved in
        (see DownsampledTokenAttention)."""
        weight = self.project_out.weight.flatten(1)
        return weight, torch.addmv(self.project_out.bias, weight, self.dwconv.bias)

    def forward(self, x):
        u = F.gelu(pointwise(x, self.project_in))
        u = spatial_conv(u, self.dwconv.weight, padding=2, groups=self.dwconv.groups)
        return F.linear(u, *self.derived())


class PointwiseMlp(nn.Module):
    """The 'basic' FFN of the ablations: 1x1 conv, tanh-GELU, 1x1 conv. (N, H, W, dim) -> same."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return pointwise(F.gelu(pointwise(x, self.fc1), approximate="tanh"), self.fc2)


def make_ffn(dim, mlp_ratio, ffn_type, rep):
    if ffn_type == "rep":
        return RepFFN(dim, mlp_ratio) if rep else ConvFFN(dim, mlp_ratio)
    if ffn_type == "basic":
        return PointwiseMlp(dim, mlp_ratio)
    raise ValueError(f"ffn_type must be 'rep' or 'basic', got {ffn_type!r}")


#################################################################################
#                             U-DiT: the network                                #
#################################################################################

class U_DiTBlock(DerivedWeightsModule):
    """Two adaLN-Zero transformer layers at width `dim`.

    x: (N, H, W, dim); silu_c: (N, dim), the conditioning after its SiLU (U_DiT applies it
    once per level rather than once per layer).
    """

    def __init__(self, dim, num_heads, mlp_ratio, ffn_type, rep, **attn_kwargs):
        super().__init__()
        for k in (1, 2):
            self.add_module(f"norm1{k}", ChannelLayerNorm(dim))
            self.add_module(f"attn{k}", DownsampledTokenAttention(dim, num_heads, **attn_kwargs))
            self.add_module(f"norm2{k}", ChannelLayerNorm(dim))
            self.add_module(f"mlp{k}", make_ffn(dim, mlp_ratio, ffn_type, rep))
            # The reference's (SiLU, Linear): its SiLU runs in U_DiT; the checkpoint names the linear `.1`.
            self.add_module(f"adaLN_modulation{k}", nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)))
        # Added to the modulation bias so that the linear gives 1 + scale for both scales.
        offset = torch.zeros(6, dim)
        offset[[1, 4]] = 1.0
        self.register_buffer("scale_offset", offset.flatten(), persistent=False)

    def derive(self):
        return tuple(m[-1].bias + self.scale_offset for m in (self.adaLN_modulation1, self.adaLN_modulation2))

    def derived_from(self):
        return [self.adaLN_modulation1[-1].bias, self.adaLN_modulation2[-1].bias]

    def _layer(self, x, silu_c, norm1, attn, norm2, mlp, modulation, bias):
        chunks = F.linear(silu_c, modulation[-1].weight, bias)[:, None, None].chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = chunks  # both scales are 1 + scale
        # addcmul: modulation and gated residual in one pass over the map each (the
        # attention's gated residual is also its tokens' return to pixel order).
        x = attn(torch.addcmul(shift_a, norm1(x), scale_a), residual=x, gate=gate_a)
        return torch.addcmul(x, gate_m, mlp(torch.addcmul(shift_m, norm2(x), scale_m)))

    def forward(self, x, silu_c):
        bias1, bias2 = self.derived()
        x = self._layer(x, silu_c, self.norm11, self.attn1, self.norm21, self.mlp1, self.adaLN_modulation1, bias1)
        return self._layer(x, silu_c, self.norm12, self.attn2, self.norm22, self.mlp2, self.adaLN_modulation2, bias2)


class Downsample(nn.Module):
    """3x3 conv dim -> dim/2 (no bias), PixelUnshuffle(2): (N, H, W, dim) -> (N, H/2, W/2, 2 dim)."""

    def __init__(self, dim):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return pixel_unshuffle(spatial_conv(x, self.body[0].weight, padding=1))


class Upsample(nn.Module):
    """3x3 conv dim -> 2 dim (no bias), PixelShuffle(2): (N, H, W, dim) -> (N, 2H, 2W, dim/2)."""

    def __init__(self, dim):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return pixel_shuffle(spatial_conv(x, self.body[0].weight, padding=1))


class U_DiTFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then 3x3 conv: (N, H, W, dim) -> (N, out_channels, H, W)."""

    def __init__(self, dim, out_channels):
        super().__init__()
        self.norm_final = ChannelLayerNorm(dim)
        self.out_proj = nn.Conv2d(dim, out_channels, 3, padding=1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, silu_c):
        """silu_c: (N, dim), the conditioning after SiLU (see U_DiTBlock)."""
        shift, scale = self.adaLN_modulation[-1](silu_c)[:, None, None].chunk(2, dim=-1)
        x = torch.addcmul(shift, self.norm_final(x), 1 + scale)
        return self.out_proj(x.permute(0, 3, 1, 2)).contiguous()


class PatchEmbed3x3(nn.Module):
    """3x3 conv, stride 1: (N, in_channels, H, W) -> (N, H, W, dim)."""

    def __init__(self, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=True)

    def forward(self, x):
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class U_DiT(nn.Module):
    """U-shaped diffusion transformer.

    Levels of widths D, 2D, 4D at resolutions H, H/2, H/4; the last decoder level runs
    at width 2D on full resolution. forward(x (N, C, H, W), t (N,), y (N,)) ->
    (N, 2C or C, H, W).

    Keywords are the reference ones (the paper's ablation switches): down_factor (int
    or list of 5, one per level), hidden_size, num_heads, depth (5 ints), ffn_type
    ('rep' | 'basic'), rep (1: re-parameterised branches, 0: plain conv FFN),
    mlp_ratio, attn_type ('v2' | None), posemb_type ('rope2d' | None), downsampler
    ('dwconvK' | None), down_shortcut. label_dropout: 'shared' (one drop decision per
    sample for all three label embedders, what guidance needs) or 'per-level' (the
    reference: each embedder drops on its own).
    """

    def __init__(self, input_size=32, in_channels=4, hidden_size=96, depth=(2, 5, 8, 5, 2),
                 num_heads=4, mlp_ratio=2, down_factor=2, ffn_type="rep", rep=1, attn_type="v2",
                 posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1,
                 class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, label_dropout="shared"):
        super().__init__()
        depth = list(depth)
        if len(depth) != 5:
            raise ValueError(f"depth must list 5 block counts (enc1, enc2, latent, dec2, dec1), got {depth}")
        factors = list(down_factor) if isinstance(down_factor, (list, tuple)) else [down_factor] * 5
        if len(factors) != 5:
            raise ValueError(f"down_factor must be an int or a list of 5, got {down_factor}")
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even (the first downsample halves it), got {hidden_size}")
        if label_dropout not in ("shared", "per-level"):
            raise ValueError(f"label_dropout must be 'shared' or 'per-level', got {label_dropout!r}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.label_dropout = label_dropout
        # Resolution divisor of each level (enc1, enc2, latent, dec2, dec1) and the token
        # downsampling factor used inside it.
        self.level_strides = [1, 2, 4, 2, 1]
        self.down_factors = factors
        self.check_input_size(input_size)

        D = hidden_size
        self.x_embedder = PatchEmbed3x3(in_channels, D)
        for level, width in ((1, D), (2, 2 * D), (3, 4 * D)):
            self.add_module(f"t_embedder_{level}", TimestepEmbedder(width))
            self.add_module(f"y_embedder_{level}", LabelEmbedder(num_classes, width, class_dropout_prob))

        def blocks(width, count, factor):
            return nn.ModuleList([
                U_DiTBlock(width, num_heads, mlp_ratio, ffn_type, rep, down_factor=factor,
                           attn_type=attn_type, posemb_type=posemb_type,
                           downsampler=downsampler, down_shortcut=down_shortcut)
                for _ in range(count)
            ])

        self.encoder_level_1 = blocks(D, depth[0], factors[0])
        self.down1_2 = Downsample(D)
        self.encoder_level_2 = blocks(2 * D, depth[1], factors[1])
        self.down2_3 = Downsample(2 * D)
        self.latent = blocks(4 * D, depth[2], factors[2])
        self.up3_2 = Upsample(4 * D)
        self.reduce_chan_level2 = nn.Conv2d(4 * D, 2 * D, 1, bias=True)
        self.decoder_level_2 = blocks(2 * D, depth[3], factors[3])
        self.up2_1 = Upsample(2 * D)
        self.reduce_chan_level1 = nn.Conv2d(2 * D, 2 * D, 1, bias=True)
        self.decoder_level_1 = blocks(2 * D, depth[4], factors[4])
        self.output = nn.Conv2d(2 * D, 2 * D, 3, padding=1, bias=True)
        self.final_layer = U_DiTFinalLayer(2 * D, self.out_channels)
        self.grad_checkpointing = False
        self.initialize_weights()

    def check_input_size(self, size):
        """Raise ValueError unless a size x size input fits both shuffles and every level's token split."""
        for stride, factor in zip(self.level_strides, self.down_factors):
            if size % (stride * factor):
                valid = math.lcm(*(s * f for s, f in zip(self.level_strides, self.down_factors)))
                raise ValueError(
                    f"input size {size} does not fit this U-DiT: a level at 1/{stride} resolution "
                    f"with token down_factor {factor} needs a multiple of {stride * factor}; "
                    f"use a latent side that is a multiple of {valid} (e.g. 32 for 256 px, 64 for 512 px)")

    def initialize_weights(self):
        def basic_init(module):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for level in (1, 2, 3):
            nn.init.normal_(getattr(self, f"y_embedder_{level}").embedding_table.weight, std=0.02)
            mlp = getattr(self, f"t_embedder_{level}").mlp
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for block in self.blocks():
            for modulation in (block.adaLN_modulation1, block.adaLN_modulation2):
                nn.init.zeros_(modulation[-1].weight)
                nn.init.zeros_(modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.out_proj.weight)
        nn.init.zeros_(self.final_layer.out_proj.bias)

    def levels(self):
        """The block lists of the five levels, in the order of level_strides."""
        return [self.encoder_level_1, self.encoder_level_2, self.latent, self.decoder_level_2, self.decoder_level_1]

    def blocks(self):
        return [block for level in self.levels() for block in level]

    def label_embedders(self):
        return [self.y_embedder_1, self.y_embedder_2, self.y_embedder_3]

    def conditioning(self, t, y):
        """(N,) timesteps and labels -> c1 (N, D), c2 (N, 2D), c3 (N, 4D)."""
        force_drop_ids = None
        if self.training and self.label_dropout == "shared" and self.y_embedder_1.dropout_prob > 0:
            force_drop_ids = (torch.rand(y.shape[0], device=y.device) < self.y_embedder_1.dropout_prob).long()
        return [
            getattr(self, f"t_embedder_{level}")(t)
            + getattr(self, f"y_embedder_{level}")(y, self.training, force_drop_ids)
            for level in (1, 2, 3)
        ]

    def forward(self, x, t, y):
        """x: (N, C, H, W) latents; t: (N,) timesteps; y: (N,) labels -> (N, out_channels, H, W)."""
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"U-DiT expects square inputs, got {tuple(x.shape[-2:])}")
        self.check_input_size(x.shape[-1])
        c1, c2, c3 = (F.silu(c) for c in self.conditioning(t, y))  # every adaLN modulation starts with SiLU

        ckpt = self.grad_checkpointing
        skip1 = run_blocks(self.encoder_level_1, self.x_embedder(x), c1, ckpt)
        skip2 = run_blocks(self.encoder_level_2, self.down1_2(skip1), c2, ckpt)
        x = run_blocks(self.latent, self.down2_3(skip2), c3, ckpt)
        x = pointwise(torch.cat([self.up3_2(x), skip2], dim=-1), self.reduce_chan_level2)
        x = run_blocks(self.decoder_level_2, x, c2, ckpt)
        x = pointwise(torch.cat([self.up2_1(x), skip1], dim=-1), self.reduce_chan_level1)
        x = run_blocks(self.decoder_level_1, x, c2, ckpt)
        x = spatial_conv(x, self.output.weight, self.output.bias, padding=1)
        return self.final_layer(x, c2)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """Guided forward on [cond; uncond] batches; the first half of x is used for both."""
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        return guided_output(model_out, cfg_scale, cfg_channels)

    @torch.no_grad()
    def fold_ffn_(self):
        """Replace every re-parameterised FFN by its folded ConvFFN, in place; returns self.

        For deployment: the same function with the paper's parameter count. The folded
        state dict is the layout of `rep=0`, so it loads into U_DiT(..., rep=0).
        """
        for block in self.blocks():
            for name in ("mlp1", "mlp2"):
                ffn = getattr(block, name)
                if isinstance(ffn, RepFFN):
                    setattr(block, name, ffn.folded_module())
        return self


#################################################################################
#                                   DiT                                         #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2D sin-cos position embedding (MAE/DiT): (grid_size**2, embed_dim) float64 array."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

    def embed_1d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(embed_dim // 2, grid[0]), embed_1d(embed_dim // 2, grid[1])], axis=1)


class PatchEmbed(nn.Module):
    """p x p patches, stride p: (N, C, H, W) -> (N, (H/p)(W/p), dim)."""

    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA: (N, L, dim) -> (N, L, dim)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    """Linear, tanh-GELU, Linear: (N, L, dim) -> (N, L, dim)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. x: (N, L, dim); c: (N, dim)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        x = x + gate_a * self.attn(self.norm1(x) * (1 + scale_a) + shift_a)
        return x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m) + shift_m)


class DiTFinalLayer(nn.Module):
    """Modulated LayerNorm then Linear: (N, L, dim) -> (N, L, p*p*out_channels)."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer on p x p patches (Peebles & Xie), reference state-dict layout.

    forward(x (N, C, H, W), t (N,), y (N,)) -> (N, 2C or C, H, W).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch_size}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Frozen: fixed sin-cos values, stored in the checkpoints as a parameter.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = DiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(basic_init)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def label_embedders(self):
        return [self.y_embedder]

    def unpatchify(self, x):
        """(N, L, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x: (N, C, H, W); t: (N,); y: (N,) -> (N, out_channels, H, W)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"this DiT was built for {self.input_size}x{self.input_size} inputs "
                             f"(its pos_embed is fixed), got {tuple(x.shape[-2:])}")
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        x = run_blocks(self.blocks, x, c, self.grad_checkpointing)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """Guided forward on [cond; uncond] batches; the first half of x is used for both."""
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        return guided_output(model_out, cfg_scale, cfg_channels)


#################################################################################
#                                  Registry                                     #
#################################################################################

U_DIT_PRESETS = {
    "U-DiT-S": dict(hidden_size=96, num_heads=4),
    "U-DiT-B": dict(hidden_size=192, num_heads=8),
    "U-DiT-L": dict(hidden_size=384, num_heads=16),
}
U_DIT_COMMON = dict(down_factor=2, depth=[2, 5, 8, 5, 2], ffn_type="rep", rep=1, mlp_ratio=2,
                    attn_type="v2", posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1)
DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


class ModelRegistry(dict):
    """name -> constructor(**kwargs); an unknown name lists the available ones."""

    def __missing__(self, name):
        raise KeyError(f"unknown model {name!r}; available: {', '.join(self)}")


def _preset(cls, defaults):
    def build(**kwargs):
        return cls(**{**defaults, **kwargs})
    return build


DiT_models = ModelRegistry()
for _name, _preset_kwargs in U_DIT_PRESETS.items():
    DiT_models[_name] = _preset(U_DiT, {**U_DIT_COMMON, **_preset_kwargs})
for _size, _size_kwargs in DIT_SIZES.items():
    for _patch in (2, 4, 8):
        DiT_models[f"DiT-{_size}/{_patch}"] = _preset(DiT, {**_size_kwargs, "patch_size": _patch})


def create_model(name, **kwargs):
    """Build a registered model; `kwargs` override any architecture keyword."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)


#################################################################################
#                           Parameter and MAC report                            #
#################################################################################

def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model, input_size=32, batch_size=1):
    """Multiply-accumulates (x1e9) of one forward pass per image, from FlopCounterMode.

    Attention runs on SDPA's math path while counting: the fused CPU kernel is not
    registered with the counter and would drop its matmuls from the total.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.randn(batch_size, model.in_channels, input_size, input_size, device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x, t, y)
    return counter.get_total_flops() / 2 / 1e9 / batch_size


def model_report(names=None, input_size=32):
    """Rows (name, params, params folded, GMACs of the folded model at `input_size`)."""
    rows = []
    for name in names or DiT_models:
        with torch.device("meta"):
            model = create_model(name, input_size=input_size)
        params = count_params(model)
        if isinstance(model, U_DiT):
            model.eval().fold_ffn_()
        rows.append((name, params, count_params(model), count_gmacs(model.eval(), input_size)))
    return rows


if __name__ == "__main__":
    print(f"{'model':<10} {'params':>14} {'params folded':>14} {'GMACs @256px':>13}")
    for name, params, folded, gmacs in model_report():
        print(f"{name:<10} {params:>14,} {folded:>14,} {gmacs:>13.2f}")
