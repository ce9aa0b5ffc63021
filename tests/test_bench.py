"""bench/bench.py runs end to end and reports what the speed issue asks for (not a timing test)."""

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402


def test_bench_reports_times_ratios_and_utilisation(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "U-DiT-S", "DiT-S/2", "--batch-size", "1", "--rounds", "1", "--warmup", "0",
                "--gemm-size", "256", "--breakdown", "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results["models"]) == {"U-DiT-S", "DiT-S/2"} and results["gemm_ceiling_gflops"] > 0
    udit = results["models"]["U-DiT-S"]
    assert abs(udit["gmacs"] - 6.02) < 0.01 and udit["params"] == 58_896_568
    assert udit["train_step_s"] > 0 and udit["infer_s"] > 0 and 0 < udit["utilisation"]
    # U-DiT-S has 44 thinner layers against DiT-S/2's 12: several times the operators.
    assert udit["train_ops_per_step"] > 3 * results["models"]["DiT-S/2"]["train_ops_per_step"] > 0
    # The kernel breakdown: only U-DiT runs depthwise convolutions at every layer (DiT: one patch embedding).
    kernels = {name: r["train_kernel_seconds"] for name, r in results["models"].items()}
    assert all(r["infer_kernel_seconds"]["conv"] > 0 for r in results["models"].values())
    assert all(kernels[name][kind] > 0 for name in kernels for kind in ("matmul", "attention", "optimizer", "other"))
    assert kernels["U-DiT-S"]["conv"] > 10 * kernels["DiT-S/2"]["conv"] > 0
    printed = capsys.readouterr().out
    assert "vs DiT-S/2:" in printed and "floor over the time of" in printed


def test_bench_measures_each_model_with_and_without_alignment(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "U-DiT-S", "DiT-S/2", "--alignment", "--image-size", "64", "--batch-size", "2",
                "--rounds", "1", "--warmup", "0", "--gemm-size", "64", "--json", str(out)])
    models = json.loads(out.read_text())["models"]
    assert list(models) == ["U-DiT-S", "U-DiT-S + U-REPA", "DiT-S/2", "DiT-S/2 + REPA"]
    assert all(r["train_step_s"] > 0 for r in models.values())
    # The aligned step dispatches the encoder, projector and loss operators on top of the model's.
    assert models["DiT-S/2 + REPA"]["train_ops_per_step"] > models["DiT-S/2"]["train_ops_per_step"]
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "vs U-DiT-S: " in rows["U-DiT-S + U-REPA"] and "vs DiT-S/2: " in rows["DiT-S/2 + REPA"]
    assert "vs" not in rows["U-DiT-S"]  # measured in another pair than DiT-S/2: no ratio between them
    # One pair in memory at a time: four cases of U-DiT-B / DiT-B/2 at once reached 17 GB on CPU.
    args = bench.build_parser().parse_args(["--models", "U-DiT-S", "DiT-S/2", "--objectives", "ddpm", "flow",
                                            "--alignment"])
    assert bench.case_groups(args) == [[(m, o, False), (m, o, True)] for m in ("U-DiT-S", "DiT-S/2")
                                       for o in ("ddpm", "flow")]


def test_kernel_breakdown_sorts_operators_by_kind():
    a, image, kernel = torch.randn(64, 64), torch.randn(1, 8, 16, 16), torch.randn(8, 1, 3, 3)
    matmul = bench.kernel_time_breakdown(lambda: a @ a, torch.device("cpu"))
    assert matmul["matmul"] > 0 and matmul["conv"] == matmul["attention"] == matmul["optimizer"] == 0
    conv = bench.kernel_time_breakdown(lambda: torch.nn.functional.conv2d(image, kernel, groups=8).exp(),
                                       torch.device("cpu"))
    assert conv["conv"] > 0 and conv["other"] > 0 and conv["matmul"] == 0


def test_kernel_kinds_cover_cpu_and_cuda_operator_names():
    kinds = {"addmm": "matmul", "_addmm_activation": "matmul", "mkldnn_convolution": "conv",
             "cudnn_convolution": "conv", "convolution_backward": "conv", "_conv_depthwise2d": "conv",
             "_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
             "_efficient_attention_forward": "attention", "_fused_adamw_": "optimizer",
             "mul": "other", "native_layer_norm": "other", "copy_": "other"}
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds


def test_breakdown_refuses_compiled_models(capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--breakdown", "--compile"])
    assert exit.value.code == 2
    assert "--breakdown profiles eager operators" in capsys.readouterr().err


def test_operator_count_skips_views_and_counts_backward():
    x = torch.randn(4, 6, requires_grad=True)
    assert bench.count_operators(lambda: x.view(6, 4).permute(1, 0).transpose(0, 1)) == 0
    assert bench.count_operators(lambda: x * 2) == 1
    # forward: mul, sum; backward: ones_like (the seed gradient), mul (the expand is a view)
    assert bench.count_operators(lambda: (x * 2).sum().backward()) == 4


# ----------------------------------------------------------------- sampler benchmarks

def test_sampler_speed_reports_nfe_time_and_h200_projection(tmp_path, capsys):
    import sampler_speed
    out = tmp_path / "speed.json"
    sampler_speed.main(["--model", "U-DiT-S", "--batch-size", "1", "--rounds", "1", "--json", str(out),
                        "--configs", "ddpm 2", "unipc 3 interval=0.5,10 autoguidance", "flow-euler 2"])
    results = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    # DDPM: 2 guided steps. UniPC on log-SNR spacing visits sigma 157, 1.25, 0.01: one inside the interval.
    assert results["ddpm 2"]["nfe"] == 4 and results["unipc 3 interval=0.5,10 autoguidance"]["nfe"] == 4
    assert results["flow-euler 2"]["nfe"] == 4  # a flow network (no learned variance), 2 guided steps
    assert all(r["cpu_s_per_image"] > 0 for r in results.values())
    assert results["ddpm 2"]["h200_hours_50k"] == pytest.approx(50_000 * 4 / (2.41 * 500) / 3600)
    assert "| ddpm 2 | 4 |" in capsys.readouterr().out


def test_sampling_front_table_states_whether_the_targets_are_met(capsys):
    import sampling_front
    from types import SimpleNamespace

    def record(sampler, steps, seed, fd, nfe, accuracy=1.0, **kw):
        cfg = sampling_front.config(sampler, steps, **kw)
        return {"key": sampling_front.key(cfg), "config": cfg, "seed": seed, "fd_classifier": fd,
                "class_accuracy": accuracy, "nfe": nfe}
    records = [record("ddpm", 250, s, fd, 500) for s, fd in ((0, 2.0), (1, 2.2))]
    records += [record("unipc", 10, s, fd, 14, spacing="logsnr", final="zero", interval=[0.5, 10.0])
                for s, fd in ((0, 2.1), (1, 2.2))]
    records += [record("dpm++2m", 20, s, fd, 40, spacing="logsnr", final="zero") for s, fd in ((0, 1.9), (1, 2.0))]
    records.append(record("euler", 5, 0, 1.0, 10, spacing="karras", final="zero"))  # one seed only: not a result
    # The lowest FD, but guidance switched off where it counts: the classes are lost, so it does not qualify.
    records += [record("dpm++2m-sde", 10, s, 1.0, 10, accuracy=0.97, spacing="logsnr", final="zero",
                       interval=[1.0, 2.0]) for s in (0, 1)]
    sampling_front.print_table(SimpleNamespace(records=records), SimpleNamespace(samples=1000, seeds=[0, 1]))
    out = capsys.readouterr().out
    assert "| unipc-10 logsnr/zero interval (0.5, 10] | 14 | 2.10 | 2.20 | 2.15 | 1.000 |" in out
    assert "euler" not in out
    assert "best at <= 50 NFE: dpm++2m-20 logsnr/zero (NFE 40): FD 1.950 = 0.93x the reference's; target <= 1.0x met" in out
    assert "best at <= 20 NFE: unipc-10 logsnr/zero interval (0.5, 10] (NFE 14): FD 2.150 = 1.02x" in out

    # A flow checkpoint's reference is SiT's SDE at 250 steps; its solvers are labelled with their time shift.
    flow = [record("flow-sde", 250, s, 1.0, 500, shift=1.0) for s in (0, 1)]
    flow += [record("flow-heun", 10, s, 1.05, 38, shift=3.0) for s in (0, 1)]
    sampling_front.print_table(SimpleNamespace(records=flow),
                               SimpleNamespace(samples=1000, seeds=[0, 1], objective="flow"))
    out = capsys.readouterr().out
    assert "flow-sde-250 (NFE 500): FD 1.000" in out
    assert "best at <= 50 NFE: flow-heun-10 shift 3 (NFE 38): FD 1.050 = 1.05x the reference's; target <= 1.0x " \
           "missed" in out


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_sampling_front_runs_every_stage_for_both_objectives(objective, tmp_path, monkeypatch, capsys):
    """The stages' orchestration, with a stand-in measurer: FD falls with steps and with a narrow interval."""
    import sampling_front
    from udit.samplers import Guidance, make_sampler

    class StandIn:
        def __init__(self, ckpt, threads):
            pass

        def measure(self, cfg, seed, batch_size=500):
            sampler = make_sampler(cfg["sampler"], cfg["steps"], cfg["spacing"], cfg["final"], shift=cfg.get("shift"))
            guidance = Guidance(scale=cfg["cfg"], interval=None if cfg["interval"] is None else tuple(cfg["interval"]),
                                guide=torch.nn.Identity() if cfg["guide"] else None)
            fd = 1 + 1 / cfg["steps"] + (0.5 if cfg["interval"] is None else 0.1 * cfg["interval"][1] / 1000) + seed
            return {"key": sampling_front.key(cfg), "config": cfg, "seed": seed, "fd_classifier": fd,
                    "class_accuracy": 1.0, "nfe": sampler.evaluations_per_image(guidance)["total"], "seconds": 0.0}
    monkeypatch.setattr(sampling_front, "Measurer", StandIn)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"args": {"objective": objective}}, ckpt)
    guide = tmp_path / "guide.pt"
    stages = ["baseline", "spacing", "front", "interval", "front-interval", "autoguidance"]
    assert sampling_front.main(["--ckpt", str(ckpt), "--json", str(tmp_path / "front.json"), "--samples", "4",
                                "--select-samples", "2", "--guide-ckpts", str(guide), "--stages", *stages]) == 0
    out = capsys.readouterr().out
    assert "picked: interval [0.0, 2.0]" in out and f"picked: guide {guide} at scale 1.5" in out
    families = {"ddpm": ["dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc", "euler", "heun"],
                "flow": ["flow-euler", "flow-heun", "flow-sde"]}[objective]
    for name in families:
        assert f"| {name}-50" in out and f"| {name}-5" in out
    # --max-nfe: the front skips what costs more
    assert sampling_front.main(["--ckpt", str(ckpt), "--json", str(tmp_path / "cheap.json"), "--samples", "4",
                                "--select-samples", "2", "--stages", "spacing", "front", "--max-nfe", "40"]) == 0
    cheap = json.loads((tmp_path / "cheap.json").read_text())
    assert max(r["nfe"] for r in cheap if r["config"]["samples"] == 4) == 40
    assert f"{'flow-sde' if objective == 'flow' else 'ddpm'}-250 (NFE 500): FD" in out
    assert "best at <= 50 NFE" in out and "best at <= 20 NFE" in out


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_sampling_front_candidates_are_judged_by_class_accuracy_beside_the_reference(objective, capsys):
    """A candidate that loses more than 2% of the reference's class accuracy is not kept, whatever its FD."""
    import sampling_front
    from types import SimpleNamespace
    args = SimpleNamespace(samples=1000, seeds=[0, 1], objective=objective, guide_ckpts=[], reference_samples=500)
    reference, cfgs = sampling_front.candidate_configs(objective, 1000, reference_samples=500)
    assert reference["steps"] == 250 and reference["samples"] == 500 and reference["interval"] is None
    assert all(sampling_front.evaluations(c) < 50 for c in cfgs)  # the budget the README recommends in
    assert [1.0, 2.0] in [c["interval"] for c in cfgs] and None in [c["interval"] for c in cfgs]

    def records(cfg, fd, accuracy):
        return [{"key": sampling_front.key(cfg), "config": cfg, "seed": s, "fd_classifier": fd,
                 "class_accuracy": accuracy, "nfe": sampling_front.evaluations(cfg)} for s in (0, 1)]
    # a short run: the reference at 0.9; the first candidate keeps 0.885 (>= 98% of it), the second 0.87 at a lower FD
    measured = records(cfgs[0], 1.5, 0.885) + records(cfgs[1], 1.0, 0.87)
    sampling_front.print_candidates(measured, args)
    out = capsys.readouterr().out
    assert "(500 samples) not measured on seeds [0, 1]: no verdict" in out and out.count("| ? |") == 2
    sampling_front.print_candidates(measured + records(reference, 2.0, 0.9), args)
    out = capsys.readouterr().out
    assert "(500 samples): FD 2.00, class accuracy 0.900; kept = class accuracy >= 0.882 (98% of it)" in out
    first, second = cfgs[:2]
    assert f"| {sampling_front.label(first)} | {sampling_front.evaluations(first)} | 1.50 | 0.885 | yes |" in out
    assert f"| {sampling_front.label(second)} | {sampling_front.evaluations(second)} | 1.00 | 0.870 | NO |" in out
    assert out.count("| yes |") + out.count("| NO |") == 2  # unmeasured candidates are not shown


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_demo_ends_with_the_readme_recommendation_and_says_how_fast_it_trained(objective):
    """make demo samples its end with the README's recommended flags (valid for the objective), the reference beside."""
    import argparse
    import sampling_front  # noqa: F401  (puts scripts/ on the path)
    import demo
    from udit.sampling import add_sampling_args, sampler_from_args
    recommended = demo.END_SAMPLERS[objective]["recommended"]
    assert " ".join(recommended) in (ROOT / "README.md").read_text()  # the *Which to use* row it follows
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    args = p.parse_args(["--ckpt", "x", *recommended])
    assert sampler_from_args(args, objective).objective == objective
    assert demo.sample_flags(objective)[-2:] == ["--cfg-scale", "4.0"]

    summary = {"objective": objective, "sampler": demo.describe_sampler(objective), "nfe_per_image": 21,
               "class_accuracy": 0.99, "fd_classifier": 1.0, "fd_classifier_real_vs_real": 0.86, "real_accuracy": 0.98,
               "reference": {"sampler": demo.describe_sampler(objective, "reference"), "nfe_per_image": 200,
                             "class_accuracy": 1.0, "fd_classifier": 2.5},
               "training_steps": 499, "training": {"steps_per_s": 1.04, "minutes": 8.0, "idle_steps_per_s": 3.8,
                                                   "cpus": 2, "load_average_before": 6.1}}
    lines = demo.summary_lines(summary)
    assert lines[0].startswith(f"end samples, the README's recommended sampler for {objective} "
                               f"({' '.join(recommended[1:2] + recommended[3:4])} steps")
    assert "21 network evaluations per image): class accuracy 0.990, FD 1.00" in lines[0]
    reference = demo.END_SAMPLERS[objective]["reference"]
    assert f"reference sampler ({reference[1]} {reference[3]} steps; 200 network evaluations" in lines[1]
    assert "499 training steps in 8.0 min at 1.04 steps/s (the idle 2-core development machine: ~3.8 steps/s, " \
           "~1,800 steps in the default 8 min); load average 6.1 on 2 CPUs before training" in lines[3]
    assert "trained at 27% of that speed" in lines[4]
    summary["training"]["steps_per_s"] = 3.5  # near the idle speed: nothing to explain
    assert len(demo.summary_lines(summary)) == 4
    del summary["training"]  # --score: no training here
    assert len(demo.summary_lines(summary)) == 3
