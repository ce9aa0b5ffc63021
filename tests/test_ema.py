"""Post-hoc EMA (EDM2): the power-function EMA, its snapshots in training, reconstruction by udit.phema."""

import math

import numpy as np
import pytest
import torch

import train
from udit import phema
from udit.ema import (PowerFunctionEMA, gamma_to_sigma_rel, profile_inner_products, sigma_rel_to_gamma,
                      solve_coefficients)

COMMON = ["--model", "U-DiT-S", "--model-kwargs", '{"hidden_size": 16, "num_heads": 2, "depth": [1, 1, 1, 1, 1]}',
          "--num-classes", "2", "--global-batch-size", "4", "--log-every", "2", "--num-workers", "0",
          "--sample-every", "0", "--vae", "none", "--image-size", "16", "--ckpt-every", "100"]
POSTHOC = ["--posthoc-ema", "0.05", "0.1", "--posthoc-every", "2"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_dir(results):
    (folder,) = results.iterdir()
    return folder


def last_checkpoint(results):
    return load(sorted(run_dir(results).glob("checkpoints/*.pt"))[-1])


def snapshots(results):
    return {p.name: load(p) for p in sorted((run_dir(results) / "posthoc").glob("*.pt"))}


@pytest.fixture(scope="module")
def posthoc_run(tiny_data, tmp_path_factory):
    """A 6-step pixel-space run with fp32 snapshots of sigma_rel 0.05 and 0.10 at steps 2, 4, 6."""
    results = tmp_path_factory.mktemp("posthoc")
    assert train.main(["--data-path", str(tiny_data["small_images"]), "--max-steps", "6", "--results-dir",
                       str(results), *COMMON, *POSTHOC, "--posthoc-dtype", "fp32"]) == 0
    return run_dir(results)


# ----------------------------------------------------------------- the maths

def test_sigma_rel_to_gamma_gives_edm2s_exponents():
    # EDM2 Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma in (0.01, 0.13, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-10)
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(ValueError, match="outside"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_products_match_numerical_integration():
    tau = np.linspace(0, 10, 2_000_001)

    def profile(t, gamma):
        return np.where(tau <= t, (gamma + 1) / t * (tau / t) ** gamma, 0.0)

    for (ta, ga), (tb, gb) in [((4.0, 6.94), (10.0, 16.97)), ((10.0, 2.0), (7.0, 6.94)), ((5.0, 3.0), (5.0, 3.0))]:
        numeric = np.trapezoid(profile(ta, ga) * profile(tb, gb), tau)
        assert profile_inner_products(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_a_tracked_profile_is_reconstructed_exactly_and_an_untracked_one_with_its_error():
    steps, gammas = [2, 2, 4, 4, 6, 6], [sigma_rel_to_gamma(s) for s in (0.05, 0.1) * 3]
    coefficients, errors = solve_coefficients(steps, gammas, 6, [gammas[4], sigma_rel_to_gamma(0.08)])
    assert np.allclose(coefficients[:, 0], [0, 0, 0, 0, 1, 0], atol=1e-9) and errors[0] < 1e-6
    assert coefficients[:, 1].sum() == pytest.approx(1.0) and 0.01 < errors[1] < 0.1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3, 5))
        self.register_buffer("counter", torch.zeros(()))


def test_power_function_ema_against_its_formula_written_out():
    """After T steps the EMA is sum_t w_t theta_t, w_t = (t^(g+1) - (t-1)^(g+1)) / T^(g+1) (EDM2 Eq. 127 unrolled)."""
    gen = torch.Generator().manual_seed(0)
    net = Net()
    thetas = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(8)]  # theta_1 .. theta_8
    emas = [PowerFunctionEMA(net, sigma) for sigma in (0.05, 0.10, 0.25)]
    for t, theta in enumerate(thetas, start=1):
        with torch.no_grad():
            net.weight.copy_(theta)
            net.counter.fill_(t)
        for ema in emas:
            ema.update(net, t)
    T = len(thetas)
    for ema in emas:
        g = ema.gamma
        weights = [(t ** (g + 1) - (t - 1) ** (g + 1)) / T ** (g + 1) for t in range(1, T + 1)]
        expected = sum(w * theta for w, theta in zip(weights, thetas))
        assert math.fsum(weights) == pytest.approx(1.0)
        torch.testing.assert_close(ema.module.weight.double(), expected, rtol=0, atol=1e-6)
        assert ema.module.counter.item() == T  # buffers are copied, not averaged


def test_power_function_ema_over_skipped_steps_counts_them_with_the_unchanged_weights():
    net, gen = Net(), torch.Generator().manual_seed(1)
    thetas = [torch.randn(3, 5, generator=gen) for _ in range(3)]
    skipping, every_step = PowerFunctionEMA(net, 0.1), PowerFunctionEMA(net, 0.1)
    for t, theta in [(1, thetas[0]), (2, thetas[1]), (5, thetas[2])]:  # steps 3 and 4 skipped
        with torch.no_grad():
            net.weight.copy_(theta)
        skipping.update(net, t)
    for t, theta in [(1, thetas[0]), (2, thetas[1]), (3, thetas[2]), (4, thetas[2]), (5, thetas[2])]:
        with torch.no_grad():
            net.weight.copy_(theta)
        every_step.update(net, t)
    torch.testing.assert_close(skipping.module.weight, every_step.module.weight, rtol=0, atol=1e-6)


# ----------------------------------------------------------------- training

def test_snapshots_of_a_run_and_the_checkpoint_state(posthoc_run):
    names = sorted(p.name for p in (posthoc_run / "posthoc").iterdir())
    assert names == [f"{step:07d}_sigma{s}.pt" for step in (2, 4, 6) for s in ("0.05", "0.1")]
    ckpt = load(posthoc_run / "checkpoints" / "0000006.pt")
    assert [(s["sigma_rel"], s["step"]) for s in ckpt["posthoc_ema"]] == [(0.05, 6), (0.1, 6)]
    last = load(posthoc_run / "posthoc" / "0000006_sigma0.05.pt")
    assert last["step"] == 6 and last["args"]["model"] == "U-DiT-S" and last["gamma"] == sigma_rel_to_gamma(0.05)
    for name, value in ckpt["posthoc_ema"][0]["ema"].items():
        assert torch.equal(last["ema"][name], value), name
    # The widths differ, and neither is the fixed 0.9999 EMA.
    key = "final_layer.out_proj.weight"
    assert not torch.equal(ckpt["posthoc_ema"][0]["ema"][key], ckpt["posthoc_ema"][1]["ema"][key])
    assert not torch.equal(ckpt["posthoc_ema"][0]["ema"][key], ckpt["ema"][key])


def test_resume_gives_the_same_snapshots_and_posthoc_ema_leaves_training_unchanged(tiny_data, tmp_path):
    data = ["--data-path", str(tiny_data["small_images"]), *COMMON]
    assert train.main([*data, *POSTHOC, "--max-steps", "6", "--results-dir", str(tmp_path / "straight")]) == 0
    assert train.main([*data, *POSTHOC, "--max-steps", "3", "--results-dir", str(tmp_path / "halves")]) == 0
    assert train.main(["--resume", str(run_dir(tmp_path / "halves")), "--max-steps", "6"]) == 0
    assert train.main([*data, "--max-steps", "6", "--results-dir", str(tmp_path / "off")]) == 0
    straight, resumed = snapshots(tmp_path / "straight"), snapshots(tmp_path / "halves")
    assert sorted(straight) == sorted(resumed) and len(straight) == 6
    for name, snapshot in straight.items():
        assert snapshot["ema"]["final_layer.out_proj.weight"].dtype == torch.float16  # the default
        assert (snapshot["step"], snapshot["sigma_rel"]) == (resumed[name]["step"], resumed[name]["sigma_rel"])
        for key, value in snapshot["ema"].items():
            assert torch.equal(value, resumed[name]["ema"][key]), f"{name}: {key} differs after resume"
    full, half, off = (last_checkpoint(tmp_path / d) for d in ("straight", "halves", "off"))
    for a, b in zip(full["posthoc_ema"], half["posthoc_ema"], strict=True):
        assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items()) and a["step"] == b["step"]
    assert "posthoc_ema" not in off and not (run_dir(tmp_path / "off") / "posthoc").exists()
    for key in ("model", "ema"):
        assert all(torch.equal(v, off[key][k]) for k, v in full[key].items()), f"{key}: post-hoc EMA changed training"


# ----------------------------------------------------------------- reconstruction

def test_reconstruction_of_a_tracked_width_equals_that_ema(posthoc_run, tmp_path):
    out = tmp_path / "out"
    assert phema.main([str(posthoc_run), "--sigma-rel", "0.1", "0.05", "0.07", "--out-dir", str(out),
                       "--batch", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000006_sigma0.05.pt", "0000006_sigma0.07.pt",
                                                     "0000006_sigma0.1.pt"]
    tracked = load(posthoc_run / "checkpoints" / "0000006.pt")["posthoc_ema"]
    for sigma, state in zip(("0.05", "0.1"), tracked):
        made = load(out / f"0000006_sigma{sigma}.pt")
        assert made["posthoc"]["sigma_rel"] == float(sigma) and len(made["posthoc"]["snapshots"]) == 6
        # Tolerance: fp32 snapshots, coefficients exact to ~1e-12: float32 rounding of the sum.
        for key, value in state["ema"].items():
            assert (made["ema"][key] - value).abs().max() <= 1e-6 * max(value.abs().max().item(), 1e-3), key
    between = load(out / "0000006_sigma0.07.pt")
    assert 0 < between["posthoc"]["profile_error"] < phema.MAX_PROFILE_ERROR
    assert sum(between["posthoc"]["coefficients"]) == pytest.approx(1.0)


def test_reconstruction_at_an_earlier_step_uses_only_the_snapshots_up_to_it(posthoc_run, tmp_path):
    assert phema.main([str(posthoc_run / "posthoc"), "--sigma-rel", "0.05", "--step", "4",
                       "--out-dir", str(tmp_path)]) == 0
    made = load(tmp_path / "0000004_sigma0.05.pt")
    assert made["step"] == 4 and made["posthoc"]["snapshots"] == [
        "0000002_sigma0.05.pt", "0000002_sigma0.1.pt", "0000004_sigma0.05.pt", "0000004_sigma0.1.pt"]
    snapshot = load(posthoc_run / "posthoc" / "0000004_sigma0.05.pt")["ema"]
    assert all(torch.allclose(made["ema"][k], v, rtol=0, atol=1e-6) for k, v in snapshot.items())


def test_a_reconstruction_samples_and_fine_tunes_as_a_checkpoint(posthoc_run, tiny_data, tmp_path):
    import sample
    assert phema.main([str(posthoc_run), "--sigma-rel", "0.08", "--out-dir", str(tmp_path / "ema")]) == 0
    ckpt = tmp_path / "ema" / "0000006_sigma0.08.pt"
    assert sample.main(["--ckpt", str(ckpt), "--num-sampling-steps", "2", "--sampler", "ddim", "--class-labels",
                        "0", "1", "--output", str(tmp_path / "grid.png")]) == 0
    assert train.main(["--data-path", str(tiny_data["small_images"]), "--max-steps", "1", "--ckpt", str(ckpt),
                       "--results-dir", str(tmp_path / "tune"), *COMMON]) == 0


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["--sigma-rel", "0.3"], "must be in (0, 0.2887)"),
    (["--sigma-rel", "0.005"], "--sigma-rel 0.005 is out of reach at step 6: its 6 snapshots reproduce"),
    (["--sigma-rel", "0.05", "--step", "5"], "--step 5: no snapshots at that step; they are at steps 2, 4, 6"),
])
def test_reconstruction_refuses_what_the_snapshots_cannot_give(posthoc_run, tmp_path, capsys, argv, message):
    assert exit_status(lambda: phema.main([str(posthoc_run), *argv, "--out-dir", str(tmp_path / "out")])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not (tmp_path / "out").exists()
    if "out of reach" in message:
        assert "they reach widths from 0.0" in err[-1]


def exit_status(main):
    """A script's exit status, whether argparse exits or main returns it."""
    try:
        return main()
    except SystemExit as exit:
        return exit.code


def test_reconstruction_refuses_a_folder_without_snapshots_and_snapshots_of_another_model(posthoc_run, tmp_path,
                                                                                          capsys):
    (tmp_path / "empty").mkdir()
    assert phema.main([str(tmp_path / "empty"), "--sigma-rel", "0.1"]) == 2
    assert "no post-hoc EMA snapshots" in capsys.readouterr().err
    import shutil
    mixed = tmp_path / "mixed"
    shutil.copytree(posthoc_run / "posthoc", mixed)
    other = load(mixed / "0000006_sigma0.1.pt")
    other["args"] = {**other["args"], "model_kwargs": {**other["args"]["model_kwargs"], "hidden_size": 32}}
    torch.save(other, mixed / "0000008_sigma0.1.pt")
    assert phema.main([str(mixed), "--sigma-rel", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0000008_sigma0.1.pt is a snapshot of another model" in err
    assert "differ in model_kwargs" in err and not (mixed.parent / "phema").exists()
    # Another run of the same model (its snapshots copied in) used to be combined silently.
    run_id = load(posthoc_run / "checkpoints" / "0000006.pt")["args"]["run_id"]
    assert run_id and all(load(path)["run_id"] == run_id for path in (posthoc_run / "posthoc").iterdir())
    other = load(mixed / "0000006_sigma0.1.pt")
    other["run_id"] = "0123456789abcdef"
    torch.save(other, mixed / "0000008_sigma0.1.pt")
    assert phema.main([str(mixed), "--sigma-rel", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a snapshot of another training run of this model" in err
    # A file where a folder is expected: named as such, before anything is read or written.
    assert phema.main([str(posthoc_run / "checkpoints" / "0000006.pt"), "--sigma-rel", "0.1"]) == 2
    assert "0000006.pt is a file; give the experiment folder" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert exit_status(lambda: phema.main([str(posthoc_run), "--sigma-rel", "0.1", "--out-dir",
                                           str(tmp_path / "a_file")])) == 2
    assert "a_file is a file, expected a folder" in capsys.readouterr().err.strip().splitlines()[-1]
    # The snapshots' own folder: a reconstruction has a snapshot's name and replaced it, for good.
    before = (posthoc_run / "posthoc" / "0000006_sigma0.1.pt").read_bytes()
    assert phema.main([str(posthoc_run), "--sigma-rel", "0.1", "--out-dir", str(posthoc_run / "posthoc")]) == 2
    assert "the folder of the snapshots themselves" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (posthoc_run / "posthoc" / "0000006_sigma0.1.pt").read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--posthoc-every", "5"], "--posthoc-every applies to post-hoc EMA only: add --posthoc-ema"),
    (["--posthoc-ema", "0.3"], "must be in (0, 0.2887)"),
    (["--posthoc-ema", "0.05", "0.05"], "each width once"),
])
def test_bad_posthoc_flags_exit_2_with_one_line(tiny_data, flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--data-path", str(tiny_data["small_images"]), *COMMON, *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_posthoc_ema_cannot_start_on_resume(posthoc_run, tiny_data, tmp_path, capsys):
    assert train.main(["--data-path", str(tiny_data["small_images"]), "--max-steps", "1",
                       "--results-dir", str(tmp_path), *COMMON]) == 0
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(run_dir(tmp_path)), "--max-steps", "2", "--posthoc-ema", "0.05", "0.1"])
    assert info.value.code == 2 and "--posthoc-ema cannot change on resume (the experiment was trained without " \
        "it, given [0.05, 0.1])" in capsys.readouterr().err
    # The switch is named, not the default of a setting that comes with it (it said: --encoder ... has
    # 'dinov2-vitb14').
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(run_dir(tmp_path)), "--max-steps", "2", "--encoder", "enc.pt", "--repa"])
    assert info.value.code == 2 and "--repa cannot change on resume (the experiment was trained without it" in \
        capsys.readouterr().err


def test_a_snapshot_spacing_that_misses_the_last_step_is_warned_about():
    from argparse import Namespace
    from udit.ema import snapshot_schedule_note
    assert snapshot_schedule_note(Namespace(posthoc_ema=[0.05], max_steps=6, posthoc_every=2)) is None
    assert snapshot_schedule_note(Namespace(posthoc_ema=None, max_steps=6, posthoc_every=4)) is None
    note = snapshot_schedule_note(Namespace(posthoc_ema=[0.05], max_steps=6, posthoc_every=4))
    assert "--posthoc-every 4 does not divide --max-steps 6: the last snapshot is at step 4" in note
