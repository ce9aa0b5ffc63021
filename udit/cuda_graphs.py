"""CUDA-graph replay for fixed-shape GPU work.

In eager mode a U-DiT step is bound by the host, not the GPU: its 44 thin transformer
layers launch about three times as many kernels as DiT-XL/2 for a sixth of the work, so
on an H200 U-DiT-B and U-DiT-L take the same time per step. Recording the kernels of
one call in a CUDA graph and replaying it removes the per-kernel launch cost: for
sampling (GraphedForward) and for training (GraphedTrainingStep).
"""

import torch
import torch.distributed as dist


def capture(fn, warmup=3):
    """Run fn `warmup` times on a side stream, then record one call of it; returns the CUDAGraph.

    fn must not synchronise with the host, and must enter any autocast region itself (the
    autocast weight cache must not outlive one call, or the casts are not recorded).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class GraphedForward:
    """forward(x, t, **kwargs) replayed from a CUDA graph: the same outputs, one launch.

    Tensor arguments are copied into static buffers before each replay; the graph is
    recorded on the first call and again whenever tensor shapes or non-tensor arguments
    change. The weights must stay as they are while the graph is in use: a U-DiT in eval
    mode derives tensors from them (folded FFN, attention constants) once, before
    recording, and every replay reads those. Returns a fresh tensor each call.
    """

    def __init__(self, forward):
        self.forward = forward
        self.key = None

    def __call__(self, x, t, **kwargs):
        tensors = {"x": x, "t": t, **{k: v for k, v in kwargs.items() if torch.is_tensor(v)}}
        others = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
        key = (tuple((k, v.shape, v.dtype, v.device) for k, v in tensors.items()), sorted(others.items()))
        if key != self.key:
            self.key, self.graph = None, None  # free the old graph's memory before recording anew
            self.static = {k: v.clone() for k, v in tensors.items()}

            def call():
                static_kwargs = {k: v for k, v in self.static.items() if k not in ("x", "t")}
                self.output = self.forward(self.static["x"], self.static["t"], **static_kwargs, **others)
            self.graph = capture(call)
            self.key = key
        for k, v in tensors.items():
            self.static[k].copy_(v)
        self.graph.replay()
        return self.output.clone()


class GraphedTrainingStep:
    """Forward and backward of a training step replayed from a CUDA graph; returns the loss terms.

    loss_fn(x, t, y, **features) -> dict of scalar tensors: "loss" is minimised, the others
    (e.g. the objective's parts) are returned with it; features: further batch tensors
    (the alignment encoder's targets), static like x. The graph is recorded on the first call (after
    capture's warm-up runs, which compute gradients but change no weight); later calls
    copy the batch into static buffers and replay. Gradients land in one flat buffer
    (zeroed inside the graph) that the parameters' `.grad` are views of, so that several
    processes average them with one all-reduce, outside the graph. The optimizer step
    stays outside too; it must not set the gradients to None.
    """

    def __init__(self, loss_fn, parameters):
        self.loss_fn = loss_fn
        params = [p for p in parameters if p.requires_grad]
        self.grads = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        offset = 0
        for p in params:
            p.grad = self.grads[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.static, self.graph, self.terms = None, None, None

    def _step(self):
        self.grads.zero_()
        features = {k: v for k, v in self.static.items() if k not in ("x", "t", "y")}
        self.terms = self.loss_fn(self.static["x"], self.static["t"], self.static["y"], **features)
        self.terms["loss"].backward()

    def __call__(self, x, t, y, **features):
        batch = {"x": x, "t": t, "y": y, **features}
        if self.graph is None:
            self.static = {k: v.clone() for k, v in batch.items()}
            self.graph = capture(self._step)
        else:
            for k, v in batch.items():
                if v.shape != self.static[k].shape:
                    raise ValueError(f"graphed training step recorded for {k} of shape "
                                     f"{tuple(self.static[k].shape)}, got {tuple(v.shape)} (batches must not vary)")
                self.static[k].copy_(v)
        self.graph.replay()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.grads)
            self.grads /= dist.get_world_size()
        return {name: value.detach().clone() for name, value in self.terms.items()}
