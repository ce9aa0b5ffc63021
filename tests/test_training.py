"""train.py, train_accelerate.py and extract_features.py on tiny data, as users launch them."""

import json
import sys

import numpy as np
import pytest
import torch

import train
from conftest import TINY_UDIT_KWARGS, launch_two_nodes, run_script, script_env, torchrun
from test_alignment import make_tiny_encoder

COMMON = ["--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS, "--num-classes", "2",
          "--global-batch-size", "4", "--log-every", "2", "--num-workers", "0", "--sample-steps", "2"]


def checkpoints(results):
    return sorted(results.glob("*/checkpoints/*.pt"))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_torchrun_two_processes_images_with_vae(tiny_data, tmp_path):
    out = torchrun("train.py", "--data-path", tiny_data["images"], "--vae-path", tiny_data["vae"],
                   "--image-size", "64", "--max-steps", "4", "--ckpt-every", "2", "--results-dir", tmp_path, *COMMON)
    assert "2 processes x batch 2" in out and "Train Loss" in out
    assert [p.name for p in checkpoints(tmp_path)] == ["0000002.pt", "0000004.pt"]
    ckpt = load(checkpoints(tmp_path)[-1])
    assert {"model", "ema", "opt", "step", "epoch", "position", "rng", "args"} <= set(ckpt)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    args = ckpt["args"]
    assert (args["model"], args["image_size"], args["num_classes"], args["vae"], args["latent_size"]) == \
        ("U-DiT-S", 64, 2, "ema", 8)
    assert args["model_kwargs"] == json.loads(TINY_UDIT_KWARGS)
    log = (checkpoints(tmp_path)[-1].parents[1] / "log.txt").read_text()
    assert "(step=0000004) Train Loss" in log


def test_torchrun_pixel_space(tiny_data, tmp_path):
    out = torchrun("train.py", "--data-path", tiny_data["small_images"], "--vae", "none", "--image-size", "16",
                   "--max-steps", "2", "--results-dir", tmp_path, *COMMON)
    ckpt = load(checkpoints(tmp_path)[-1])
    assert ckpt["args"]["in_channels"] == 3 and ckpt["model"]["x_embedder.proj.weight"].shape[1] == 3
    assert "Train Loss" in out


def test_posthoc_snapshots_with_one_and_two_processes(tiny_data, tmp_path):
    """Rank 0 alone writes them: the same files, each the EMA state its run's checkpoint holds (fp16)."""
    runs = {}
    for nproc in (1, 2):
        torchrun("train.py", "--data-path", tiny_data["small_images"], "--vae", "none", "--image-size", "16",
                 "--max-steps", "4", "--posthoc-ema", "0.05", "0.1", "--posthoc-every", "2",
                 "--results-dir", tmp_path / str(nproc), *COMMON, nproc=nproc)
        (run,) = (tmp_path / str(nproc)).iterdir()
        runs[nproc] = run
        assert len(load(checkpoints(tmp_path / str(nproc))[-1])["rng"]) == nproc
    names = [sorted(p.name for p in (run / "posthoc").iterdir()) for run in runs.values()]
    assert names[0] == names[1] == ["0000002_sigma0.05.pt", "0000002_sigma0.1.pt", "0000004_sigma0.05.pt",
                                    "0000004_sigma0.1.pt"]  # no temporary files, no second writer
    for run in runs.values():
        tracked = load(run / "checkpoints" / "0000004.pt")["posthoc_ema"]
        for state in tracked:
            snapshot = load(run / "posthoc" / f"0000004_sigma{state['sigma_rel']:g}.pt")
            assert (snapshot["step"], snapshot["sigma_rel"]) == (4, state["sigma_rel"])
            for key, value in state["ema"].items():
                assert torch.equal(snapshot["ema"][key], value.half()), key


def write_public_features(root, layout, count=10, size=32):
    rng = np.random.default_rng(0)
    feats, labels = root / "imagenet256_features", root / "imagenet256_labels"
    feats.mkdir(parents=True)
    labels.mkdir()
    for i in range(count):
        name = f"{i}.npy" if layout == "fast-DiT" else f"{i // 2}_{i % 2}.npy"
        np.save(feats / name, rng.normal(size=(1, 4, size, size)).astype(np.float32))
        np.save(labels / name, np.array([i % 2]))
    return root


@pytest.mark.parametrize("layout", ["fast-DiT", "U-DiT", "compact"])
def test_torchrun_two_processes_each_feature_layout(tiny_data, tmp_path, layout):
    repa = []
    if layout == "compact":  # with images, trained with alignment: the superset of the plain compact path
        features = tmp_path / "features"
        torchrun("extract_features.py", "--data-path", tiny_data["images"], "--features-path", features,
                 "--vae-path", tiny_data["vae"], "--batch-size", "3", "--num-workers", "0", "--keep-images")
        meta = json.loads((features / "meta.json").read_text())
        assert meta["complete"] and meta["count"] == 16 and meta["flips"] == 2 and meta["images"]
        repa = ["--repa", "--encoder", make_tiny_encoder(tmp_path / "encoder.pt"), "--projector-width", "32"]
    else:
        features = write_public_features(tmp_path / "features", layout)
    results = tmp_path / "results"
    out = torchrun("train.py", "--feature-path", features, "--max-steps", "2", "--results-dir", results, *COMMON,
                   *repa)
    expected = {"fast-DiT": 10, "U-DiT": 10, "compact": 16}[layout]  # U-DiT: 10 distinct files, no padding
    assert f"{expected} samples" in out
    ckpt = load(checkpoints(results)[-1])
    assert ckpt["args"]["in_channels"] == 4 and ("aligner" in ckpt) == bool(repa)
    if repa:  # 2 processes with alignment, resumed halfway: bitwise the straight run
        torchrun("train.py", "--resume", next(results.iterdir()), "--max-steps", "4")
        torchrun("train.py", "--feature-path", features, "--max-steps", "4", "--results-dir", tmp_path / "straight",
                 *COMMON, *repa)
        resumed, straight = load(checkpoints(results)[-1]), load(checkpoints(tmp_path / "straight")[-1])
        assert resumed["step"] == straight["step"] == 4
        for key in ("model", "ema", "aligner"):
            for name, value in straight[key].items():
                assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs after resume"


@pytest.mark.parametrize("alignment", [False, True], ids=["plain", "u-repa"])
def test_resume_is_bitwise_exact(tiny_data, tmp_path, alignment):
    args = ["--data-path", str(tiny_data["images"]), "--vae-path", str(tiny_data["vae"]), "--image-size", "64",
            "--ckpt-every", "100", *COMMON]
    if alignment:  # the 2x2 latent stage, projected and upsampled to the encoder's 4x4 grid
        args += ["--repa", "--encoder", str(make_tiny_encoder(tmp_path / "encoder.pt")), "--projector-width", "32"]
    assert train.main([*args, "--max-steps", "6", "--results-dir", str(tmp_path / "a")]) == 0
    assert train.main([*args, "--max-steps", "3", "--results-dir", str(tmp_path / "b")]) == 0
    interrupted = next((tmp_path / "b").iterdir())
    assert train.main(["--resume", str(interrupted), "--max-steps", "6"]) == 0
    full, resumed = load(checkpoints(tmp_path / "a")[-1]), load(checkpoints(tmp_path / "b")[-1])
    assert resumed["step"] == full["step"] == 6
    for key in ("model", "ema", *(["aligner"] if alignment else [])):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs after resume"


def test_resume_accepts_the_vae_moved_and_refuses_other_vae_weights(tiny_data, tmp_path, capsys):
    """--vae-path may change on resume (another machine); the weights behind it may not (they make the latents)."""
    import shutil
    from diffusers.models import AutoencoderKL
    moved = shutil.copytree(tiny_data["vae"], tmp_path / "vae")
    args = ["--data-path", str(tiny_data["images"]), "--image-size", "64", "--ckpt-every", "100", *COMMON]
    assert train.main([*args, "--vae-path", str(tiny_data["vae"]), "--max-steps", "1",
                       "--results-dir", str(tmp_path / "r")]) == 0
    (run,) = (tmp_path / "r").iterdir()
    assert train.main(["--resume", str(run), "--vae-path", str(moved), "--max-steps", "2"]) == 0
    vae = AutoencoderKL.from_pretrained(moved)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.01)  # another VAE with the same config: silently other latents before
    vae.save_pretrained(moved)
    assert train.main(["--resume", str(run), "--vae-path", str(moved), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--vae-path {moved}: not the weights this experiment was trained with" in err[-1], err
    assert [p.name for p in checkpoints(tmp_path / "r")] == ["0000001.pt", "0000002.pt"]  # step 3 never ran


def test_two_nodes_on_localhost_use_local_rank(tiny_data, tmp_path):
    import os
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
               "train.py", "--data-path", str(tiny_data["images"]), "--vae-path", str(tiny_data["vae"]),
               "--image-size", "64", "--max-steps", "2", "--results-dir", str(tmp_path), *COMMON]
        procs.append(subprocess.Popen(cmd, cwd=os.path.dirname(train.__file__), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=script_env()))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "2 processes x batch 2" in outs[0]
    # One process per node: global ranks 0 and 1, each with local rank 0.
    assert "[rank 0/2] local rank 0" in outs[0] and "[rank 1/2] local rank 0" in outs[1]
    assert len(load(checkpoints(tmp_path)[-1])["rng"]) == 2


@pytest.mark.parametrize("node1", ["older copy", "missing"])
def test_resuming_from_an_experiment_folder_the_nodes_do_not_share_is_refused(tiny_data, tmp_path, node1):
    import shutil
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    args = ["--data-path", tiny_data["small_images"], "--vae", "none", "--image-size", "16", *COMMON]
    assert train.main([*map(str, args), "--max-steps", "2", "--results-dir", str(nodes[0] / "results")]) == 0
    if node1 == "older copy":  # an older experiment on a local disk: resuming would load another checkpoint there
        shutil.copytree(nodes[0], nodes[1])
        expected = ["--resume results/000-U-DiT-S is not one folder shared by every process: rank 1 on"] * 2
    else:  # node 1 fails while parsing (no such folder there); it used to leave node 0 in init_process_group
        nodes[1].mkdir()
        expected = ["the command line was refused by rank 1 on", "--resume results/000-U-DiT-S: no such"]
    results = launch_two_nodes("train.py", ["--resume", "results/000-U-DiT-S", "--max-steps", "4"], nodes,
                               timeout=120)
    for (status, out), what in zip(results, expected):
        errors = [line for line in out.splitlines() if "train.py: error:" in line]
        assert status != 0 and len(errors) == 1 and what in errors[0], out
    assert [p.name for p in checkpoints(nodes[0] / "results")] == ["0000002.pt"]  # nothing trained


def test_accelerate_launch_two_cpu_processes(tiny_data, tmp_path):
    out = run_script([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                      "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                      "train_accelerate.py", "--data-path", tiny_data["images"], "--vae-path", tiny_data["vae"],
                      "--image-size", "64", "--max-steps", "2", "--posthoc-ema", "0.1", "--posthoc-every", "2",
                      "--results-dir", tmp_path, *COMMON])
    assert "2 processes x batch 2" in out
    ckpt = load(checkpoints(tmp_path)[-1])
    assert ckpt["step"] == 2 and ckpt["args"]["precision"] == "bf16"
    (snapshot,) = tmp_path.glob("*/posthoc/*.pt")  # train_accelerate.py keeps the post-hoc EMAs too
    assert snapshot.name == "0000002_sigma0.1.pt" and ckpt["posthoc_ema"][0]["step"] == 2


# ----------------------------------------------------------------- bad inputs

def test_missing_and_empty_data_paths_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--data-path", str(tmp_path / "absent"), *COMMON])
    assert info.value.code == 2 and "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train.main(["--data-path", str(tmp_path / "empty"), "--results-dir", str(tmp_path / "r"), *COMMON]) == 2
    assert "no images found" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "U-DiT-XXL"], "invalid choice"),
    (["--model-kwargs", "{depth: 2}"], "not valid JSON"),
    (["--model-kwargs", "[1, 2]"], "must be a JSON object"),
    (["--global-batch-size", "0"], "must be an integer >= 1"),
    ([], "give --data-path"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and message in err[-1]


def test_image_size_the_model_cannot_divide(tiny_data, tmp_path, capsys):
    code = train.main(["--data-path", str(tiny_data["small_images"]), "--vae", "none", "--image-size", "12",
                       "--results-dir", str(tmp_path), *COMMON])
    assert code == 2 and "input size 12" in capsys.readouterr().err


def test_unreadable_image_is_skipped_and_counted(tiny_data, tmp_path):
    import shutil
    folder = tmp_path / "images"
    shutil.copytree(tiny_data["small_images"], folder)
    for path in list((folder / "class_0").iterdir())[:4]:
        path.write_bytes(b"this is not a png")
    assert train.main(["--data-path", str(folder), "--vae", "none", "--image-size", "16", "--max-steps", "4",
                       "--results-dir", str(tmp_path / "r"), *COMMON]) == 0
    log = next((tmp_path / "r").glob("*/log.txt")).read_text()
    assert "skipped images:" in log


def test_unknown_feature_layout(tmp_path, capsys):
    (tmp_path / "features" / "stuff").mkdir(parents=True)
    assert train.main(["--feature-path", str(tmp_path / "features"), "--results-dir", str(tmp_path / "r"), *COMMON]) == 2
    assert "unknown layout" in capsys.readouterr().err


def test_checkpoint_of_another_architecture_names_keys(tiny_data, tmp_path, capsys):
    assert train.main(["--data-path", str(tiny_data["small_images"]), "--vae", "none", "--image-size", "16",
                       "--max-steps", "1", "--results-dir", str(tmp_path / "a"), *COMMON]) == 0
    ckpt = checkpoints(tmp_path / "a")[-1]
    code = train.main(["--data-path", str(tiny_data["small_images"]), "--vae", "none", "--image-size", "16",
                       "--max-steps", "1", "--results-dir", str(tmp_path / "b"), "--ckpt", str(ckpt),
                       *COMMON[:2], "--model-kwargs", '{"hidden_size": 16, "num_heads": 2, "depth": [1, 2, 1, 1, 1]}',
                       *COMMON[4:]])
    err = capsys.readouterr().err
    assert code == 2 and "another architecture" in err and "missing (encoder_level_2.1." in err


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, capsys):
    from udit.data import ResumableDistributedSampler, open_feature_folder
    features = write_public_features(tmp_path / "features", "fast-DiT", count=8)
    common = ["--feature-path", str(features), "--results-dir", str(tmp_path / "r"), "--ckpt-every", "1", *COMMON]
    assert train.main([*common, "--max-steps", "1"]) == 0
    # One bad image, drawn first in step 2 (epoch 0's second batch of 4; --global-seed 0).
    first_of_step_2 = list(ResumableDistributedSampler(8, 0, 1, seed=0))[4]
    np.save(open_feature_folder(features).feature_files[first_of_step_2], np.full((1, 4, 32, 32), np.nan, np.float32))
    run = next((tmp_path / "r").iterdir())
    assert train.main(["--resume", str(run), "--max-steps", "3"]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 2" in err
    # Checkpoint 1 holds the weights step 2 was computed from: resuming replays it, so a lower --lr cannot help.
    assert f"the last checkpoint {run / 'checkpoints' / '0000001.pt'} holds the weights that gave this loss, so " \
           f"resuming replays it whatever the --lr: resume with --skip-nonfinite if only some batches are bad " \
           f"(--resume {run})" in err
    assert [p.name for p in checkpoints(tmp_path / "r")] == ["0000001.pt"]
    assert all(torch.isfinite(v).all() for v in load(checkpoints(tmp_path / "r")[0])["model"].values())
    assert train.main(["--resume", str(run), "--max-steps", "4", "--skip-nonfinite"]) == 0  # the advice works


def nan_features(folder, bad):
    """Public fast-DiT features of 8 images, the first `bad` of them NaN (2 batches of 4 per epoch)."""
    features = write_public_features(folder, "fast-DiT", count=8)
    for f in sorted((features / "imagenet256_features").iterdir())[:bad]:
        np.save(f, np.full((1, 4, 32, 32), np.nan, dtype=np.float32))
    return features


def test_divergence_before_the_first_checkpoint_does_not_advise_resuming(tmp_path, capsys):
    common = ["--feature-path", str(nan_features(tmp_path / "features", bad=1)), "--results-dir",
              str(tmp_path / "r"), "--precision", "bf16", *COMMON]
    assert train.main([*common, "--max-steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step" in err and "intact" not in err and "--resume" not in err
    assert "no checkpoint was written yet, so there is nothing to resume: start the run again with a lower --lr " \
           "or with --skip-nonfinite" in err
    assert train.main([*common, "--max-steps", "4", "--skip-nonfinite"]) == 0  # the advice works


def test_skip_nonfinite_counts_and_continues(tmp_path):
    assert train.main(["--feature-path", str(nan_features(tmp_path / "features", bad=1)), "--results-dir",
                       str(tmp_path / "r"), "--max-steps", "4", "--skip-nonfinite", *COMMON]) == 0
    log = next((tmp_path / "r").glob("*/log.txt")).read_text()
    assert "non-finite loss, step skipped (2 so far)" in log  # one bad batch per epoch


def test_skip_nonfinite_stops_when_nothing_trains(tmp_path, capsys):
    common = ["--feature-path", str(nan_features(tmp_path / "features", bad=8)), "--results-dir",
              str(tmp_path / "r"), "--skip-nonfinite", *COMMON]
    # It used to skip every step and exit 0 ("done").
    assert train.main([*common, "--max-steps", "2"]) == 1
    assert "every one of the 2 steps of this run had a non-finite loss: nothing was trained" in capsys.readouterr().err
    assert train.main([*common, "--max-steps", "12"]) == 1
    assert "10 non-finite losses in a row (steps 1-10): the weights have diverged" in capsys.readouterr().err


def test_divergence_advice_never_offers_a_checkpoint_that_gave_the_non_finite_loss(tmp_path):
    from udit.trainer import recovery_advice
    (tmp_path / "checkpoints").mkdir()
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    assert "0000002.pt is intact" in recovery_advice(tmp_path, "with a lower --lr", bad_from=3)
    # The loss of step 3 was computed from the weights of checkpoint 2: resuming there replays it.
    replay = recovery_advice(tmp_path, "with a lower --lr or with --skip-nonfinite", bad_from=2)
    assert "0000002.pt holds the weights that gave this loss" in replay and "resume with --skip-nonfinite" in replay
    assert "--resume" not in recovery_advice(tmp_path, "with a lower --lr", bad_from=2, skipping=True)


def test_time_budget_stops_with_a_checkpoint(tiny_data, tmp_path):
    assert train.main(["--data-path", str(tiny_data["small_images"]), "--vae", "none", "--image-size", "16",
                       "--max-steps", "1000", "--max-minutes", "0.0001", "--ckpt-every", "1000",
                       "--results-dir", str(tmp_path), *COMMON]) == 0
    (ckpt,) = checkpoints(tmp_path)
    assert 1 <= load(ckpt)["step"] < 1000


def test_convert_a_public_feature_folder(tmp_path):
    import extract_features
    public = write_public_features(tmp_path / "public", "U-DiT", count=6)
    assert extract_features.main(["--convert", str(public), "--features-path", str(tmp_path / "ours"),
                                  "--num-workers", "0"]) == 0
    features = np.load(tmp_path / "ours" / "features.npy")
    assert features.shape == (6, 1, 2, 4, 32, 32) and not features[:, :, 1].any()  # std 0: the stored sample
    first = np.load(public / "imagenet256_features" / "0_0.npy")[0]
    assert np.allclose(features[0, 0, 0], first, atol=1e-2)  # float16
    assert json.loads((tmp_path / "ours" / "meta.json").read_text())["complete"]


def test_grad_checkpointing_gives_the_same_gradients():
    from conftest import tiny_udit
    grads = []
    for flag in (False, True):
        model = tiny_udit().train()
        for e in model.label_embedders():
            e.dropout_prob = 0.0
        model.grad_checkpointing = flag
        x, t, y = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700]), torch.tensor([1, 2])
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
