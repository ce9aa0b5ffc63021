"""What a run is made with must reach every later use of it: sampling, resuming, reruns.

Checkpoints of the original trainers, models without a null label or without learned
variance, data with fewer classes than the model, sample folders of other jobs, flags
given with --resume, and latents of VAEs with their own normalisation.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
import sample
import sample_ddp
import train
from conftest import TINY_UDIT_KWARGS, make_tiny_vae, randomize
from udit.checkpoint import load_checkpoint
from udit.cli import ActionableError
from udit.objectives import SiTVelocity
from udit.samplers import make_sampler
from udit.sampling import add_sampling_args, load_guide_model, load_sampling_model
from udit.trainer import load_initial_weights, parse_training_args, training_parser

PIXEL = ["--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS, "--vae", "none", "--image-size", "16",
         "--global-batch-size", "4", "--num-workers", "0", "--log-every", "1", "--sample-steps", "2"]
QUICK = ["--num-sampling-steps", "2"]


def train_pixel(data, results, *flags, steps=1):
    """A few steps of a tiny pixel-space U-DiT; the path of its last checkpoint."""
    assert train.main(["--data-path", str(data), "--results-dir", str(results), "--max-steps", str(steps),
                       *PIXEL, *flags]) == 0
    return sorted(Path(results).glob("*/checkpoints/*.pt"))[-1]


def last_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


# ----------------------------------------------------------------- kind 1: checkpoints rebuild their model

def test_checkpoint_of_the_original_trainers_with_namespace_args_samples(tmp_path):
    from models import create_model
    kwargs = {"hidden_size": 32, "num_heads": 2, "depth": 1}
    state_dict = create_model("DiT-S/8", input_size=16, num_classes=2, in_channels=3, **kwargs).state_dict()
    original_args = argparse.Namespace(model="DiT-S/8", image_size=16, num_classes=2, vae="none",
                                       results_dir="results", epochs=1400, global_batch_size=256)
    torch.save({"model": state_dict, "ema": state_dict, "opt": {}, "args": original_args}, tmp_path / "orig.pt")
    assert load_checkpoint(tmp_path / "orig.pt")["args"]["model"] == "DiT-S/8"
    assert sample.main(["--ckpt", str(tmp_path / "orig.pt"), "--model-kwargs", json.dumps(kwargs), "--model",
                        "DiT-S/8", "--image-size", "16", "--num-classes", "2", "--vae", "none", *QUICK,
                        "--cfg-scale", "1", "--output", str(tmp_path / "flags.png")]) == 0
    # What the Namespace says reliably (model, size, classes, VAE) is used: only the keywords are needed.
    assert sample.main(["--ckpt", str(tmp_path / "orig.pt"), "--model-kwargs", json.dumps(kwargs), *QUICK,
                        "--cfg-scale", "4", "--output", str(tmp_path / "namespace.png")]) == 0
    assert Image.open(tmp_path / "namespace.png").size == (4 * 18 + 2, 2 * 18 + 2)
    # Saved through DDP (keys "module.") or torch.compile ("_orig_mod."), with pathlib paths in args.
    for prefix in ("module.", "_orig_mod."):
        wrapped = {prefix + k: v for k, v in state_dict.items()}
        args = argparse.Namespace(**vars(original_args), data_path=Path("/data/imagenet/train"))
        torch.save({"model": wrapped, "ema": wrapped, "args": args}, tmp_path / "wrapped.pt")
        assert sample.main(["--ckpt", str(tmp_path / "wrapped.pt"), "--model-kwargs", json.dumps(kwargs), *QUICK,
                            "--cfg-scale", "1", "--output", str(tmp_path / "wrapped.png")]) == 0


# SiT's train.py (willisma/SiT): its transport flags and the rest of its Namespace, as saved in "args".
SIT_KWARGS = {"hidden_size": 32, "num_heads": 2, "depth": 1}
SIT_ARGS = dict(data_path="/data/imagenet/train", results_dir="results", model="SiT-S/8", image_size=16,
                num_classes=2, epochs=1400, global_batch_size=256, global_seed=0, vae="ema", num_workers=4,
                log_every=100, ckpt_every=50_000, sample_every=10_000, cfg_scale=4.0, wandb=False, ckpt=None,
                path_type="Linear", prediction="velocity", loss_weight=None, sample_eps=1e-3, train_eps=1e-5)


def sit_checkpoint(path, **changes):
    """A checkpoint as SiT's train.py writes it (model, ema, opt, args) of a tiny SiT-S/8; returns the network.

    SiT-X/p is DiT-X/p (same layout and keys) with learn_sigma on, SiT's default; pixel
    space (3 channels) to sample without a VAE.
    """
    from models import create_model
    net = randomize(create_model("DiT-S/8", input_size=16, num_classes=2, in_channels=3, **SIT_KWARGS)).eval()
    args = argparse.Namespace(**{**SIT_ARGS, **changes})
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {}, "args": args}, path)
    return net


def sampling_args(*argv):
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    return parser.parse_args(argv)


@pytest.mark.parametrize("model_flag", [[], ["--model", "DiT-S/8", "--image-size", "16", "--num-classes", "2"]])
def test_a_sit_checkpoint_is_a_flow_model_with_its_time_direction_converted(tmp_path, model_flag):
    net = sit_checkpoint(tmp_path / "sit.pt")
    args = sampling_args("--ckpt", str(tmp_path / "sit.pt"), "--model-kwargs", json.dumps(SIT_KWARGS), "--vae",
                         "none", *model_flag)
    model, _, settings = load_sampling_model(args, torch.device("cpu"))
    assert (settings["objective"], settings["model"], settings["learn_sigma"]) == ("flow", "DiT-S/8", True)
    # Our flow time s (the network sees 1000 s, noise at s = 1) is SiT's t = 1 - s, and our velocity
    # eps - x_0 is minus SiT's x_1 - eps; SiT's forward keeps the first C of its 2 C output channels.
    x, s, y = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.allclose(model(x, 1000 * s, y), -net(x, 1 - s, y)[:, :3], atol=1e-5)
    flags = ["--ckpt", str(tmp_path / "sit.pt"), "--model-kwargs", json.dumps(SIT_KWARGS), "--vae", "none",
             *model_flag, "--num-sampling-steps", "2"]
    assert sample.main([*flags, "--output", str(tmp_path / "sit.png")]) == 0  # flow-sde, cfg 4 on its null label
    with pytest.raises(SystemExit) as info:
        sample.main([*flags, "--sampler", "ddpm", "--output", str(tmp_path / "eps.png")])
    assert info.value.code == 2 and not (tmp_path / "eps.png").exists()


@pytest.mark.parametrize("main_vae", ["ema", None])  # SiT's default; a foreign checkpoint that records no VAE
def test_a_pixel_space_guide_for_a_sit_checkpoint_sampled_in_pixel_space(tmp_path, main_vae):
    net = sit_checkpoint(tmp_path / "sit.pt")
    if main_vae is None:
        args = {k: v for k, v in SIT_ARGS.items() if k != "vae"}
        torch.save({"model": net.state_dict(), "ema": net.state_dict(), "args": argparse.Namespace(**args)},
                   tmp_path / "sit.pt")
    ours = {"model": "DiT-S/8", "model_kwargs": SIT_KWARGS, "image_size": 16, "latent_size": 16, "num_classes": 2,
            "vae": "none", "objective": "flow", "latent_scale": 1.0, "latent_shift": 0.0, "learn_sigma": True}
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "args": ours}, tmp_path / "guide.pt")
    args = sampling_args("--ckpt", str(tmp_path / "sit.pt"), "--model-kwargs", json.dumps(SIT_KWARGS), "--vae",
                         "none", "--guide-ckpt", str(tmp_path / "guide.pt"))
    _, _, settings = load_sampling_model(args, torch.device("cpu"))
    # Pixel space has no latent normalisation to differ in (it was a KeyError, or a refusal for SiT's vae "ema").
    guide = load_guide_model(str(tmp_path / "guide.pt"), settings, torch.device("cpu"))
    x, s, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.7]), torch.tensor([0, 1])
    with torch.no_grad():
        assert guide(x, 1000 * s, y).shape[1] == 6


class SiTGaussianVelocity(torch.nn.Module):
    """The exact velocity of SiT's interpolant x_t = t x_1 + (1 - t) eps for data x_1 ~ N(mu_c, s_c^2), called
    as SiT's network: (x, t in [0, 1] with data at 1, y) -> E[x_1 - eps | x_t].

    x_t ~ N(t mu, V), V = t^2 s^2 + (1 - t)^2; with r = x_t - t mu: E[x_1 | x_t] = mu + t s^2 r / V and
    E[eps | x_t] = (1 - t) r / V. Its ODE from noise z at t = 0 reaches mu + s z at t = 1.
    """

    def __init__(self, mu=(0.5, -0.3), s=(0.3, 0.8)):
        super().__init__()
        self.mu, self.s = torch.tensor(mu).view(1, -1, 1, 1), torch.tensor(s).view(1, -1, 1, 1)

    def forward(self, x, t, y=None):
        t = t.double().view(-1, 1, 1, 1)
        var = t ** 2 * self.s ** 2 + (1 - t) ** 2
        r = x - t * self.mu
        return (self.mu + t * self.s ** 2 * r / var - (1 - t) * r / var).float()


def test_sit_velocity_sampled_by_our_flow_solvers_reaches_its_data():
    sit = SiTGaussianVelocity()
    z = torch.randn(64, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = sit.mu + sit.s * z
    def rms_error(network, steps=25):
        x = make_sampler("flow-heun", steps).sample(lambda x, t: network(x, t, None), z, [])
        return (x - exact).pow(2).mean().sqrt().item()
    converted = SiTVelocity(sit)
    # Heun's second order: 0.0017 at 25 steps, 0.0004 at 50.
    assert rms_error(converted) < 0.003 and rms_error(converted, 50) < rms_error(converted) / 3
    # Without either half of the conversion the same solver lands far from the data (0.096 and 2.59).
    assert rms_error(lambda x, t, y: -sit(x, t / 1000, y)) > 0.05
    assert rms_error(lambda x, t, y: sit(x, 1 - t / 1000, y)) > 0.05


@pytest.mark.parametrize("transport, model", [
    (dict(path_type="GVP"), "SiT-S/8"), (dict(path_type="VP"), "SiT-S/8"), (dict(prediction="noise"), "SiT-S/8"),
    (dict(prediction="score"), "SiT-S/8"),
    (dict(path_type="linear", prediction="v"), "SiT-S/8"),  # REPA's train.py: its own conventions and projectors
    (dict(path_type=None, prediction=None), "SiT-S/8")])  # a SiT network that records no transport
def test_sit_transports_we_cannot_sample_are_refused_in_one_line(tmp_path, capsys, transport, model):
    sit_checkpoint(tmp_path / "sit.pt", model=model, **transport)
    flags = ["--ckpt", str(tmp_path / "sit.pt"), "--model-kwargs", json.dumps(SIT_KWARGS), "--vae", "none"]
    for model_flag in ([], ["--model", "DiT-S/8"]):
        with pytest.raises(SystemExit) as info:
            sample.main([*flags, *model_flag, "--output", str(tmp_path / "x.png")])
        err = last_error_line(capsys)
        assert info.value.code == 2 and "only SiT's train.py default (--path-type Linear --prediction velocity)" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_fine_tuning_from_a_sit_checkpoint_names_its_time_direction(tmp_path, objective):
    net = sit_checkpoint(tmp_path / "sit.pt")
    settings = argparse.Namespace(ckpt=str(tmp_path / "sit.pt"), objective=objective, allow_objective_change=False)
    with pytest.raises(ActionableError, match="flow in SiT's time direction"):
        load_initial_weights(net, settings)


def test_resuming_an_experiment_of_another_trainer_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "000-SiT-S-8" / "checkpoints").mkdir(parents=True)
    sit_checkpoint(tmp_path / "000-SiT-S-8" / "checkpoints" / "0050000.pt")
    with pytest.raises(SystemExit) as info:
        parse_training_args(training_parser("train"), ["--resume", str(tmp_path / "000-SiT-S-8")])
    assert info.value.code == 2 and "written by another trainer" in last_error_line(capsys)


def test_model_trained_without_label_dropout_samples_and_refuses_guidance(tiny_data, tmp_path, capsys):
    ckpt = train_pixel(tiny_data["small_images"], tmp_path / "r", "--num-classes", "2", "--class-dropout-prob", "0")
    assert (ckpt.parents[1] / "samples" / "0000001.png").is_file()  # an unguided grid: no null label for cfg 4
    assert "sample grid" not in (ckpt.parents[1] / "log.txt").read_text()
    assert sample.main(["--ckpt", str(ckpt), *QUICK, "--cfg-scale", "1", "--output", str(tmp_path / "g.png")]) == 0
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ckpt), *QUICK, "--cfg-scale", "4", "--output", str(tmp_path / "h.png")])
    assert info.value.code == 2 and "has no null label" in last_error_line(capsys)
    assert sample_ddp.main(["--ckpt", str(ckpt), *QUICK, "--sample-dir", str(tmp_path / "s")]) == 2  # cfg 1.5
    assert "--cfg-scale 1" in last_error_line(capsys) and not (tmp_path / "s").exists()
    # A plain state dict of it: the missing null row is read off the label tables.
    torch.save(load_checkpoint(ckpt)["ema"], tmp_path / "plain.pt")
    assert sample.main(["--ckpt", str(tmp_path / "plain.pt"), "--model", "U-DiT-S", "--model-kwargs",
                        TINY_UDIT_KWARGS, "--vae", "none", "--image-size", "16", "--num-classes", "2", *QUICK,
                        "--cfg-scale", "1", "--output", str(tmp_path / "p.png")]) == 0


def test_model_without_learned_variance_trains_and_samples(tiny_data, tmp_path):
    kwargs = {**json.loads(TINY_UDIT_KWARGS), "learn_sigma": False}
    ckpt = train_pixel(tiny_data["small_images"], tmp_path / "r", "--num-classes", "2", "--model-kwargs",
                       json.dumps(kwargs), steps=2)
    assert load_checkpoint(ckpt)["model"]["final_layer.out_proj.weight"].shape[0] == 3
    assert sample.main(["--ckpt", str(ckpt), *QUICK, "--output", str(tmp_path / "g.png")]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "12"], "input size 12"),
    (["--model-kwargs", '{"hidden_size": 16, "num_heads": 3, "depth": [1, 1, 1, 1, 1]}'], "not divisible"),
    (["--model-kwargs", '{"no_such_keyword": 1}'], "do not fit"),
    (["--global-batch-size", "100"], "fewer than one global batch"),
])
def test_settings_that_cannot_work_leave_no_experiment_folder(tiny_data, tmp_path, capsys, flags, message):
    code = train.main(["--data-path", str(tiny_data["small_images"]), "--results-dir", str(tmp_path / "r"),
                       *PIXEL, "--num-classes", "2", *flags])
    assert code == 2 and message in last_error_line(capsys)
    assert not list((tmp_path / "r").glob("*")), "an experiment folder was created for a run that cannot start"


# ----------------------------------------------------------------- kind 2: classes the data holds

def test_fewer_classes_than_num_classes_warns_and_samplers_draw_trained_ones(tiny_data, tmp_path, capsys):
    ckpt = train_pixel(tiny_data["small_images"], tmp_path / "r")  # 2 class folders, --num-classes 1000
    log = (ckpt.parents[1] / "log.txt").read_text()
    assert "the data holds 2 classes but --num-classes is 1000" in log and "--num-classes 2" in log
    assert load_checkpoint(ckpt)["args"]["trained_labels"] == [0, 1]
    assert sample_ddp.main(["--ckpt", str(ckpt), *QUICK, "--cfg-scale", "1", "--num-fid-samples", "8",
                            "--per-proc-batch-size", "4", "--sample-dir", str(tmp_path / "s")]) == 0
    with np.load(next((tmp_path / "s").glob("*.npz"))) as data:
        assert set(data["arr_1"].tolist()) == {0, 1}
    assert sample.main(["--ckpt", str(ckpt), *QUICK, "--cfg-scale", "1", "--output", str(tmp_path / "g.png"),
                        "--save-individual", str(tmp_path / "ind")]) == 0
    assert {p.stem.split("_")[1] for p in (tmp_path / "ind").iterdir()} == {"0", "1"}
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ckpt), *QUICK, "--class-labels", "5", "--output", str(tmp_path / "h.png")])
    assert info.value.code == 2 and "[5] were never trained: this model learned classes 0..1" in last_error_line(capsys)


# ----------------------------------------------------------------- kind 3: other jobs' outputs, typed flags

def test_sample_folders_are_reused_only_by_the_same_checkpoint_and_settings(tiny_data, tmp_path, capsys):
    # Two experiments, each with a checkpoints/0000002.pt.
    first = train_pixel(tiny_data["small_images"], tmp_path / "a", "--num-classes", "2", steps=2)
    second = train_pixel(tiny_data["small_images"], tmp_path / "b", "--num-classes", "2", "--global-seed", "1",
                         steps=2)
    assert first.name == second.name
    common = [*QUICK, "--num-fid-samples", "4", "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "s")]
    for ckpt, extra in ((first, []), (second, []), (second, ["--cfg-channels", "all"])):
        capsys.readouterr()
        assert sample_ddp.main(["--ckpt", str(ckpt), *common, *extra]) == 0
        assert "(0 already there)" in capsys.readouterr().out
    assert len(list((tmp_path / "s").glob("*.npz"))) == 3
    assert sample_ddp.main(["--ckpt", str(first), *common]) == 0  # a rerun of a finished job reuses its images
    assert "(4 already there)" in capsys.readouterr().out
    folder = sorted(p for p in (tmp_path / "s").iterdir() if p.is_dir())[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "cfg_scale": 9.0}))
    checkpoint = first if manifest["checkpoint_sha256"] == sample_ddp.file_sha256(first) else second
    extra = ["--cfg-channels", "all"] if manifest["cfg_channels"] == "all" else []
    assert sample_ddp.main(["--ckpt", str(checkpoint), *common, *extra]) == 2
    assert "holds images made with other settings (cfg_scale: 9.0 there, 1.5 now)" in last_error_line(capsys)
    (folder / "manifest.json").unlink()
    assert sample_ddp.main(["--ckpt", str(checkpoint), *common, *extra]) == 2
    assert "holds images but no manifest.json" in last_error_line(capsys)


def test_resume_honours_or_refuses_every_flag_given(tiny_data, tmp_path, capsys):
    experiment = train_pixel(tiny_data["small_images"], tmp_path / "r", "--num-classes", "2", steps=2).parents[1]
    parser = training_parser("test")
    assert parse_training_args(parser, ["--resume", str(experiment)]).max_steps == 2
    assert parse_training_args(parser, ["--resume", str(experiment), "--max-steps", "400000"]).max_steps == 400000
    assert parse_training_args(parser, ["--resume", str(experiment), "--global-batch-size", "4"]).lr == 1e-4
    with pytest.raises(SystemExit) as info:
        parse_training_args(parser, ["--resume", str(experiment), "--lr", "0.01", "--global-batch-size", "8"])
    assert info.value.code == 2
    assert "--global-batch-size cannot change on resume (the experiment has 4, given 8)" in last_error_line(capsys)
    assert train.main(["--resume", str(experiment), "--max-steps", "3", "--lr", "0.01"]) == 0
    resumed = load_checkpoint(experiment / "checkpoints" / "0000003.pt")
    assert resumed["opt"]["param_groups"][0]["lr"] == 0.01 and resumed["args"]["lr"] == 0.01
    assert "lr 0.0001 -> 0.01" in (experiment / "log.txt").read_text()


# ----------------------------------------------------------------- kind 5: the VAE's own normalisation

def test_latent_normalisation_comes_from_the_vae_and_mismatches_are_refused(tiny_data, tmp_path, capsys):
    from udit.vae import encode, load_vae
    other_vae = make_tiny_vae(tmp_path / "vae_013025", scaling_factor=0.13025)
    vae = load_vae("ema", other_vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    raw = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
    assert torch.equal(encode(vae, x, torch.Generator().manual_seed(0)), raw * 0.13025)

    tiny = ["--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS, "--num-classes", "2", "--image-size", "64",
            "--global-batch-size", "4", "--num-workers", "0", "--max-steps", "1", "--sample-steps", "2"]
    assert train.main(["--data-path", str(tiny_data["images"]), "--vae-path", str(other_vae),
                       "--results-dir", str(tmp_path / "r"), *tiny]) == 0
    ckpt = next((tmp_path / "r").glob("*/checkpoints/0000001.pt"))
    assert load_checkpoint(ckpt)["args"]["latent_scale"] == 0.13025
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ckpt), "--vae-path", str(tiny_data["vae"]), *QUICK, "--output", str(tmp_path / "x.png")])
    assert info.value.code == 2 and "normalised with scaling factor 0.13025" in last_error_line(capsys)
    assert sample.main(["--ckpt", str(ckpt), "--vae-path", str(other_vae), *QUICK, "--output", str(tmp_path / "g.png")]) == 0

    features = tmp_path / "features"
    assert extract_features.main(["--data-path", str(tiny_data["images"]), "--features-path", str(features),
                                  "--vae-path", str(other_vae), "--batch-size", "8", "--num-workers", "0",
                                  "--image-size", "256"]) == 0
    meta = json.loads((features / "meta.json").read_text())
    assert meta["scaling_factor"] == 0.13025
    capsys.readouterr()
    assert train.main(["--feature-path", str(features), "--results-dir", str(tmp_path / "f"), *tiny,
                       "--image-size", "256"]) == 2
    assert "normalised with scaling factor 0.13025" in last_error_line(capsys)
    assert not list((tmp_path / "f").glob("*"))
    assert train.main(["--feature-path", str(features), "--vae-path", str(other_vae), "--results-dir",
                       str(tmp_path / "f"), *tiny, "--image-size", "256"]) == 0


def test_flags_that_would_be_ignored_are_refused(tiny_data, tmp_path, capsys):
    ckpt = train_pixel(tiny_data["small_images"], tmp_path / "r", "--num-classes", "2")
    refused = [
        (train.main, ["--data-path", str(tiny_data["small_images"]), "--vae", "none", "--vae-path",
                      str(tiny_data["vae"])], "does not apply to pixel space"),
        (train.main, ["--feature-path", str(tmp_path), "--vae", "none"], "--feature-path holds VAE latents"),
        (train.main, ["--resume", str(ckpt.parents[1]), "--ckpt", str(ckpt)], "--ckpt cannot change on resume"),
        (extract_features.main, ["--convert", str(tmp_path), "--features-path", str(tmp_path / "x"), "--image-size",
                                 "512"], "--image-size does not apply to --convert"),
    ]
    for main, argv, message in refused:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in last_error_line(capsys), argv
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ckpt), "--vae-path", str(tiny_data["vae"]), *QUICK, "--output", str(tmp_path / "g.png")])
    assert info.value.code == 2 and "does not apply: this model works in pixel space" in last_error_line(capsys)
    # --model alone changes the architecture, not the latent space: the error is about the weights.
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(ckpt), "--model", "U-DiT-B", *QUICK, "--output", str(tmp_path / "b.png")])
    assert info.value.code == 2 and "weights are for another architecture" in last_error_line(capsys)


# ----------------------------------------------------------------- advice that works in its state

def test_the_suggested_num_classes_holds_every_class_folder(tmp_path):
    import re
    from conftest import make_image_folder
    from udit.trainer import class_coverage_warning
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=16)
    for image in (data / "class_1").iterdir():
        image.unlink()  # an empty class folder still takes index 1
    train_pixel(data, tmp_path / "a", "--num-classes", "5")
    log = next((tmp_path / "a").glob("*/log.txt")).read_text()
    suggested = re.search(r"pass --num-classes (\d+) for a model of this data", log).group(1)
    assert suggested == "3"  # not 2: three folders need three indices
    train_pixel(data, tmp_path / "b", "--num-classes", suggested)  # the advice works
    note = class_coverage_warning(argparse.Namespace(num_classes=3), [0, 2], class_folders=3)
    assert "pass --num-classes" not in note and "no smaller --num-classes holds it" in note


def test_a_network_flag_changed_on_resume_does_not_promise_the_weights_load(tiny_data, tmp_path, capsys):
    experiment = train_pixel(tiny_data["small_images"], tmp_path / "r", "--num-classes", "2").parents[1]
    with pytest.raises(SystemExit):
        parse_training_args(training_parser("test"), ["--resume", str(experiment), "--num-classes", "3"])
    line = last_error_line(capsys)
    assert "--num-classes cannot change on resume" in line
    assert "starts it from these weights if the network keeps every tensor's shape" in line


@pytest.mark.parametrize("kwargs, message", [
    ({"learn_sigma": "false"}, "'learn_sigma' of U-DiT-S must be true or false (JSON), got \"false\""),
    ({"learn_sigma": 0}, "must be true or false"),
    ({"hidden_size": "16"}, "'hidden_size' of U-DiT-S must be a number or a list of numbers"),
    ({"attn_type": 2}, "'attn_type' of U-DiT-S must be a string"),
])
def test_model_keywords_of_the_wrong_json_type_are_refused_in_one_line(tiny_data, capsys, kwargs, message):
    # "learn_sigma": "false" is a truthy string: learned variance stayed on and training exited 0.
    with pytest.raises(SystemExit) as info:
        parse_training_args(training_parser("train"), ["--data-path", str(tiny_data["small_images"]), "--model",
                                                       "U-DiT-S", "--model-kwargs", json.dumps(kwargs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "--model-kwargs: model keyword" in err[-1] and message in err[-1]
