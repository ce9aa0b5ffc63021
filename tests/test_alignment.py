"""Representation alignment (--repa): encoders, projector, losses, data pairing, training, refusals."""

import json
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from conftest import ROOT, TINY_UDIT_KWARGS, make_image_folder, tiny_udit, torchrun
from udit.alignment import (AlignedObjective, Aligner, Projector, average_gradients, manifold_loss,
                            negative_cosine, resample_grid)
from udit.checkpoint import load_checkpoint
from udit.encoders import (EncoderError, build_local_vit, dinov2_resolution, load_encoder,
                           save_encoder)
from udit.monitor import read_scalars
from udit.objectives import FlowObjective

TINY_ENCODER = dict(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2)
PIXEL = ["--vae", "none", "--image-size", "16", "--num-classes", "2", "--global-batch-size", "4",
         "--num-workers", "0", "--log-every", "1", "--sample-steps", "2", "--ckpt-every", "100"]
UDIT = ["--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS]
DIT = ["--model", "DiT-S/4", "--model-kwargs", '{"hidden_size": 32, "num_heads": 2, "depth": 3}']


def make_tiny_encoder(path, **overrides):
    """A random local ViT encoder file (16 px, 4x4 patches of 4 px, width 24) written by save_encoder."""
    config = {**TINY_ENCODER, **overrides}
    torch.manual_seed(0)
    save_encoder(build_local_vit(**config), config, path)
    return path


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("encoder") / "encoder.pt")


# ----------------------------------------------------------------- encoders

def test_encoder_gives_the_normed_patch_tokens_of_the_normalised_resized_image(encoder_file):
    encoder = load_encoder(str(encoder_file), image_size=32)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((images + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
    vit = encoder.vit
    tokens = vit.norm(vit.blocks(vit._pos_embed(vit.patch_embed(x))))[:, 1:]  # class token dropped
    out = encoder(images)
    assert out.shape == (2, 16, 24) and out.dtype == torch.float32 and (encoder.grid, encoder.width) == (4, 24)
    assert torch.allclose(out, tokens, atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training


def test_dinov2_is_built_at_repas_resolution_from_a_weights_file(tmp_path):
    import timm
    assert [dinov2_resolution(s) for s in (256, 512, 64)] == [224, 448, 56]
    source = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)  # 518 px
    torch.save(source.state_dict(), tmp_path / "dinov2_s.pth")
    encoder = load_encoder("dinov2-vits14", image_size=64, weights=str(tmp_path / "dinov2_s.pth"))
    assert (encoder.resolution, encoder.grid, encoder.width) == (56, 4, 384)
    assert torch.equal(encoder.vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert encoder.vit.pos_embed.shape == (1, 1 + 16, 384)  # resampled from 37 x 37
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 384)


def test_dinov2_offline_without_weights_is_one_line_naming_the_file_and_flag(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()  # data that would fail too: the encoder must fail first
    code = train.main(["--data-path", str(tmp_path / "empty"), *UDIT, *PIXEL, "--repa",
                       "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "vit_base_patch14_dinov2.lvd142m/resolve/main/model.safetensors" in err[0]
    assert "--encoder-weights PATH" in err[0] and not (tmp_path / "r").exists()


# ----------------------------------------------------------------- projector and losses

def test_loss_terms_are_the_formulas_written_out():
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    n, T = h.shape[:2]

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))
    for i in range(n):
        expected = -sum(cos(h[i, t], y[i, t]) for t in range(T)) / T
        assert abs(negative_cosine(h, y)[i].item() - expected) < 1e-6
    sim_h = [[sum(cos(h[i, t], h[j, t]) for t in range(T)) / T for j in range(n)] for i in range(n)]
    sim_y = [[sum(cos(y[i, t], y[j, t]) for t in range(T)) / T for j in range(n)] for i in range(n)]
    per_sample = manifold_loss(h, y)
    for i in range(n):
        assert abs(per_sample[i].item() - sum((sim_h[i][j] - sim_y[i][j]) ** 2 for j in range(n)) / n) < 1e-6
    assert torch.allclose(negative_cosine(y, y), torch.full((3,), -1.0)) and manifold_loss(y, y).abs().max() < 1e-6
    # Half precision inputs are normalised in float32: no overflow of the squared norm.
    big = torch.full((1, 2, 8), 300.0, dtype=torch.float16)
    assert torch.allclose(negative_cosine(big, big), torch.tensor([-1.0]))


def test_projector_layers_and_the_resampled_grids():
    projector = Projector(32, 24, width=64)
    assert [type(m).__name__ for m in projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [tuple(m.weight.shape) for m in projector if isinstance(m, torch.nn.Linear)] == [(64, 32), (64, 64), (24, 64)]
    assert sum(p.numel() for p in Projector(1152, 768).parameters()) == 1152 * 2048 + 2048 ** 2 + 2048 * 768 + 2048 * 2 + 768
    z = torch.arange(16.0).view(1, 4, 4, 1)
    assert torch.equal(resample_grid(z, 2)[0, :, :, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # 2x2 means
    up = resample_grid(torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 2, 2, 1), 4)[0, :, :, 0]
    assert torch.allclose(up[0], torch.tensor([0.0, 0.25, 0.75, 1.0]))  # bilinear, corners kept

    udit = tiny_udit(num_classes=2)  # 16 x 16 input: the latent stage is 4 x 4 at width 4 * 32
    aligner = Aligner(udit, encoder_grid=8, encoder_width=24, projector_width=64)
    assert aligner.block_name == "latent.0" and aligner.grid == 4
    assert aligner.project(torch.randn(2, 4, 4, 128)).shape == (2, 64, 24)  # projected, then upsampled
    from models import create_model
    dit = create_model("DiT-S/4", input_size=16, hidden_size=32, num_heads=2, depth=12, num_classes=2)
    aligner = Aligner(dit, encoder_grid=2, encoder_width=24, projector_width=64)
    assert aligner.block_name == "blocks.3" and aligner.project(torch.randn(2, 16, 32)).shape == (2, 4, 24)
    with pytest.raises(EncoderError, match="4x4 tokens cannot be resampled to the encoder's 3x3"):
        Aligner(dit, encoder_grid=3, encoder_width=24)


def test_aligned_objective_adds_its_terms_to_one_forward_pass():
    from models import capture_block_outputs
    model = tiny_udit(num_classes=2, learn_sigma=False).train()
    for e in model.label_embedders():
        e.dropout_prob = 0.0
    aligner = Aligner(model, encoder_grid=4, encoder_width=24, manifold_coeff=3.0, projector_width=16)
    calls = []

    def model_fn(x, t, y):
        calls.append(1)
        return model(x, t, y)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t, y, target = torch.rand(3, generator=g), torch.tensor([0, 1, 1]), torch.randn(3, 16, 24, generator=g)
    with capture_block_outputs(model, [aligner.block_name]) as captured:
        objective = AlignedObjective(FlowObjective(), aligner, captured, nullcontext)
        torch.manual_seed(1)
        terms = objective.losses(model_fn, x0, t, y, target=target)
        projected = aligner.project(captured["latent.0"])
    torch.manual_seed(1)
    base = FlowObjective().losses(model, x0, t, y)
    assert len(calls) == 1 and set(terms) == {"loss", "align", "manifold"}
    assert torch.allclose(terms["align"], negative_cosine(projected, target))
    assert torch.allclose(terms["manifold"], manifold_loss(projected, target))
    assert torch.allclose(terms["loss"], base["loss"] + 0.5 * terms["align"] + 3.0 * terms["manifold"], atol=1e-6)
    terms["align"].mean().backward()
    assert aligner.projector[0].weight.grad.abs().sum() > 0 and model.x_embedder.proj.weight.grad.abs().sum() > 0
    assert model.final_layer.out_proj.weight.grad is None  # the alignment term reaches the layers below only


def test_projector_gradients_are_averaged_over_processes(monkeypatch):
    import udit.alignment as alignment
    others = []  # what a second process holds: its gradients are 1 higher

    def all_reduce(flat):
        others.append(flat.clone() + 1)
        flat += others[-1]
    monkeypatch.setattr(alignment.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(alignment.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(alignment.dist, "all_reduce", all_reduce)
    projector = Projector(3, 2, width=4)
    for i, p in enumerate(projector.parameters()):
        p.grad = torch.full_like(p, float(i))
    average_gradients(projector.parameters())
    assert len(others) == 1  # one call for all tensors
    for i, p in enumerate(projector.parameters()):
        assert torch.equal(p.grad, torch.full_like(p, i + 0.5))


# ----------------------------------------------------------------- data

def test_stored_images_pair_with_their_latent_flip(tmp_path):
    from udit.data import COMPACT_LAYOUT, CompactFeatureDataset
    root = tmp_path / "store"
    root.mkdir()
    n, size = 4, 8
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    features = np.zeros((n, 2, 2, 1, 1, 1), np.float16)
    features[:, 0, 0], features[:, 1, 0] = 1.0, -1.0  # mean +1: as is; -1: mirrored; std 0
    np.save(root / "features.npy", features)
    np.save(root / "labels.npy", np.zeros(n, np.int64))
    np.save(root / "images.npy", images)
    (root / "meta.json").write_text(json.dumps({"layout": COMPACT_LAYOUT, "complete": True, "images": True}))
    dataset = CompactFeatureDataset(root, seed=0, images=True)
    seen = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(n):
            latent, _, _, image = dataset[i]
            stored = torch.from_numpy(images[i] if latent.item() > 0 else images[i][:, ::-1].copy())
            assert torch.equal(image, stored.permute(2, 0, 1).float() / 127.5 - 1)
            seen.add(latent.item())
    assert seen == {1.0, -1.0}
    assert len(CompactFeatureDataset(root, seed=0)[0]) == 3  # without images: the items of before


@pytest.fixture(scope="module")
def store_with_images(tiny_data, tmp_path_factory):
    import extract_features
    store = tmp_path_factory.mktemp("store") / "features"
    assert extract_features.main(["--data-path", str(tiny_data["images"]), "--features-path", str(store),
                                  "--vae-path", str(tiny_data["vae"]), "--keep-images", "--batch-size", "5",
                                  "--num-workers", "0"]) == 0
    return store


def test_extraction_keeps_the_encoded_centre_crops(tiny_data, store_with_images):
    from PIL import Image
    from udit.data import center_crop_arr, image_files
    store = store_with_images
    meta = json.loads((store / "meta.json").read_text())
    images = np.load(store / "images.npy")
    assert meta["images"] and images.shape == (16, 256, 256, 3) and images.dtype == np.uint8
    for i, path in enumerate(image_files(tiny_data["images"])):
        with Image.open(path) as image:
            assert np.array_equal(images[i], center_crop_arr(image.convert("RGB"), 256))


# ----------------------------------------------------------------- training and sampling

@pytest.mark.parametrize("family, objective", [(UDIT, "flow"), (DIT, "ddpm")])
def test_aligned_training_records_its_settings_and_samples_like_any_checkpoint(encoder_file, tmp_path, family,
                                                                               objective):
    import sample_ddp
    data = make_image_folder(tmp_path / "images", size=16)
    assert train.main(["--data-path", str(data), *family, *PIXEL, "--objective", objective, "--max-steps", "2",
                       "--repa", "--encoder", str(encoder_file), "--projector-width", "32",
                       "--results-dir", str(tmp_path / "r")]) == 0
    (path,) = tmp_path.glob("r/*/checkpoints/0000002.pt")
    ckpt = load_checkpoint(path)
    args = ckpt["args"]
    assert args["repa"] and args["encoder"] == str(encoder_file) and args["align_coeff"] == 0.5
    if family is UDIT:
        assert (args["align_stage"], args["align_block"], args["manifold_coeff"]) == ("latent", None, 3.0)
    else:
        assert (args["align_stage"], args["align_block"], args["manifold_coeff"]) == (None, 1, 0.0)
    assert set(ckpt["aligner"]) == {f"projector.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}
    assert set(ckpt["ema"]) == set(ckpt["model"]) and not any("projector" in k for k in ckpt["model"])
    log = next(tmp_path.glob("r/*/log.txt")).read_text()
    assert "alignment: " + ("latent.0" if family is UDIT else "blocks.0") in log
    terms = [line for line in log.splitlines() if "Train Loss" in line]
    assert terms and all("Align: " in line and ("Manifold: " in line) == (family is UDIT) for line in terms)
    scalars = read_scalars(next(tmp_path.glob("r/*/tensorboard")))
    assert len(scalars["train/align"]) == 2 and ("train/manifold" in scalars) == (family is UDIT)
    sampling = ["--ckpt", str(path), "--num-fid-samples", "4", "--per-proc-batch-size", "2",
                "--num-sampling-steps", "2", "--sample-dir"]
    assert sample_ddp.main([*sampling, str(tmp_path / "one")]) == 0
    (npz,) = (tmp_path / "one").glob("*.npz")
    assert np.load(npz)["arr_0"].shape == (4, 16, 16, 3)
    if family is UDIT:  # the aligner in the checkpoint changes nothing: 2 processes write the same bytes
        torchrun("sample_ddp.py", *sampling, tmp_path / "two")
        assert next((tmp_path / "two").glob("*.npz")).read_bytes() == npz.read_bytes()


def test_aligned_training_from_features_with_images_and_bf16(encoder_file, tiny_data, store_with_images, tmp_path):
    assert train.main(["--feature-path", str(store_with_images), "--vae-path", str(tiny_data["vae"]), *UDIT,
                       *PIXEL[2:], "--image-size", "256", "--max-steps", "2", "--precision", "bf16",
                       "--grad-checkpointing", "--repa", "--encoder", str(encoder_file), "--projector-width", "32",
                       "--results-dir", str(tmp_path / "r")]) == 0
    ckpt = load_checkpoint(next(tmp_path.glob("r/*/checkpoints/0000002.pt")))
    assert all(torch.isfinite(v).all() for v in [*ckpt["model"].values(), *ckpt["aligner"].values()])


def test_accelerate_trains_with_alignment(encoder_file, tmp_path):
    import train_accelerate
    data = make_image_folder(tmp_path / "images", size=16)
    assert train_accelerate.main(["--data-path", str(data), *UDIT, *PIXEL, "--max-steps", "2", "--repa",
                                  "--encoder", str(encoder_file), "--projector-width", "32",
                                  "--results-dir", str(tmp_path / "r")]) == 0
    ckpt = load_checkpoint(next(tmp_path.glob("r/*/checkpoints/0000002.pt")))
    assert ckpt["step"] == 2 and "aligner" in ckpt


def test_the_demo_encoder_learns_masked_patches_and_loads_as_an_encoder(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from digits_encoder import patchify, train_encoder
    x = torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4)
    assert torch.equal(patchify(x, 2)[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))  # token order: rows
    rng = np.random.default_rng(0)
    digits = (rng.random((64, 8, 8)) < 0.3).astype(np.uint8) * 255
    losses = train_encoder(digits, tmp_path / "enc.pt", steps=40, batch_size=16)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    encoder = load_encoder(str(tmp_path / "enc.pt"), image_size=8)
    assert (encoder.grid, encoder.width) == (4, 32) and encoder(torch.zeros(2, 3, 8, 8)).shape == (2, 16, 32)


# ----------------------------------------------------------------- refusals

def write_public(root):
    (root / "x_features").mkdir(parents=True)
    (root / "x_labels").mkdir()
    np.save(root / "x_features" / "0.npy", np.zeros((1, 4, 2, 2), np.float32))
    np.save(root / "x_labels" / "0.npy", np.array([0]))
    return root


@pytest.mark.parametrize("case, message", [
    ("unknown encoder", "--encoder dinov3-huge: unknown encoder; use one of dinov2-vits14"),
    ("public features", "a fast-DiT feature layout holds no images, which the alignment encoder needs: extract "
                        "the features of the image folder with extract_features.py --keep-images"),
    ("block out of range", "--align-block 4: this DiT has blocks 1..3"),
    ("empty stage", "--align-stage latent: this U-DiT has no block in that stage"),
    ("block for U-DiT", "--align-block chooses a DiT block; U-DiT aligns a stage: use --align-stage"),
    ("no --repa", "--align-coeff applies with --repa only"),
    ("ungridable encoder", "its 4x4 tokens cannot be resampled to the encoder's 3x3"),
    ("missing weights file", "--encoder-weights absent.safetensors: no such file"),
    ("missing encoder file", "--encoder absent/encoder.pt: no such file; use one of dinov2-vits14"),
    ("zero weights", "--align-coeff 0 and --manifold-coeff 0 align nothing"),
])
def test_alignment_settings_that_cannot_work_exit_2_in_one_line(encoder_file, tiny_data, tmp_path, capsys, case,
                                                                message):
    data = ["--data-path", str(tiny_data["small_images"])]
    repa = ["--repa", "--encoder", str(encoder_file)]
    flags = {
        "unknown encoder": [*data, *UDIT, "--repa", "--encoder", "dinov3-huge"],
        "public features": ["--feature-path", str(write_public(tmp_path / "public")), *UDIT, *repa],
        "block out of range": [*data, *DIT, *repa, "--align-block", "4"],
        "empty stage": [*data, "--model", "U-DiT-S", "--model-kwargs",
                        '{"hidden_size": 16, "num_heads": 2, "depth": [1, 1, 0, 1, 1]}', *repa],
        "block for U-DiT": [*data, *UDIT, *repa, "--align-block", "2"],
        "no --repa": [*data, *UDIT, "--align-coeff", "1"],
        "ungridable encoder": [*data, *DIT, "--repa", "--encoder",
                               str(make_tiny_encoder(tmp_path / "e12.pt", img_size=12))],
        "missing weights file": [*data, *UDIT, "--repa", "--encoder-weights", "absent.safetensors"],
        "missing encoder file": [*data, *UDIT, "--repa", "--encoder", "absent/encoder.pt"],
        "zero weights": [*data, *UDIT, *repa, "--align-coeff", "0", "--manifold-coeff", "0"],
    }[case]
    pixel = PIXEL if case != "public features" else PIXEL[2:]
    try:
        code = train.main([*flags, *pixel, "--results-dir", str(tmp_path / "r")])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and len([line for line in err if "error" in line]) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("change", ["other weights", "other width"])
def test_resuming_against_another_encoder_is_refused_in_one_line(tiny_data, tmp_path, capsys, change):
    """The flag names a file; its content is what the projector was trained against (args.encoder_digest)."""
    encoder = make_tiny_encoder(tmp_path / "encoder.pt")
    assert train.main(["--data-path", str(tiny_data["small_images"]), *UDIT, *PIXEL, "--max-steps", "1", "--repa",
                       "--encoder", str(encoder), "--projector-width", "32", "--results-dir", str(tmp_path / "r")]) == 0
    (run,) = (tmp_path / "r").iterdir()
    if change == "other weights":  # the same weights moved: found by their digest, refused before by path
        moved = encoder.rename(tmp_path / "moved.pt")
        with pytest.raises(SystemExit) as info:  # refused while parsing
            train.main(["--resume", str(run), "--max-steps", "2"])
        assert info.value.code == 2 and "no such file, where the experiment's encoder was; if it moved, resume with --encoder NEW_PATH" in \
            capsys.readouterr().err.strip().splitlines()[-1]
        assert train.main(["--resume", str(run), "--max-steps", "2", "--encoder", str(moved)]) == 0
        encoder = moved  # the checkpoint of that resumed run records the new path
    torch.manual_seed(1)  # the same file name, rewritten: new weights (and, for "other width", a new shape)
    config = {**TINY_ENCODER, **({"embed_dim": 32} if change == "other width" else {})}
    save_encoder(build_local_vit(**config), config, encoder)
    # The width change used to be a state-dict traceback, the same width trained on silently.
    last = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train.main(["--resume", str(run), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "not the weights this experiment was trained with" in err[-1], err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == last  # nothing trained

