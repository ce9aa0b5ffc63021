"""Failures that really happen: kills mid-write, a full disk, hostile or broken files."""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, make_image_folder, run_script, script_env
from udit import checkpoint as ckpt_module
from udit.checkpoint import CheckpointError, load_checkpoint, save_atomic

# A pixel-space model large enough (about 80 MB per checkpoint) that writing takes a while.
BIG = ["--model", "U-DiT-S", "--model-kwargs", '{"hidden_size": 64, "num_heads": 2, "depth": [1, 2, 2, 2, 1]}',
       "--vae", "none", "--image-size", "16", "--num-classes", "2", "--global-batch-size", "4",
       "--num-workers", "0", "--log-every", "1", "--sample-steps", "2"]


def test_kill_during_checkpoint_write_keeps_previous_and_resume_works(tiny_data, tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "train.py", "--data-path", str(tiny_data["small_images"]), "--results-dir", str(results),
           "--max-steps", "50", "--ckpt-every", "1", *BIG]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_env())
    killed_during = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        temps = list(results.glob("*/checkpoints/.0*.pt.tmp-*"))
        if temps and list(results.glob("*/checkpoints/0000001.pt")):
            proc.send_signal(signal.SIGKILL)
            killed_during = temps[0].name
            break
        time.sleep(0.001)
    proc.wait()
    assert killed_during, "the process was not caught writing a checkpoint"
    run_dir = next(results.iterdir())
    finals = sorted(p.name for p in (run_dir / "checkpoints").glob("0*.pt"))
    assert killed_during[1:].split(".tmp")[0] not in finals  # the interrupted one has no final name
    last = load_checkpoint(run_dir / "checkpoints" / finals[-1])  # the previous one is intact
    out = run_script([sys.executable, "train.py", "--resume", str(run_dir), "--max-steps", str(last["step"] + 1),
                      "--ckpt-every", "1"])
    assert f"resumed from {run_dir / 'checkpoints' / finals[-1]} at step {last['step']}" in out
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))
    assert load_checkpoint(run_dir / "checkpoints" / f"{last['step'] + 1:07d}.pt")["step"] == last["step"] + 1


def test_kill_of_feature_extraction_then_rerun_gives_identical_features(tiny_data, tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=24, size=256)
    common = ["--data-path", str(images), "--vae-path", str(tiny_data["vae"]), "--batch-size", "2",
              "--num-workers", "0"]
    killed = tmp_path / "killed"
    # The killed run, its rerun and the clean run compared with them all run as scripts with
    # the same environment (script_env): bytes are only comparable under the same settings.
    extract = [sys.executable, "extract_features.py", *common, "--features-path"]
    proc = subprocess.Popen([*extract, killed], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=script_env())
    done_count = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done_count = int(np.load(killed / "done.npy", mmap_mode="r").sum())
        except (OSError, ValueError):
            pass
        if 8 <= done_count:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert 8 <= done_count < 48, "the kill did not land midway"
    run_script([*extract, killed])
    run_script([*extract, tmp_path / "clean"])
    for name in ("features.npy", "labels.npy"):
        assert (killed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "0000002.pt"
    save_atomic({"step": 1}, target)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"disk full while writing .*0000002.pt \(no partial file is left; the earlier "
                                      r"file there is intact\)"):
        save_atomic({"step": 2}, target)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    assert load_checkpoint(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000002.pt"]


@pytest.mark.parametrize("failing_save", [1, 2])
def test_disk_full_during_training_is_one_line_with_advice_that_works(tiny_data, tmp_path, monkeypatch, capsys,
                                                                     failing_save):
    calls = {"n": 0}
    real_save = torch.save

    def full_disk_once(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_save:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(ckpt_module.torch, "save", full_disk_once)
    code = train.main(["--data-path", str(tiny_data["small_images"]), "--results-dir", str(tmp_path), "--max-steps",
                       "4", "--ckpt-every", "2", *BIG])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "disk full while writing" in err[-1] and f"{2 * failing_save:07d}.pt" in err[-1]
    files = sorted(p.name for p in tmp_path.glob("*/checkpoints/*"))
    (run,) = tmp_path.iterdir()
    if failing_save == 2:
        assert files == ["0000002.pt"]
        assert f"the last checkpoint {run / 'checkpoints' / '0000002.pt'} is intact: resume after freeing space " \
               f"(--resume {run})" in err[-1]
        assert train.main(["--resume", str(run)]) == 0  # the advice works
    else:  # the first checkpoint: nothing to resume, and the message must not say there is
        assert files == [] and "intact" not in err[-1] and "--resume" not in err[-1]
        assert "no checkpoint was written yet, so there is nothing to resume: start the run again" in err[-1]


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "cat.png")
    with pytest.raises(CheckpointError, match="cat.png: not a checkpoint"):
        load_checkpoint(tmp_path / "cat.png")
    torch.save({"ema": {"w": torch.ones(1)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(tmp_path / "legacy.pt")["ema"]["w"], torch.ones(1))  # torch < 1.6 files load


def test_every_load_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    torch.save({"ema": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    np.save(tmp_path / "evil.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    from udit.data import PublicFeatureDataset
    dataset = PublicFeatureDataset([tmp_path / "evil.npy"], [tmp_path / "evil.npy"])
    with pytest.raises(ValueError, match="allow_pickle"):
        dataset[0]
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("script, flags, message", [
    ("train.py", ["--model", "DiT-XXL/2", "--data-path", "."], "invalid choice"),
    ("train.py", ["--data-path", "/nonexistent"], "no such file or directory"),
    ("sample.py", ["--ckpt", "/nonexistent.pt"], "neither a file nor a released checkpoint"),
    ("sample_ddp.py", ["--ckpt", "U-DiT-B-400K", "--cfg-scale", "0.5"], "argument --cfg-scale: must be a number >= 1"),
    pytest.param("sample_ddp.py", ["--ckpt", "U-DiT-B-400K", "--cuda-graph"], "--cuda-graph needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")),
    ("extract_features.py", ["--data-path", "/nonexistent", "--features-path", "x"], "no such file or directory"),
    ("evaluator.py", ["/nonexistent.npz", "/nonexistent2.npz"], "no such file"),
])
def test_bad_command_lines_exit_2_with_one_line(script, flags, message):
    out = run_script([sys.executable, script, *flags], expect=2)
    lines = [line for line in out.strip().splitlines() if line.strip() and not line.startswith("usage")
             and not line.startswith(" ")]
    assert message in lines[-1] and len(lines) == 1
