"""Watching a run: TensorBoard scalars and their resume, sample grids, evaluation during training, clipping."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluator
import train
import udit.monitor
from conftest import TINY_UDIT_KWARGS, torchrun
from torch.optim.optimizer import register_optimizer_step_pre_hook
from udit.checkpoint import build_model, load_checkpoint
from udit.monitor import Evaluation, read_scalars
from udit.samplers import Guidance, make_sampler
from udit.sampling import batches_of_rank, generate, write_npz_streaming
from udit.vae import to_uint8

TINY = ["--vae", "none", "--image-size", "16", "--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS,
        "--num-classes", "2", "--global-batch-size", "4", "--num-workers", "0", "--sample-steps", "2"]


def logged_losses(log_text):
    """{step: loss} of the log lines; a step logged twice (a resumed run) keeps its last line."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"\(step=(\d+)\) Train Loss: (\S+),", log_text)}


def the_experiment(results):
    (exp,) = [p for p in results.iterdir() if p.is_dir()]
    return exp


def test_two_processes_log_to_tensorboard_and_a_resumed_run_continues_the_curves(tiny_data, tmp_path):
    common = ["--data-path", tiny_data["small_images"], *TINY, "--log-every", "1", "--ckpt-every", "2",
              "--sample-every", "2"]
    torchrun("train.py", *common, "--max-steps", "4", "--results-dir", tmp_path)
    exp = the_experiment(tmp_path)
    assert len(list((exp / "tensorboard").iterdir())) == 1  # rank 0 alone writes
    scalars, losses = read_scalars(exp / "tensorboard"), logged_losses((exp / "log.txt").read_text())
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    for (step, loss), (_, mse), (_, vb) in zip(scalars["train/loss"], scalars["train/mse"], scalars["train/vb"]):
        assert loss == pytest.approx(losses[step], abs=6e-5)  # the all-reduced value the log prints
        assert loss == pytest.approx(mse + vb, rel=1e-5)
    assert all(value > 0 for _, value in scalars["train/grad_norm"] + scalars["train/images_per_sec"])
    assert [value for _, value in scalars["train/lr"]] == pytest.approx([1e-4] * 4)
    assert sorted(p.name for p in (exp / "samples").iterdir()) == ["0000002.png", "0000004.png"]
    grid = (exp / "samples" / "0000004.png").read_bytes()

    # As if the run had been killed after logging steps 3 and 4, before their checkpoint.
    (exp / "checkpoints" / "0000004.pt").unlink()
    (exp / "samples" / "0000004.png").unlink()
    torchrun("train.py", "--resume", exp, "--max-steps", "5")
    scalars, losses = read_scalars(exp / "tensorboard"), logged_losses((exp / "log.txt").read_text())
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]  # no step missing or twice
    assert all(loss == pytest.approx(losses[step], abs=6e-5) for step, loss in scalars["train/loss"])
    assert (exp / "samples" / "0000004.png").read_bytes() == grid  # same EMA weights, same noise
    assert (exp / "samples" / "0000005.png").is_file()  # and one at the end


def frechet_distance_of_few(a, b):
    """Frechet distance between the Gaussian fits of features a (N, D) and b (M, D), N, M << D.

    The trace of sqrtm(S_a S_b) is the sum of the singular values of A B^T / sqrt((N-1)(M-1))
    (A, B: centred features), an N x M matrix: the evaluator's number, without its 2048 x 2048
    matrix square root (~40 s on this machine).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T / np.sqrt((len(a) - 1) * (len(b) - 1)), compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + (ca ** 2).sum() / (len(a) - 1) + (cb ** 2).sum() / (len(b) - 1) - 2 * cross


@pytest.fixture(scope="module")
def stand_in_inception(tmp_path_factory):
    """The evaluator tests' stand-in Inception graph and a reference batch of 16-px images."""
    from test_evaluator import build_stand_in_graph, images
    folder = tmp_path_factory.mktemp("inception")
    np.savez(folder / "ref.npz", arr_0=images(1, 12, size=16))
    return build_stand_in_graph(folder / "classify_image_graph_def.pb"), folder / "ref.npz"


def test_evaluation_during_training_gives_the_evaluators_metrics(tiny_data, tmp_path, monkeypatch,
                                                                 stand_in_inception):
    graph, ref = stand_in_inception
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path / "cache"))
    assert train.main(["--data-path", str(tiny_data["small_images"]), *TINY, "--max-steps", "2",
                       "--sample-every", "0", "--eval-every", "2", "--eval-samples", "6", "--eval-ref", str(ref),
                       "--eval-sampler", "ddpm", "--eval-sampling-steps", "3", "--eval-cfg-scale", "2",
                       "--inception-graph", str(graph), "--results-dir", str(tmp_path / "r")]) == 0
    exp = the_experiment(tmp_path / "r")
    metrics = json.loads((exp / "eval" / "0000002.json").read_text())
    assert [p.name for p in (exp / "eval").iterdir() if p.suffix not in (".json", ".log")] == []  # samples removed

    # The same images again, from the checkpoint's EMA weights, batches and per-image seeds.
    ckpt = load_checkpoint(exp / "checkpoints" / "0000002.pt")
    ema = build_model(ckpt["args"])
    ema.load_state_dict(ckpt["ema"])
    ema.eval()
    images = torch.cat([generate(ema, None, ckpt["args"], 0, batch, make_sampler("ddpm", 3), Guidance(scale=2.0))[0]
                        for batch in batches_of_rank(6, 4, 0, 1)])
    again = tmp_path / "again.npz"
    write_npz_streaming(again, 6, (16, 16, 3), to_uint8(images).numpy(), np.zeros(6))
    net = evaluator.InceptionFeatures(graph)
    ref_pool, sample_pool = evaluator.batch_activations(net, ref)[0], evaluator.batch_activations(net, again)[0]
    assert {k for k, v in metrics.items() if isinstance(v, float)} == {"inception_score", "fid", "sfid", "precision",
                                                                        "recall"}
    assert (metrics["protocol"]["step"], metrics["protocol"]["steps"], metrics["protocol"]["weights"]) == (2, 3, "ema")
    assert metrics["fid"] == pytest.approx(frechet_distance_of_few(sample_pool, ref_pool), rel=1e-4)

    log = (exp / "log.txt").read_text()
    assert f"evaluation at step 2: inception_score {metrics['inception_score']:.4g}, fid {metrics['fid']:.4g}" in log
    assert read_scalars(exp / "tensorboard")["eval/fid"] == [(2, pytest.approx(metrics["fid"], rel=1e-6))]


def test_a_failing_evaluation_is_one_line_and_training_goes_on(tiny_data, tmp_path, monkeypatch):
    bad_ref = tmp_path / "float_images.npz"
    np.savez(bad_ref, arr_0=np.zeros((4, 16, 16, 3), np.float32))
    calls, real_generate = [], udit.monitor.generate

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)\nmore detail")
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(udit.monitor, "generate", out_of_memory_once)
    assert train.main(["--data-path", str(tiny_data["small_images"]), *TINY, "--max-steps", "2",
                       "--sample-every", "0", "--eval-every", "1", "--eval-samples", "4", "--eval-ref", str(bad_ref),
                       "--eval-sampling-steps", "2",
                       "--results-dir", str(tmp_path / "r")]) == 0
    log = (the_experiment(tmp_path / "r") / "log.txt").read_text()
    failures = [line for line in log.splitlines() if "evaluation at step" in line and "failed" in line]
    assert len(failures) == 2, failures  # step 1 while sampling, step 2 while scoring
    assert "step 1 failed while sampling (RuntimeError: CUDA out of memory (simulated)); training goes on" in failures[0]
    assert "step 2 failed: evaluator.py: error:" in failures[1] and "dtype float32, expected uint8" in failures[1]
    assert "done: step 2" in log


def test_an_evaluation_is_skipped_while_the_previous_one_is_scored(tmp_path):
    lines = []
    monitor = SimpleNamespace(exp_dir=tmp_path, rank=0, world_size=1, device=torch.device("cpu"),
                              logger=SimpleNamespace(info=lambda fmt, *args: lines.append(fmt % args)))
    evaluation = Evaluation(monitor, SimpleNamespace(eval_samples=4, global_seed=0), 2)
    evaluation.pending = (100, SimpleNamespace(poll=lambda: None), 0.0, 0.0)  # a scorer still running
    evaluation.run(200, ema=None)
    assert lines == ["evaluation at step 200 skipped: the evaluation of step 100 is still being scored "
                     "(raise --eval-every)"]
    assert list((tmp_path / "eval").iterdir()) == []  # nothing sampled


def test_clipping_scales_the_gradients_to_max_norm(tiny_data, tmp_path):
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
    hook = register_optimizer_step_pre_hook(record)
    try:
        assert train.main(["--data-path", str(tiny_data["small_images"]), *TINY, "--max-steps", "3",
                           "--log-every", "1", "--sample-every", "0", "--max-grad-norm", "1e-3",
                           "--results-dir", str(tmp_path)]) == 0
    finally:
        hook.remove()
    assert norms == pytest.approx([1e-3] * 3, rel=1e-4)  # what the optimizer steps with
    log = (the_experiment(tmp_path) / "log.txt").read_text()
    pre_clip = [float(g) for g in re.findall(r"Grad Norm: (\S+),.*clipped: 100%", log)]
    assert len(pre_clip) == 3 and min(pre_clip) > 0.1  # the norms that were clipped


def test_bad_monitor_flags_exit_2_with_one_line(tiny_data, tmp_path, capsys):
    for flags, message in [(["--eval-every", "10"], "--eval-every needs --eval-ref"),
                           (["--eval-every", "10", "--eval-ref", str(tmp_path / "absent.npz")], "no such file"),
                           (["--max-grad-norm", "0"], "--max-grad-norm: must be a number > 0"),
                           (["--sample-every", "-1"], "--sample-every: must be an integer >= 0")]:
        with pytest.raises(SystemExit) as info:
            train.main(["--data-path", str(tiny_data["small_images"]), *TINY, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and message in err[-1]
    # Guided evaluation of a model without a null label, refused before the results folder exists.
    with pytest.raises(SystemExit) as info:
        train.main(["--data-path", str(tiny_data["small_images"]), *TINY, "--results-dir", str(tmp_path / "r"),
                    "--class-dropout-prob", "0", "--eval-every", "1", "--eval-command", "true", "--eval-cfg-scale", "4",
                    "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "--eval-cfg-scale 4 needs the null label" in err[-1]
    assert not (tmp_path / "r").exists()
    assert train.main(["--data-path", str(tiny_data["small_images"]), *TINY, "--sample-classes", "5",
                       "--results-dir", str(tmp_path)]) == 2
    assert "--sample-classes [5]: not among the classes this run trains (0, 1)" in capsys.readouterr().err
