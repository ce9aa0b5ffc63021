"""GraphedForward's bookkeeping (static inputs, re-recording, fresh outputs), with the recorder replaced.

CUDA graphs themselves need a GPU; bench/gpu_check.py compares sample_ddp.py with and
without --cuda-graph on one.
"""

import torch

import udit.cuda_graphs as cuda_graphs
from udit.cuda_graphs import GraphedForward


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
