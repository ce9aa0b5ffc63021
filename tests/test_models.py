"""U-DiT and DiT behaviour beyond the golden vectors: switches, folding, registry, errors."""

import math
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

import models
from conftest import SINGLE_CALL_TOL, assert_rel_close, randomize, tiny_udit
from models import DiT, DiT_models, RepFFN, U_DiT, compile_blocks, create_model


def inputs(n=2, size=16, num_classes=10, channels=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return x, t, y


def no_label_dropout(model):
    for embedder in model.label_embedders():
        embedder.dropout_prob = 0.0
    return model


# ----------------------------------------------------------------- ablation switches

BASE_KEYS = set(tiny_udit().state_dict())


@pytest.mark.parametrize("override, added, removed", [
    (dict(attn_type=None), "", "logit_scale"),
    (dict(posemb_type=None), "", ""),
    (dict(downsampler=None), "", "downsampler.layer"),
    (dict(down_shortcut=0), "", ""),
    (dict(downsampler="dwconv3"), "", ""),
    (dict(down_factor=1), "", ""),
    (dict(down_factor=[1, 2, 1, 2, 1]), "", ""),
    (dict(ffn_type="basic"), "fc1", "project_in"),
    (dict(rep=0), "project_in.weight", "dwconv.1"),
])
def test_each_switch_changes_output_and_state_dict(override, added, removed):
    x, t, y = inputs()
    base = no_label_dropout(tiny_udit()).eval()
    variant = no_label_dropout(tiny_udit(**override)).eval()
    keys = set(variant.state_dict())
    if added:
        assert any(added in k for k in keys - BASE_KEYS)
    if removed:
        assert any(removed in k for k in BASE_KEYS - keys) and not any(removed in k for k in keys)
    if not added and not removed:
        assert keys == BASE_KEYS
    # Load the shared weights so that only the switched component differs.
    shared = {k: v for k, v in base.state_dict().items() if k in keys and v.shape == variant.state_dict()[k].shape}
    variant.load_state_dict(shared, strict=False)
    with torch.no_grad():
        assert not torch.allclose(base(x, t, y), variant(x, t, y), atol=1e-4)


def test_downsampler_kernel_size_is_honoured():
    model = tiny_udit(downsampler="dwconv3")
    assert model.encoder_level_1[0].attn1.downsampler.layer.weight.shape[-1] == 3


def test_down_factor_one_is_full_attention():
    # With factor 1 every token of a level attends to every other: moving one pixel's
    # input changes the output far away (beyond the 5x5 convs' reach).
    model = no_label_dropout(tiny_udit(down_factor=1)).eval()
    x, t, y = inputs(n=1)
    x2 = x.clone()
    x2[..., 0, 0] += 5.0
    with torch.no_grad():
        diff = (model(x, t, y) - model(x2, t, y)).abs()
    assert diff[..., 15, 15].max() > 0


def test_tokens_attend_within_their_group_only():
    # One attention layer, no downsampler: changing a pixel of group (0, 0) leaves the
    # outputs of the other three groups unchanged.
    torch.manual_seed(0)
    attn = models.DownsampledTokenAttention(16, 2, down_factor=2, downsampler=None)
    x = torch.randn(1, 8, 8, 16)  # (N, H, W, C): U-DiT's internal layout
    x2 = x.clone()
    x2[:, 2, 4] += 3.0  # row 2, column 4: group (0, 0)
    with torch.no_grad():
        diff = (attn(x) - attn(x2)).abs().sum(-1)[0]
    assert diff[0::2, 0::2].max() > 0
    assert diff[1::2, :].max() == 0 and diff[:, 1::2].max() == 0


# ----------------------------------------------------------------- FFN folding

def test_eval_train_toggles_never_touch_parameters_and_follow_updates():
    model = no_label_dropout(tiny_udit())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = inputs()
    for step in range(3):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for training in (False, False, True, False):
            model.train(training)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a mode switch changed the weights"
        with torch.no_grad():
            folded = model(x, t, y)
            model.train()
            branches = model(x, t, y)
        assert_rel_close(folded, branches, SINGLE_CALL_TOL, f"step {step}")
        model.train()
        loss = model(x, t, y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()  # eval right after a step must see the new weights


@pytest.mark.parametrize("rep", [1, 0])
def test_eval_output_follows_in_place_updates_without_mode_switch(rep):
    model = no_label_dropout(tiny_udit(rep=rep)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        first = model(x, t, y)
        for p in model.parameters():
            p.mul_(1.01)  # an EMA-style in-place update
        second = model(x, t, y)
        model.train()
        reference = model(x, t, y)
    assert not torch.allclose(first, second)
    assert_rel_close(second, reference, SINGLE_CALL_TOL, "after in-place update")


def test_eval_output_follows_load_state_dict():
    model = no_label_dropout(tiny_udit()).eval()
    other = no_label_dropout(randomize(tiny_udit(), seed=5))
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y)
        model.load_state_dict(other.state_dict())
        assert_rel_close(model(x, t, y), other.train()(x, t, y), SINGLE_CALL_TOL, "after load_state_dict")


def test_eval_with_grad_enabled_gives_every_parameter_its_training_gradient():
    # Derived weights are cached only without grad: in eval mode with autograd on (e.g.
    # gradients for an analysis), every parameter must still get its gradient.
    model = no_label_dropout(randomize(tiny_udit()))
    x, t, y = inputs()
    grads = []
    for mode in ("train", "eval"):
        getattr(model, mode)()
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():  # the eval form folds every branch: other rounding
        assert_rel_close(grads[1][name], grad, 1e-4, name)


def test_sampling_derives_weights_once_and_again_after_a_change():
    model = no_label_dropout(randomize(tiny_udit())).eval()
    x, t, y = inputs()
    derived = [m for m in model.modules() if isinstance(m, models.DerivedWeightsModule)]
    assert {type(m) for m in derived} == {models.U_DiTBlock, models.DownsampledTokenAttention, RepFFN}
    with torch.no_grad():
        model(x, t, y)
        first = [m.derived() for m in derived]
        assert all(a is b for m, a in zip(derived, first) for a, b in zip(m.derived(), a))  # cached
        block = model.blocks()[0]
        block.adaLN_modulation1[1].bias.add_(1.0)  # an in-place update of one bias only
        assert block.derived()[0] is not first[derived.index(block)][0]
        assert torch.equal(block.derived()[0], block.adaLN_modulation1[1].bias + block.scale_offset)


def test_training_fold_gives_the_branch_form_and_its_gradients():
    # The reference training form, written out branch by branch on an NCHW map.
    torch.manual_seed(0)
    ffn = randomize(RepFFN(8, 2))
    x = torch.randn(2, 6, 6, 8)  # (N, H, W, C): 72 pixels, enough to fold the 1x1 pairs too

    def branches(x_nchw):
        u = F.gelu(ffn.project_in(x_nchw))
        return ffn.project_out(u + sum(conv(u) for conv in ffn.dwconv))

    outputs, grads = [], []
    for folded in (False, True):
        ffn.zero_grad()
        out = ffn.train()(x) if folded else branches(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in ffn.parameters()])
    assert_rel_close(outputs[1], outputs[0], SINGLE_CALL_TOL, "output")
    for g_branch, g_fold in zip(*grads):
        assert_rel_close(g_fold, g_branch, 1e-4, "gradient")


def test_permanent_fold_keeps_function_and_loads_into_rep0():
    model = no_label_dropout(tiny_udit()).eval()
    x, t, y = inputs()
    with torch.no_grad():
        reference = model(x, t, y)
        model.fold_ffn_()
        assert not any(isinstance(m, RepFFN) for m in model.modules())
        assert_rel_close(model(x, t, y), reference, SINGLE_CALL_TOL, "folded")
        rep0 = no_label_dropout(tiny_udit(rep=0)).eval()
        rep0.load_state_dict(model.state_dict(), strict=True)
        assert_rel_close(rep0(x, t, y), reference, SINGLE_CALL_TOL, "rep=0 model with folded weights")


# ----------------------------------------------------------------- registry and errors

def test_unknown_model_name_lists_available():
    with pytest.raises(KeyError, match="U-DiT-B.*DiT-XL/2"):
        DiT_models["U-DiT-XXL"]
    with pytest.raises(ValueError, match="available: U-DiT-S"):
        create_model("DiT-XXL/2")


@pytest.mark.parametrize("name", ["U-DiT-S", "DiT-S/2"])
def test_presets_honour_keywords(name):
    with torch.device("meta"):
        model = create_model(name, input_size=64, num_classes=10, in_channels=3, learn_sigma=False,
                             class_dropout_prob=0.0, depth=[1, 1, 1, 1, 1] if name.startswith("U") else 2)
    sd = model.state_dict()
    assert model.in_channels == 3 and model.out_channels == 3
    table = sd["y_embedder_1.embedding_table.weight" if name.startswith("U") else "y_embedder.embedding_table.weight"]
    assert table.shape[0] == 10  # no null row without dropout
    if name.startswith("U"):
        assert len(model.encoder_level_1) == 1
        assert sd["final_layer.out_proj.weight"].shape[0] == 3
    else:
        assert len(model.blocks) == 2 and sd["pos_embed"].shape[1] == (64 // 2) ** 2


def test_udit_runs_at_256_and_512_latent_sizes():
    model = no_label_dropout(tiny_udit()).eval()
    for size in (32, 64):
        x, t, y = inputs(n=1, size=size)
        with torch.no_grad():
            assert model(x, t, y).shape == (1, 8, size, size)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=18), "multiple of 8"),
    (dict(input_size=24, down_factor=4), "multiple of 16"),
    (dict(depth=[1, 1, 1, 1]), "5 block counts"),
    (dict(down_factor=[2, 2]), "list of 5"),
    (dict(num_heads=3), "not divisible by num_heads"),
    (dict(hidden_size=24, num_heads=4), "divisible by 4"),
    (dict(attn_type="v3"), "attn_type"),
    (dict(posemb_type="sincos"), "posemb_type"),
    (dict(downsampler="maxpool"), "dwconvK"),
    (dict(ffn_type="moe"), "ffn_type"),
    (dict(label_dropout="sometimes"), "label_dropout"),
])
def test_bad_udit_configurations_raise_clear_errors(kwargs, message):
    base = dict(input_size=16, hidden_size=32, num_heads=2, depth=[1, 1, 1, 1, 1], num_classes=10)
    with pytest.raises(ValueError, match=message):
        U_DiT(**{**base, **kwargs})


def test_bad_input_sizes_at_forward_raise_clear_errors():
    udit = tiny_udit().eval()
    x, t, y = inputs(size=20)
    with pytest.raises(ValueError, match="input size 20"):
        udit(x, t, y)
    dit = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="built for 8x8"):
        dit(*inputs(size=16))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DiT(input_size=10, patch_size=4)


# ----------------------------------------------------------------- label dropout

def embedded_labels(model, y):
    """The label index each of the model's label embedders looks up, per sample."""
    seen = []
    hooks = [e.embedding_table.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
             for e in model.label_embedders()]
    x, t, _ = inputs(n=len(y))
    model(x, t, y)
    for h in hooks:
        h.remove()
    return seen


def test_shared_label_dropout_drops_the_same_samples_at_every_level():
    model = tiny_udit(class_dropout_prob=0.5).train()
    torch.manual_seed(0)
    levels = embedded_labels(model, torch.zeros(64, dtype=torch.long))
    assert all(torch.equal(levels[0], other) for other in levels[1:])
    dropped = (levels[0] == 10).float().mean().item()
    assert 0.25 < dropped < 0.75


def test_per_level_label_dropout_reproduces_the_reference():
    model = tiny_udit(class_dropout_prob=0.5, label_dropout="per-level").train()
    torch.manual_seed(0)
    levels = embedded_labels(model, torch.zeros(64, dtype=torch.long))
    assert not torch.equal(levels[0], levels[1])


def test_no_label_dropout_in_eval():
    model = tiny_udit(class_dropout_prob=1.0).eval()
    levels = embedded_labels(model, torch.arange(8) % 10)
    assert all(torch.equal(level, torch.arange(8) % 10) for level in levels)


# ----------------------------------------------------------------- attention and compilation

def spec_attention(attn, x):
    """DownsampledTokenAttention written from SPEC section 2 step by step, one group at a time."""
    n, h, w, c = x.shape
    f, heads, d = attn.down_factor, attn.num_heads, attn.head_dim
    z = x.permute(0, 3, 1, 2)
    if attn.downsampler is not None:
        conv = attn.downsampler.layer
        shortcut = z if attn.downsampler.shortcut else 0
        z = F.conv2d(z, conv.weight, conv.bias, padding=conv.padding, groups=c) + shortcut
    out = torch.zeros_like(z)
    side_h, side_w = h // f, w // f
    for a in range(f):
        for b in range(f):
            tokens = z[:, :, a::f, b::f].flatten(2).transpose(1, 2)  # (N, L, C), row-major
            q, k, v = (part.unflatten(-1, (heads, d)).transpose(1, 2)
                       for part in F.linear(tokens, attn.to_qkv.weight, attn.to_qkv.bias).chunk(3, dim=-1))
            if attn.posemb_type == "rope2d":
                index = torch.arange(side_h * side_w)
                px, py = (index % side_w).float(), (index // side_w).float()
                freqs = 10000.0 ** (-4 * torch.arange(d // 4).float() / d)
                angle = torch.stack([px[:, None] * freqs, py[:, None] * freqs], -1).flatten(1)  # (L, d/2): p even, odd
                rotate = torch.polar(torch.ones_like(angle), angle)
                q, k = (torch.view_as_real(torch.view_as_complex(t.float().unflatten(-1, (-1, 2)).contiguous())
                                           * rotate).flatten(-2) for t in (q, k))
            if attn.attn_type == "v2":
                logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
                logits = logits * torch.clamp(attn.logit_scale, max=math.log(100)).exp()
            else:
                logits = q @ k.transpose(-1, -2) / math.sqrt(d)
            group = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (N, L, C), heads in order
            out[:, :, a::f, b::f] = group.transpose(1, 2).unflatten(-1, (side_h, side_w))
    out = F.conv2d(out, attn.to_out.weight, attn.to_out.bias)
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("down_factor", [1, 2])
@pytest.mark.parametrize("attn_type, posemb_type", [("v2", "rope2d"), ("v2", None), (None, "rope2d"), (None, None)])
@pytest.mark.parametrize("downsampler, shortcut", [("dwconv5", 1), ("dwconv3", 0), (None, 1)])
def test_attention_matches_the_spec_written_out(down_factor, attn_type, posemb_type, downsampler, shortcut):
    torch.manual_seed(0)
    attn = models.DownsampledTokenAttention(32, 2, down_factor=down_factor, attn_type=attn_type,
                                            posemb_type=posemb_type, downsampler=downsampler, down_shortcut=shortcut)
    randomize(attn)
    x = torch.randn(2, 8, 8, 32)
    expected = spec_attention(attn, x)
    assert_rel_close(attn(x), expected, SINGLE_CALL_TOL, "attention")
    # The block's form: the gated residual update made on the way back to pixel order.
    residual, gate = torch.randn(2, 8, 8, 32), torch.randn(2, 1, 1, 32)
    assert_rel_close(attn(x, residual=residual, gate=gate), residual + gate * expected, SINGLE_CALL_TOL,
                     "gated residual")


@pytest.mark.parametrize("compiling", [False, True], ids=["complex-eager", "real-compiled"])
def test_rope_rotates_pairs_by_column_and_row(monkeypatch, compiling):
    # Eager mode multiplies by the complex table; under torch.compile the real form runs.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    tables = models.rope_2d_tables(4, 4, 8, torch.device("cpu"))
    cos, sin, rotation = tables
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (16, 8)
    assert rotation.dtype == torch.complex64 and rotation.shape == (16, 4)
    if not compiling:
        assert models.rope_2d_tables(4, 4, 8, torch.device("cpu"))[0] is cos  # cached
    # Token 6 on a 4x4 grid: column 2, row 1. Pair 0 (channels 0, 1) turns by the column
    # times f0 = 1, pair 1 (channels 2, 3) by the row times f0.
    q = torch.zeros(1, 16, 8)
    q[0, 6, 0] = 1.0  # unit vector on channel 0
    q[0, 6, 3] = 1.0  # and on channel 3
    out = models.apply_rope_2d(q, *tables)[0, 6]
    expected = torch.tensor([math.cos(2.0), math.sin(2.0), -math.sin(1.0), math.cos(1.0)])
    assert torch.allclose(out[:4], expected, atol=1e-6) and out[4:].abs().max() == 0


def test_rope_accepts_strided_views():
    # The attention hands RoPE permuted views of the q/k projection; odd offsets and
    # strides (not viewable as complex pairs) must still rotate correctly.
    tables = models.rope_2d_tables(2, 2, 4, torch.device("cpu"))
    base = torch.randn(4, 9)
    view = base[:, 1:5]  # odd storage offset and odd row stride
    assert torch.allclose(models.apply_rope_2d(view, *tables), models.apply_rope_2d(view.contiguous(), *tables))


def test_scaled_unit_vectors_match_autograd_of_normalize():
    torch.manual_seed(0)
    # A permuted (strided) input, per-(q/k, head) scales as the attention passes them.
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.double).permute(0, 2, 1, 3, 4).requires_grad_()
    scale = torch.rand(2, 1, 3, 1, 1, dtype=torch.double).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(models.ScaledUnitVectors.apply, (x, scale))
    # Rows at or under the 1e-12 clamp are scaled by a constant, as in F.normalize.
    x = torch.randn(4, 6, dtype=torch.double)
    x[1], x[2] = 1e-14, 0.0
    x.requires_grad_()
    scale = torch.tensor([[2.0]], dtype=torch.double, requires_grad=True)
    grad = torch.randn(4, 6, dtype=torch.double)
    out = models.ScaledUnitVectors.apply(x, scale)
    expected = F.normalize(x, dim=-1) * scale
    assert torch.allclose(out, expected, rtol=1e-12, atol=0)
    ours, theirs = (torch.autograd.grad(y, (x, scale), grad) for y in (out, expected))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_and_stays_close(dtype):
    model = no_label_dropout(tiny_udit()).eval()
    x, t, y = inputs()
    with torch.no_grad():
        reference = model(x, t, y)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x, t, y)
        after = model(x, t, y)  # the fold cached under autocast must not leak low precision
    assert low.dtype == dtype
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
    assert torch.equal(after, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_step_under_autocast_stays_close(dtype):
    # In training the FFN folds are computed inside autocast (low-precision weights
    # meeting full-precision biases); gradients must reach every parameter.
    model = no_label_dropout(tiny_udit())
    randomize(model)
    x, t, y = inputs()
    reference = model(x, t, y)
    with torch.autocast("cpu", dtype=dtype):
        low = model(x, t, y)
    low.float().pow(2).mean().backward()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compiles_as_one_graph(mode):
    model = no_label_dropout(tiny_udit())
    getattr(model, mode)()
    x, t, y = inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_rel_close(compiled(x, t, y), model(x, t, y), SINGLE_CALL_TOL, "compiled")


def test_compiled_code_reads_cached_rope_tables():
    # Tables built inside a compiled graph become part of its kernels (cosines recomputed
    # element by element); cache_rope_tables makes the graph read them instead.
    def traced_functions(model):
        names = []

        def backend(gm, example_inputs):
            names.extend(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
            return gm.forward
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=backend, fullgraph=True)(*inputs(size=8))
        return names

    model = no_label_dropout(tiny_udit(input_size=8)).eval()
    models._ROPE_TABLES.clear()
    assert any("polar" in name for name in traced_functions(model))  # built in the graph
    assert not models._ROPE_TABLES  # and not kept: they would hold the tracer's tensors
    models.cache_rope_tables(model)
    assert not any("polar" in name for name in traced_functions(model))


def test_compile_blocks_keeps_the_function_and_the_checkpoint_names():
    model = no_label_dropout(tiny_udit())
    reference = deepcopy(model)
    compile_blocks(model, backend="aot_eager")
    assert all(block._compiled_call_impl is not None for block in model.blocks())
    x, t, y = inputs()
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(reference, mode)()
        with torch.no_grad():
            assert_rel_close(model(x, t, y), reference(x, t, y), SINGLE_CALL_TOL, f"blocks compiled, {mode}")
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints keep their names


def test_dit_guidance_applies_to_three_channels_by_default():
    torch.manual_seed(0)
    dit = randomize(DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)).eval()
    x, t, _ = inputs(n=4, size=8)
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        raw = dit(torch.cat([x[:2], x[:2]]), t, y)
        three = dit.forward_with_cfg(x, t, y, 4.0)
        every = dit.forward_with_cfg(x, t, y, 4.0, cfg_channels=None)
    assert torch.equal(three[:, 3:], raw[:, 3:])
    assert not torch.equal(every[:, 3:4], raw[:, 3:4])
    assert torch.equal(three[:2, :3], three[2:, :3])
