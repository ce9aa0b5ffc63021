"""The bookkeeping around CUDA graphs (static inputs, re-recording, fresh outputs, gradient
buffers and their all-reduce), with the recorder replaced.

CUDA graphs themselves need a GPU; bench/gpu_check.py compares sample_ddp.py and
train.py with and without --cuda-graph on one.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
import udit.cuda_graphs as cuda_graphs
from conftest import TINY_UDIT_KWARGS
from udit.cuda_graphs import GraphedForward, GraphedTrainingStep
from udit.trainer import DDPBackend, parse_training_args, training_parser
from udit.trainer import train as run_training


class Recorder:
    """Stands in for a CUDA graph: replay() reruns the recorded function on whatever the buffers hold."""

    recorded = 0

    def __init__(self, fn):
        Recorder.recorded += 1
        fn()
        self.replay = fn


def test_replays_on_new_inputs_and_rerecords_only_on_new_shapes(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "capture", lambda fn: Recorder(fn))
    Recorder.recorded = 0

    def forward(x, t, y, cfg_scale):
        return x * t[:, None] + y[:, None] * cfg_scale

    graphed = GraphedForward(forward)
    gen = torch.Generator().manual_seed(0)
    outputs = []
    for n in (4, 4, 4, 6, 6):
        x, t, y = torch.randn(n, 3, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        out = graphed(x, t, y=y, cfg_scale=2.0)
        torch.testing.assert_close(out, forward(x, t, y, 2.0), rtol=0, atol=0)
        outputs.append(out)
    assert Recorder.recorded == 2  # one per batch shape
    assert not torch.equal(outputs[0], outputs[1])  # each call returns its own tensor, not the static buffer
    graphed(x, t, y=y, cfg_scale=3.0)
    assert Recorder.recorded == 3  # a new non-tensor argument is a new graph


class Deferred:
    """Records without running, so that the random stream matches eager training (a real
    capture's warm-up runs draw from it but change no weight); replay() runs the function."""

    def __init__(self, fn):
        self.replay = fn


def training_args(data, results, *extra):
    parser = training_parser("test")
    return parse_training_args(parser, ["--data-path", str(data), "--vae", "none", "--image-size", "16", "--model", "U-DiT-S",
                              "--model-kwargs", TINY_UDIT_KWARGS, "--num-classes", "2", "--global-batch-size", "4",
                              "--num-workers", "0", "--max-steps", "3", "--sample-every", "0", "--results-dir",
                              str(results), *extra])


@pytest.mark.parametrize("clipping", [[], ["--max-grad-norm", "0.05"], ["--objective", "flow"],
                                      ["--objective", "flow", "--repa", "--projector-width", "16"]],
                         ids=["", "clipped", "flow", "flow-u-repa"])
def test_graphed_training_steps_match_eager_ones(tiny_data, tmp_path, monkeypatch, clipping):
    monkeypatch.setattr(cuda_graphs, "capture", Deferred)
    if "--repa" in clipping:  # the encoder's targets are a static input of the graph, like x
        from test_alignment import make_tiny_encoder
        clipping = [*clipping, "--encoder", str(make_tiny_encoder(tmp_path / "encoder.pt"))]
    states = []
    for cuda_graph in (False, True):
        exp_dir = run_training(training_args(tiny_data["small_images"], tmp_path / str(cuda_graph), *clipping),
                               DDPBackend("fp32", cuda_graph=cuda_graph))
        ckpt = torch.load(exp_dir / "checkpoints" / "0000003.pt", map_location="cpu", weights_only=True)
        states.append((ckpt["model"], ckpt["ema"], ckpt["opt"]["state"]))
        if "--repa" in clipping:
            states[-1][0].update({f"aligner.{k}": v for k, v in ckpt["aligner"].items()})
    (model_a, ema_a, opt_a), (model_b, ema_b, opt_b) = states
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    assert not all(torch.equal(model_a[k], ema_a[k]) for k in model_a)  # the weights did train


def test_graphed_training_refuses_what_cannot_be_recorded(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # refused while parsing, before the CUDA check and any folder
        train.main(["--data-path", str(tiny_data["small_images"]), "--results-dir", str(tmp_path), "--cuda-graph",
                    "--grad-checkpointing"])
    assert info.value.code == 2 and "does not combine with --compile or --grad-checkpointing" in capsys.readouterr().err
    assert not tmp_path.joinpath("000-U-DiT-B").exists()
    with pytest.raises(SystemExit) as info:
        train.main(["--data-path", str(tiny_data["small_images"]), "--cuda-graph"])
    assert info.value.code == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def _average_gradients_worker(rank, world, init_file, results):
    cuda_graphs.capture = Deferred
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each process starts from its own weights, as train.py's do
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model.register_buffer("counter", torch.full((2,), float(rank)))
    DDPBackend.prepare(SimpleNamespace(world_size=world, cuda_graph=True), model, None)  # rank 0's weights everywhere
    gathered = [torch.zeros(sum(p.numel() for p in model.parameters()) + 2) for _ in range(world)]
    dist.all_gather(gathered, torch.cat([*(p.detach().flatten() for p in model.parameters()), model.counter]))
    same_start = all(torch.equal(g, gathered[0]) for g in gathered) and model.counter.sum() == 0
    data = torch.randn(world, 5, 3, generator=torch.Generator().manual_seed(1))

    def loss_fn(x, t, y):
        return {"loss": model(x).square().mean() * t.sum() + y.sum()}

    step = GraphedTrainingStep(loss_fn, model.parameters())
    losses = [step(data[rank], torch.ones(1), torch.zeros(1))["loss"] for _ in range(2)]
    # What each process's own gradients average to, computed eagerly from all batches.
    reference = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    reference.load_state_dict(model.state_dict(), strict=False)  # all but the buffer
    sum(reference(batch).square().mean() for batch in data).div(world).backward()
    results[rank] = (same_start and torch.equal(losses[0], losses[1]) and losses[0].item() > 0
                     and all(torch.allclose(p.grad, q.grad, atol=1e-7)
                             for p, q in zip(model.parameters(), reference.parameters())))
    dist.destroy_process_group()


def test_graphed_training_starts_equal_and_averages_gradients_over_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_average_gradients_worker, args=(2, tmp_path / "init", results), nprocs=2)
    assert dict(results) == {0: True, 1: True}
