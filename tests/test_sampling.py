"""sample.py, sample_ddp.py, download.py and udit/releases.py: the .npz contract, determinism, resume, safety."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import download
import sample
import sample_ddp
import train
import udit.hub
import udit.releases as releases
from conftest import ROOT, TINY_UDIT_KWARGS, launch_two_nodes, randomize, run_script, script_env, torchrun
from udit.checkpoint import CheckpointError, build_model, load_checkpoint
from udit.sampling import labels_for, read_protocol, write_npz_streaming


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A train.py checkpoint of a tiny U-DiT on 64 px images with the tiny VAE."""
    results = tmp_path_factory.mktemp("results")
    assert train.main(["--data-path", str(tiny_data["images"]), "--vae-path", str(tiny_data["vae"]),
                       "--image-size", "64", "--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS,
                       "--num-classes", "2", "--global-batch-size", "4", "--max-steps", "2", "--num-workers", "0",
                       "--sample-steps", "2", "--results-dir", str(results)]) == 0
    return {"ckpt": next(results.glob("*/checkpoints/0000002.pt")), "vae": tiny_data["vae"]}


def ddp_args(trained, sample_dir, n=5, batch=2, steps=4):
    return ["--ckpt", trained["ckpt"], "--vae-path", trained["vae"], "--num-sampling-steps", str(steps),
            "--num-fid-samples", str(n), "--per-proc-batch-size", str(batch), "--sample-dir", sample_dir]


def only_npz(folder):
    (npz,) = list(folder.glob("*.npz"))
    return npz


def test_npz_contract(trained, tmp_path):
    assert sample_ddp.main([str(a) for a in ddp_args(trained, tmp_path)]) == 0
    npz = only_npz(tmp_path)
    assert "U-DiT-S-0000002-size-64-vae-ema-cfg-1.5-ddpm4-seed-0" in npz.name
    with np.load(npz, allow_pickle=False) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 64, 64, 3)
        assert data["arr_1"].shape == (5,) and set(data["arr_1"]) <= {0, 1}
        pngs = sorted(npz.with_name(npz.name[:-4]).glob("*.png"))
        assert len(pngs) == 5
        assert np.array_equal(np.asarray(Image.open(pngs[3])), data["arr_0"][3])
        card = json.loads(data["protocol.json"])
    assert card == read_protocol(npz)
    sidecar = json.loads(npz.with_suffix(".json").read_text())
    assert {**card, "npz": npz.name} == sidecar
    assert (card["sampler"], card["steps"], card["nfe_per_image"], card["cfg_scale"]) == ("ddpm", 4, 8, 1.5)
    assert (card["weights"], card["labels"], card["num_samples"], card["global_seed"]) == ("ema", "random", 5, 0)
    assert len(card["checkpoint_sha256"]) == 64 and card["vae"]


def test_killed_run_resumes_to_the_identical_npz(trained, tmp_path):
    args = [str(a) for a in ddp_args(trained, tmp_path / "killed", n=12, batch=2, steps=40)]
    proc = subprocess.Popen([sys.executable, "sample_ddp.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=script_env())
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed").glob("*/*.png"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((tmp_path / "killed").glob("*/*.png")))
    assert 4 <= written < 12, "the kill did not land midway"
    assert not list((tmp_path / "killed").glob("*.npz"))
    out = run_script([sys.executable, "sample_ddp.py", *args])
    assert f"({written} already there)" in out
    run_script([sys.executable, "sample_ddp.py", *[str(a) for a in ddp_args(trained, tmp_path / "clean", n=12,
                                                                             batch=2, steps=40)]])
    assert only_npz(tmp_path / "killed").read_bytes() == only_npz(tmp_path / "clean").read_bytes()


def test_sample_grid_settings_from_checkpoint_and_ddim_determinism(trained, tmp_path):
    common = ["--ckpt", str(trained["ckpt"]), "--vae-path", str(trained["vae"]), "--num-sampling-steps", "3",
              "--sampler", "ddim", "--class-labels", "0", "1", "1", "--nrow", "2"]
    assert sample.main([*common, "--output", str(tmp_path / "a.png"), "--save-individual", str(tmp_path / "ind")]) == 0
    assert sample.main([*common, "--output", str(tmp_path / "b.png"), "--seed", "0"]) == 0
    grid = Image.open(tmp_path / "a.png")
    assert grid.size == (2 * 66 + 2, 2 * 66 + 2)  # 2 per row, 2 rows of 64 px with 2 px padding
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(tmp_path / "b.png")))
    assert sorted(p.name for p in (tmp_path / "ind").iterdir()) == ["000_0.png", "001_1.png", "002_1.png"]


def test_guidance_on_all_channels_differs(trained, tmp_path):
    # Random weights: after two training steps the zero-initialised model barely sees its label.
    ckpt = load_checkpoint(trained["ckpt"])
    model = build_model(ckpt["args"])
    randomize(model)
    ckpt["ema"] = model.state_dict()
    torch.save(ckpt, tmp_path / "random.pt")
    common = ["--ckpt", str(tmp_path / "random.pt"), "--vae-path", str(trained["vae"]), "--num-sampling-steps", "2",
              "--class-labels", "0", "--cfg-scale", "4"]
    assert sample.main([*common, "--output", str(tmp_path / "three.png")]) == 0
    assert sample.main([*common, "--output", str(tmp_path / "all.png"), "--cfg-channels", "all"]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "three.png")), np.asarray(Image.open(tmp_path / "all.png")))


@pytest.mark.parametrize("flags, message", [
    (["--cfg-scale", "0.5"], "--cfg-scale: must be a number >= 1, got 0.5"),
    (["--cfg-scale", "nan"], "--cfg-scale: must be a finite number, got nan"),
    (["--cfg-scale", "inf"], "--cfg-scale: must be a finite number, got inf"),
    (["--sampler", "flow-sde", "--time-shift", "inf"], "--time-shift: must be a finite number, got inf"),
    (["--model", "U-DiT-XXL"], "invalid choice"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps: must be an integer >= 1, got 0"),
    (["--num-sampling-steps", "1001"], "must be in 1..1000"),
])
def test_bad_sampling_flags_exit_2(trained, flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(trained["ckpt"]), *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_missing_checkpoint_and_wrong_labels_exit_2(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        sample_ddp.main(["--ckpt", str(tmp_path / "nothing.pt")])
    assert info.value.code == 2 and "neither a file nor a released checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(trained["ckpt"]), "--vae-path", str(trained["vae"]), "--class-labels", "5"])
    assert info.value.code == 2 and "outside 0..1" in capsys.readouterr().err


def test_checkpoint_for_another_architecture_is_named(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(trained["ckpt"]), "--vae-path", str(trained["vae"]), "--model", "DiT-S/2"])
    assert info.value.code == 2 and "another architecture" in capsys.readouterr().err


# ----------------------------------------------------------------- safety and downloads

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        releases.find_model(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_truncated_checkpoint_is_named(trained, tmp_path):
    data = trained["ckpt"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_find_model_prefers_ema_and_reads_plain_and_safetensors(trained, tmp_path):
    from safetensors.torch import save_file
    ckpt = load_checkpoint(trained["ckpt"])
    assert releases.find_model(str(trained["ckpt"])).keys() == ckpt["ema"].keys()
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in releases.find_model(str(trained["ckpt"])).items())
    torch.save(ckpt["model"], tmp_path / "plain.pt")
    assert torch.equal(releases.find_model(str(tmp_path / "plain.pt"))["output.bias"], ckpt["model"]["output.bias"])
    save_file({k: v.contiguous() for k, v in ckpt["model"].items()}, tmp_path / "w.safetensors")
    assert torch.equal(releases.find_model(str(tmp_path / "w.safetensors"))["output.bias"], ckpt["model"]["output.bias"])


def test_release_files_are_discovered_by_model_and_iterations():
    files = ["README.md", "U-DiT-S-400k.pt", "U-DiT-B-400k.pt", "U-DiT-B-1M.pt", "U-DiT-L-400K.pt", "U-DiT-L-1000k.pt"]
    assert releases.match_release("U-DiT-B-400K", files) == "U-DiT-B-400k.pt"
    assert releases.match_release("U-DiT-L-1M", files) == "U-DiT-L-1000k.pt"
    with pytest.raises(releases.DownloadError, match="no file in yuchuantian/U-DiT matches U-DiT-B-1M.*README.md"):
        releases.match_release("U-DiT-B-1M", ["README.md"])


def test_offline_download_errors_say_what_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(udit.hub.urllib.request, "urlopen", offline)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(releases.DownloadError) as info:
        releases.find_model("DiT-XL-2-256x256.pt")
    message = str(info.value)
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in message
    assert str(tmp_path / "checkpoints" / "DiT-XL-2-256x256.pt") in message
    with pytest.raises(releases.DownloadError) as info:
        releases.find_model("U-DiT-B-400K")
    message = str(info.value)
    assert "huggingface.co/yuchuantian/U-DiT" in message and "U-DiT-B file at 400,000 iterations" in message
    assert str(tmp_path / "checkpoints" / "U-DiT-B-400K.pt") in message
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_a_release_put_in_the_cache_by_hand_is_used_offline(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save(load_checkpoint(trained["ckpt"])["ema"], tmp_path / "checkpoints" / "U-DiT-S-400K.pt")
    assert "output.bias" in releases.find_model("U-DiT-S-400K")


@pytest.fixture
def fake_network(tmp_path, monkeypatch):
    """The cache in tmp_path and a network that serves every release as a small complete checkpoint.

    The hub's download, like the real one with local_dir, keeps a file that is already
    there, whole or not; the log lists what was fetched.
    """
    import huggingface_hub
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path / "cache"))
    fetched = []

    def fetch_url(url, target):
        fetched.append(url)
        torch.save({"w": torch.arange(3.0)}, target)
    monkeypatch.setattr(releases, "download_url", fetch_url)
    monkeypatch.setattr(releases, "list_repo_files", lambda: ["README.md", "U-DiT-S-400k.pt"])

    def hf_hub_download(repo, filename, local_dir):
        path = Path(local_dir) / filename
        if not path.exists():
            fetched.append(filename)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"w": torch.arange(3.0)}, path)
        return str(path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return fetched


def test_a_dangling_cache_link_is_fetched_again(fake_network, tmp_path):
    entry = releases.cached_path("U-DiT-S-400K")
    entry.parent.mkdir(parents=True)
    entry.symlink_to(tmp_path / "cleaned" / "U-DiT-S-400k.pt")  # the hub folder was cleaned
    assert torch.equal(releases.find_model("U-DiT-S-400K")["w"], torch.arange(3.0))
    assert fake_network == ["U-DiT-S-400k.pt"] and entry.resolve().is_file()


def test_offline_a_dangling_cache_link_is_removed_so_the_advice_works(fake_network, tmp_path, monkeypatch):
    def offline(name, target):
        raise OSError("network is unreachable")
    monkeypatch.setattr(releases, "_fetch_udit", offline)
    entry = releases.cached_path("U-DiT-S-400K")
    entry.parent.mkdir(parents=True)
    entry.symlink_to(tmp_path / "cleaned" / "U-DiT-S-400k.pt")
    with pytest.raises(releases.DownloadError, match=f"put it at {entry}"):
        releases.download("U-DiT-S-400K")
    assert not entry.is_symlink()  # "put it at" that path: cp refuses to write through a dangling link
    torch.save({"w": torch.arange(3.0)}, entry)  # following the advice
    assert torch.equal(releases.find_model("U-DiT-S-400K")["w"], torch.arange(3.0))


@pytest.mark.parametrize("name", ["U-DiT-S-400K", "DiT-XL-2-256x256.pt"])
def test_a_truncated_cache_entry_is_fetched_again(fake_network, tmp_path, name):
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.arange(3.0)}, whole)
    entry = releases.cached_path(name)
    entry.parent.mkdir(parents=True)
    if name.startswith("U-DiT"):  # our link points at the hub's copy, which was cut short
        (entry.parent / "U-DiT").mkdir()
        (entry.parent / "U-DiT" / "U-DiT-S-400k.pt").write_bytes(whole.read_bytes()[:-100])
        entry.symlink_to(entry.parent / "U-DiT" / "U-DiT-S-400k.pt")
    else:
        entry.write_bytes(whole.read_bytes()[:-100])
    assert torch.equal(releases.find_model(name)["w"], torch.arange(3.0))
    assert len(fake_network) == 1


def test_complete_checkpoints_are_recognised(trained, tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    (tmp_path / "page.pt").write_text("<html>rate limited</html>")
    assert releases.is_complete_checkpoint(trained["ckpt"]) and releases.is_complete_checkpoint(tmp_path / "w.safetensors")
    assert not any(releases.is_complete_checkpoint(tmp_path / f) for f in ("cut.safetensors", "page.pt", "absent.pt"))


def test_download_list_works_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(download, "list_repo_files", lambda: (_ for _ in ()).throw(releases.DownloadError("offline")))
    assert download.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "U-DiT-L-1M" in out and "not downloaded" in out and "cannot be listed offline" in out


def test_a_sample_folder_missing_on_one_node_is_refused_on_every_node(trained, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    # A relative --sample-dir: each "node" has its own; node 1 lacks the folder rank 0 creates.
    for status, out in launch_two_nodes("sample_ddp.py", ddp_args(trained, "samples", n=2, batch=1, steps=2), nodes):
        errors = [line for line in out.splitlines() if "sample_ddp.py: error:" in line]
        assert status != 0 and len(errors) == 1, out
        assert "is not one folder shared by every process: rank 1 on" in errors[0], out
        assert "(no such folder there)" in errors[0] and "Errno 2" not in out and "gloo" not in out.lower()
    assert not list(nodes[0].glob("samples/*/*.png"))  # refused before sampling


def test_a_sample_folder_rank_0_refuses_stops_every_process_with_one_line(trained, tmp_path):
    assert sample_ddp.main([str(a) for a in ddp_args(trained, tmp_path, n=1, batch=1, steps=2)]) == 0
    (manifest,) = tmp_path.glob("*/manifest.json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "global_seed": 7}))
    out = torchrun("sample_ddp.py", *ddp_args(trained, tmp_path, n=1, batch=1, steps=2), expect=1)
    errors = [line for line in out.splitlines() if "sample_ddp.py: error:" in line]
    assert len(errors) == 2 and all("holds images made with other settings (global_seed: 7 there" in e for e in errors)
    assert any("rank 0 failed to prepare --sample-dir" in e for e in errors) and "gloo" not in out.lower(), out


def test_streamed_npz_loads_like_savez(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    write_npz_streaming(tmp_path / "s.npz", 3, (4, 5, 3), iter(images), [1, 2, 3])
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        assert np.array_equal(data["arr_0"], images) and data["arr_1"].tolist() == [1, 2, 3]


def test_vae_offline_error_says_what_to_fetch(tmp_path, monkeypatch):
    from udit.vae import VAEUnavailable, load_vae
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(VAEUnavailable) as info:
        load_vae("mse")
    message = str(info.value)
    assert "https://huggingface.co/stabilityai/sd-vae-ft-mse" in message and "--vae-path" in message
    with pytest.raises(VAEUnavailable, match="not a diffusers VAE folder"):
        load_vae("ema", tmp_path)


# ----------------------------------------------------------------- solvers and guidance in the scripts

@pytest.fixture(scope="module")
def random_ckpt(trained, tmp_path_factory):
    """The trained checkpoint with random weights: a guide that differs from the main model."""
    ckpt = load_checkpoint(trained["ckpt"])
    ckpt["ema"] = randomize(build_model(ckpt["args"]), seed=3).state_dict()
    path = tmp_path_factory.mktemp("guide") / "guide.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("flags", [
    [],  # DDPM, the paper's protocol
    ["--sampler", "unipc", "--cfg-interval", "0.5", "10"],  # an ODE solver with the guidance interval
    ["--sampler", "dpm++2m-sde", "--guide-ckpt", "GUIDE"],  # an SDE solver, autoguided
    ["--labels", "balanced", "--num-fid-samples", "6"],  # 3 images of each of the 2 classes
])
def test_one_and_two_processes_and_a_resumed_run_give_one_npz(trained, random_ckpt, tmp_path, flags):
    args = [*ddp_args(trained, tmp_path / "one", n=5, batch=2, steps=4),
            *[str(random_ckpt) if f == "GUIDE" else f for f in flags]]
    run_script([sys.executable, "sample_ddp.py", *args])
    two = [str(tmp_path / "two") if a == tmp_path / "one" else a for a in args]
    out = torchrun("sample_ddp.py", *two)
    npz = only_npz(tmp_path / "one")
    assert npz.read_bytes() == only_npz(tmp_path / "two").read_bytes()
    info = json.loads(npz.with_suffix(".json").read_text())
    sampler = flags[1] if flags[:1] == ["--sampler"] else "ddpm"
    assert (info["sampler"], info["steps"], info["cfg_scale"]) == (sampler, 4, 1.5)
    assert f"{info['nfe_per_image']} network evaluations per image" in out
    if "--guide-ckpt" in flags:  # 4 main and 4 guide evaluations
        assert (info["nfe_per_image"], info["nfe_main_per_image"], info["nfe_guide_per_image"]) == (8, 4, 4)
    elif "--labels" in flags:
        with np.load(npz) as data:
            assert np.bincount(data["arr_1"]).tolist() == [3, 3]
            assert np.array_equal(data["arr_1"], labels_for(6, 0, [0, 1], "balanced"))
        assert (info["labels"], info["num_fid_samples"]) == ("balanced", 6)
    elif "--cfg-interval" in flags:  # some steps outside the interval: no unconditional pass
        assert 4 < info["nfe_per_image"] < 8 and info["cfg_interval"] == [0.5, 10.0]
    else:
        assert (info["nfe_per_image"], info["cfg_channels"]) == (8, 3)
    # Resume: a rerun after losing the .npz and some images redraws exactly those.
    folder = only_npz(tmp_path / "two").with_suffix("")
    for png in sorted(folder.glob("*.png"))[1::2]:
        png.unlink()
    only_npz(tmp_path / "two").unlink()
    assert "(3 already there)" in run_script([sys.executable, "sample_ddp.py", *two])
    assert only_npz(tmp_path / "two").read_bytes() == npz.read_bytes()


def test_balanced_labels_are_exact_seeded_and_shuffled():
    pool = [3, 5, 9, 11]
    labels = labels_for(400, 7, pool, "balanced")
    assert sorted(set(labels.tolist())) == pool and all((labels == c).sum() == 100 for c in pool)
    assert np.array_equal(labels, labels_for(400, 7, pool, "balanced"))  # (seed, count) alone decide them
    assert not np.array_equal(labels, labels_for(400, 8, pool, "balanced"))
    assert len(set(labels[:8].tolist())) > 1  # shuffled, not class after class
    assert np.array_equal(labels_for(6, 0, pool[:2]), labels_for(6, 0, pool[:2], "random"))  # the default


def test_balanced_labels_refuse_an_uneven_count_before_sampling(trained, tmp_path, capsys):
    with pytest.raises(ValueError, match="1000 classes; use --num-fid-samples a multiple of 1000 .e.g. 49000 or 50000"):
        labels_for(49_999, 0, range(1000), "balanced")
    args = [str(a) for a in ddp_args(trained, tmp_path / "samples", n=5)]
    assert sample_ddp.main([*args, "--labels", "balanced"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5 images do not split evenly over 2 classes" in err[0] and "e.g. 4 or 6" in err[0]
    assert not (tmp_path / "samples").exists()


def test_other_sampler_settings_sample_into_another_folder(trained, tmp_path):
    base = [str(a) for a in ddp_args(trained, tmp_path, n=2, batch=2, steps=2)]
    assert sample_ddp.main([*base, "--sampler", "euler"]) == 0
    assert sample_ddp.main([*base, "--sampler", "euler", "--spacing", "logsnr"]) == 0
    assert sample_ddp.main([*base, "--sampler", "euler", "--spacing", "logsnr", "--cfg-interval", "1", "5"]) == 0
    assert len(list(tmp_path.glob("*.npz"))) == 3


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "ddpm", "--spacing", "karras"], "settings of the diffusers solvers"),
    (["--cfg-interval", "5", "1"], "needs 0 <= LOW < HIGH"),
    (["--cfg-scale", "1", "--cfg-interval", "0.5", "5"], "--cfg-interval has no effect without guidance"),
    (["--sampler", "ddim", "--num-sampling-steps", "600"], "integer stride"),
    (["--sampler", "dpm++2m", "--spacing", "linspace", "--num-sampling-steps", "1000"],
     "put two steps on timestep 500, a step of zero length (NaN images); with --spacing linspace every count up "
     "to 999"),
    (["--sampler", "unipc", "--spacing", "trailing", "--num-sampling-steps", "769"],
     "make 770 steps for 769, the last from timestep -1"),
    (["--sampler", "ddpm", "--num-sampling-steps", "1"], "ddpm takes at least 2 steps"),
    (["--sampler", "flow-heun", "--time-shift", "1e4"], "--time-shift must be in [0.001, 1000]"),
    (["--guide-ckpt", "nowhere.pt"], "--guide-ckpt nowhere.pt: neither a file"),
])
def test_bad_solver_and_guidance_flags_exit_2(trained, flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(trained["ckpt"]), *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_guide_of_another_latent_space_or_class_count_exits_2(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained["ckpt"])
    ckpt["args"] = {**ckpt["args"], "num_classes": 3}
    ckpt["ema"] = build_model(ckpt["args"]).state_dict()
    torch.save(ckpt, tmp_path / "three_classes.pt")
    with pytest.raises(SystemExit) as info:
        sample.main(["--ckpt", str(trained["ckpt"]), "--vae-path", str(trained["vae"]),
                     "--guide-ckpt", str(tmp_path / "three_classes.pt")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "the guide must share the main model's latent space and classes; it differs in classes (guide 3, main 2)" in err


def test_non_finite_samples_exit_2_with_one_line_and_write_nothing(trained, tmp_path, capsys):
    """A checkpoint whose output layer holds NaN: sample.py and sample_ddp.py name the settings, write no image."""
    ckpt = load_checkpoint(trained["ckpt"])
    ckpt["ema"] = {k: torch.full_like(v, float("nan")) if k.startswith("final_layer.") else v
                   for k, v in ckpt["ema"].items()}
    torch.save(ckpt, tmp_path / "diverged.pt")
    flags = ["--ckpt", str(tmp_path / "diverged.pt"), "--vae-path", str(trained["vae"]), "--sampler", "dpm++2m",
             "--num-sampling-steps", "3"]
    with pytest.raises(SystemExit) as info:
        sample.main([*flags, "--output", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and not (tmp_path / "grid.png").exists()
    assert "sampling diverged: the latents of image 0, 1, 2, 3, ... (8 of 8) are not finite" in err
    assert "dpm++2m 3 steps (logsnr spacing), cfg 4.0 on all channels" in err
    assert sample_ddp.main([*flags, "--num-fid-samples", "2", "--per-proc-batch-size", "2",
                            "--sample-dir", str(tmp_path / "samples")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last.startswith("sample_ddp.py: error: sampling diverged")
    assert "dpm++2m 3 steps (logsnr spacing), cfg 1.5" in last
    assert not list((tmp_path / "samples").rglob("*.png")) and not list((tmp_path / "samples").glob("*.npz"))
