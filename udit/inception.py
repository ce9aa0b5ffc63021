"""ADM's Inception network (the 2015 `classify_image_graph_def.pb`) run as torch operations, no TensorFlow.

OpenAI's evaluator (guided-diffusion/evaluations/evaluator.py) feeds float32 0..255 NHWC
images into `ExpandDims:0` of the 2015-12-05 Inception graph and reads `pool_3:0`
(N, 1, 1, 2048), `mixed_6/conv:0` (N, 17, 17, 192; the first 7 channels are sFID's
features) and the 2048 x 1008 weight of `softmax/logits/MatMul` (IS). This module reads
that GraphDef with the protobuf classes tensorboard ships and interprets its nodes as
torch operations, so the weights are byte for byte the ones ADM uses and every tensor
ADM reads exists here under its own name.

The graph predates TensorFlow 1.0. Its op types, as the published conversions of it
(pytorch-fid, torch-fidelity, NVIDIA's inception-2015-12-05 port) and ADM's evaluator
show, are the ones in OPS; each is reproduced as TensorFlow 1.x computes it:

- Conv2D / MaxPool / AvgPool with SAME padding: out = ceil(in / stride), and an odd total
  padding puts the extra row / column at the bottom / right (TF's rule; torch's own
  padding is symmetric). AvgPool divides by the number of real (non-padding) inputs.
- BatchNormWithGlobalNormalization (removed from GraphDef version 9 on):
  (x - mean) * rsqrt(var + eps) * gamma + beta, gamma only with scale_after_normalization.
- Concat: the old op whose *first* input is the axis (ConcatV2 puts it last).
- ResizeBilinear, legacy (align_corners and half_pixel_centers false): source coordinate
  = dst * in / out with no half-pixel offset, neighbours clamped at the border.
- Reshape: `pool_3/_reshape` hard-codes batch 1 ([1, 2048]); a shape whose leading 1 does
  not fit the input is taken as batch-N.
- CheckNumerics and Identity pass values through; control inputs (`^name`) order nothing
  in a pure function and are skipped. DecodeJpeg and Cast, which turn a JPEG string into
  `ExpandDims`' input, are never reached: images are fed at `ExpandDims:0`, as ADM does.

Tensors keep TensorFlow's NHWC layout; a spatial op views it as channels-last NCHW
(a permute, no copy), which is the layout torch's convolutions run fastest in. TF32 is off
for convolutions so a GPU computes in full float32 like TensorFlow.

    graph = TFGraph.from_file("classify_image_graph_def.pb", device="cuda")
    pool, spatial = graph.run(["pool_3:0", "mixed_6/conv:0"], {"ExpandDims:0": images})
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from udit.cli import ActionableError

INPUT_NAME = "ExpandDims:0"
POOL_NAME = "pool_3:0"
SPATIAL_NAME = "mixed_6/conv:0"
SOFTMAX_MATMUL = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7


class GraphError(ActionableError):
    """A GraphDef this interpreter cannot run (unknown op, missing tensor, unsupported attribute)."""


def tensor_name(name):
    """'node:k' or 'node' -> ('node', k)."""
    node, _, index = name.partition(":")
    return node, int(index or 0)


def attr(node, key, default=None):
    """The Python value of a node attribute (int, float, bool, bytes, list of ints) or `default`."""
    if key not in node.attr:
        return default
    value = node.attr[key]
    kind = value.WhichOneof("value")
    if kind == "list":
        return list(value.list.i)
    return getattr(value, kind)


#################################################################################
#                                  The ops                                      #
#################################################################################

OPS = {}


def op(*types):
    """Register fn(graph, node, inputs) -> output tensor for these TensorFlow op types."""
    def register(fn):
        for t in types:
            OPS[t] = fn
        return fn
    return register


def same_padding(size, kernel, stride):
    """TensorFlow's SAME padding of one axis: (before, after); the odd one goes after (bottom / right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def window(node, x, kernel):
    """(stride_h, stride_w), pads (top, bottom, left, right) of a NHWC conv or pool node on x (N, H, W, C)."""
    if attr(node, "data_format", b"NHWC") != b"NHWC":
        raise GraphError(f"node '{node.name}' ({node.op}): data_format {attr(node, 'data_format').decode()} "
                         f"is not supported; the Inception graph is NHWC")
    strides = attr(node, "strides")
    if len(strides) != 4 or strides[0] != 1 or strides[3] != 1:
        raise GraphError(f"node '{node.name}' ({node.op}): strides {strides} are not [1, h, w, 1]")
    padding = attr(node, "padding")
    if padding == b"VALID":
        pads = (0, 0, 0, 0)
    elif padding == b"SAME":
        pads = same_padding(x.shape[1], kernel[0], strides[1]) + same_padding(x.shape[2], kernel[1], strides[2])
    else:
        raise GraphError(f"node '{node.name}' ({node.op}): padding {padding.decode()} is not SAME or VALID")
    return (strides[1], strides[2]), pads


def nchw(x):
    return x.permute(0, 3, 1, 2)  # a channels-last view of the NHWC data, no copy


def nhwc(x):
    return x.permute(0, 2, 3, 1)


@op("Const")
def const_op(graph, node, inputs):
    return graph.constant(node.name)


@op("Identity", "CheckNumerics")
def identity_op(graph, node, inputs):
    return inputs[0]


@op("Conv2D")
def conv2d_op(graph, node, inputs):
    x, w = inputs
    if any(d != 1 for d in attr(node, "dilations", [1, 1, 1, 1])):
        raise GraphError(f"node '{node.name}' (Conv2D): dilations are not supported")
    (sh, sw), (top, bottom, left, right) = window(node, x, w.shape[:2])
    weight, bias = graph.cached(node.name, lambda: conv_weights(graph, node, w))
    x = nchw(x)
    if top == bottom and left == right:
        return nhwc(F.conv2d(x, weight, bias, stride=(sh, sw), padding=(top, left)))
    return nhwc(F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride=(sh, sw)))


def conv_weights(graph, node, w):
    """(weight (out, in, kh, kw) channels-last, bias or None) of a Conv2D, with its batch norm folded in.

    The batch norm that alone reads a convolution is linear: (conv(x, w) - mean) * s + beta
    = conv(x, w * s) + (beta - mean * s), s = gamma / sqrt(var + eps). Folding it saves
    three passes over every activation map; it changes float32 rounding only (~1e-7).
    """
    weight = w.permute(3, 2, 0, 1)
    bias = None
    bn = graph.folded.get(node.name)
    if bn is not None:
        scale, shift = batch_norm_affine(bn, [graph.constant(tensor_name(i)[0]) for i in bn.input[1:5]])
        weight, bias = weight * scale.view(-1, 1, 1, 1), shift
    return weight.contiguous(memory_format=torch.channels_last), bias


def batch_norm_affine(node, stats):
    """(scale, shift) of BatchNormWithGlobalNormalization: out = x * scale + shift."""
    mean, var, beta, gamma = stats
    scale = torch.rsqrt(var + attr(node, "variance_epsilon"))
    if attr(node, "scale_after_normalization"):
        scale = scale * gamma
    return scale, beta - mean * scale


def pool_window(node, x):
    """(x as NCHW, kernel, stride, pads (left, right, top, bottom), symmetric) of a MaxPool / AvgPool node.

    symmetric: torch's own padding can do it (even on both sides, at most half the kernel).
    """
    ksize = attr(node, "ksize")
    kernel = (ksize[1], ksize[2])
    stride, (top, bottom, left, right) = window(node, x, kernel)
    symmetric = top == bottom and left == right and 2 * top <= kernel[0] and 2 * left <= kernel[1]
    return nchw(x), kernel, stride, (left, right, top, bottom), symmetric


@op("MaxPool")
def max_pool_op(graph, node, inputs):
    x, kernel, stride, pads, symmetric = pool_window(node, inputs[0])
    if symmetric:
        return nhwc(F.max_pool2d(x, kernel, stride, padding=(pads[2], pads[0])))  # torch pads with -inf too
    return nhwc(F.max_pool2d(F.pad(x, pads, value=-math.inf), kernel, stride))


@op("AvgPool")
def avg_pool_op(graph, node, inputs):
    x, kernel, stride, pads, symmetric = pool_window(node, inputs[0])
    if symmetric:
        return nhwc(F.avg_pool2d(x, kernel, stride, padding=(pads[2], pads[0]), count_include_pad=False))
    # Uneven SAME padding: window sums over zero padding, divided by the count of real inputs.
    sums = F.avg_pool2d(F.pad(x, pads), kernel, stride)
    counts = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), pads), kernel, stride)
    return nhwc(sums / counts)


@op("BatchNormWithGlobalNormalization")
def batch_norm_op(graph, node, inputs):
    x, mean, var, beta, gamma = inputs
    if node.name in graph.folded_into:
        return x  # already applied by the convolution it reads (conv_weights)
    scale = torch.rsqrt(var + attr(node, "variance_epsilon"))
    if attr(node, "scale_after_normalization"):
        scale = scale * gamma
    return (x - mean) * scale + beta


@op("Relu")
def relu_op(graph, node, inputs):
    return F.relu(inputs[0])


@op("Concat")
def concat_op(graph, node, inputs):
    axis = int(graph.static(node.input[0]))
    return torch.cat(inputs[1:], dim=axis)


@op("Reshape")
def reshape_op(graph, node, inputs):
    x = inputs[0]
    shape = [int(s) for s in graph.static(node.input[1])]
    if shape and shape[0] == 1 and -1 not in shape and math.prod(shape) != x.numel():
        shape[0] = -1  # pool_3/_reshape's [1, 2048]: the batch of 1 it was frozen with becomes N
    return x.reshape(shape)


@op("ExpandDims")
def expand_dims_op(graph, node, inputs):
    return inputs[0].unsqueeze(int(graph.static(node.input[1])))


@op("ResizeBilinear")
def resize_bilinear_op(graph, node, inputs):
    if attr(node, "align_corners", False) or attr(node, "half_pixel_centers", False):
        raise GraphError(f"node '{node.name}' (ResizeBilinear): only the legacy mode (align_corners and "
                         f"half_pixel_centers false) of the 2015 graph is implemented")
    height, width = (int(s) for s in graph.static(node.input[1]))
    return resize_bilinear_legacy(inputs[0], height, width)


def resize_bilinear_legacy(x, height, width):
    """TensorFlow 1.x ResizeBilinear, align_corners=False: x (N, H, W, C) float -> (N, height, width, C).

    TF's legacy scaler maps output pixel i to source coordinate i * (in / out) (float32),
    without the half-pixel offset torch's align_corners=False uses; the top-left
    neighbour is floor(coordinate), the other one is clamped to the last row / column.
    """
    def axis(size_in, size_out):
        scale = np.float32(size_in) / np.float32(size_out)
        coord = np.arange(size_out, dtype=np.float32) * scale
        low = np.floor(coord).astype(np.int64)
        high = np.minimum(low + 1, size_in - 1)
        lerp = torch.from_numpy(coord - low.astype(np.float32)).to(x.device)
        return torch.from_numpy(low).to(x.device), torch.from_numpy(high).to(x.device), lerp

    y0, y1, ly = axis(x.shape[1], height)
    x0, x1, lx = axis(x.shape[2], width)
    rows_top, rows_bottom = x.index_select(1, y0), x.index_select(1, y1)
    lx = lx.view(1, 1, -1, 1)
    top = rows_top.index_select(2, x0) + (rows_top.index_select(2, x1) - rows_top.index_select(2, x0)) * lx
    bottom = (rows_bottom.index_select(2, x0)
              + (rows_bottom.index_select(2, x1) - rows_bottom.index_select(2, x0)) * lx)
    return top + (bottom - top) * ly.view(1, -1, 1, 1)


@op("Sub")
def sub_op(graph, node, inputs):
    return inputs[0] - inputs[1]


@op("Mul")
def mul_op(graph, node, inputs):
    return inputs[0] * inputs[1]


@op("Add")
def add_op(graph, node, inputs):
    return inputs[0] + inputs[1]


@op("MatMul")
def matmul_op(graph, node, inputs):
    a, b = inputs
    if attr(node, "transpose_a", False):
        a = a.t()
    if attr(node, "transpose_b", False):
        b = b.t()
    return a @ b


@op("Softmax")
def softmax_op(graph, node, inputs):
    return torch.softmax(inputs[0], dim=-1)


#################################################################################
#                              The interpreter                                  #
#################################################################################

def read_graph_def(path):
    """Parse a binary GraphDef with tensorboard's protobuf classes (no TensorFlow import)."""
    from tensorboard.compat.proto import graph_pb2
    graph_def = graph_pb2.GraphDef()
    try:
        graph_def.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise GraphError(f"{path}: not a TensorFlow GraphDef ({type(err).__name__}: {err}); download it again") from None
    if not graph_def.node:
        raise GraphError(f"{path}: a GraphDef without nodes; download it again")
    return graph_def


class TFGraph:
    """A frozen TensorFlow GraphDef evaluated node by node with torch on `device`.

    run(outputs, feeds) evaluates only the nodes the outputs depend on, stopping at the
    fed tensors; the constants move to the device once and stay there.
    """

    def __init__(self, graph_def, device="cpu", source="graph"):
        self.nodes = {node.name: node for node in graph_def.node}
        self.device = torch.device(device)
        self.source = source
        self._constants, self._cache, self._plans = {}, {}, {}
        self.folded, self.folded_into = self.batch_norms_to_fold()

    def batch_norms_to_fold(self):
        """({conv name: batch norm node}, {batch norm names}) for each Conv2D read only by a constant batch norm."""
        readers = {}
        for node in self.nodes.values():
            for i in node.input:
                if not i.startswith("^"):
                    readers.setdefault(tensor_name(i)[0], []).append(node)
        folded = {}
        for node in self.nodes.values():
            if node.op != "BatchNormWithGlobalNormalization" or len(node.input) != 5:
                continue
            source = self.nodes.get(tensor_name(node.input[0])[0])
            stats = [self.nodes.get(tensor_name(i)[0]) for i in node.input[1:5]]
            if (source is not None and source.op == "Conv2D" and readers.get(source.name) == [node]
                    and all(s is not None and s.op == "Const" for s in stats)):
                folded[source.name] = node
        return folded, {bn.name for bn in folded.values()}

    @classmethod
    def from_file(cls, path, device="cpu"):
        return cls(read_graph_def(path), device, source=str(path))

    def node(self, name):
        if name not in self.nodes:
            raise GraphError(f"{self.source}: no node '{name}'; this is not the 2015 Inception graph "
                             f"classify_image_graph_def.pb (download it again)")
        return self.nodes[name]

    def static(self, name):
        """The numpy value of a Const tensor (shapes, axes, sizes), through Identity nodes."""
        node = self.node(tensor_name(name)[0])
        while node.op == "Identity":
            node = self.node(tensor_name(node.input[0])[0])
        if node.op != "Const":
            raise GraphError(f"{self.source}: '{name}' must be a constant (it is a {node.op})")
        from tensorboard.util import tensor_util
        return tensor_util.make_ndarray(node.attr["value"].tensor)

    def constant(self, name):
        if name not in self._constants:
            value = self.static(name)
            if value.dtype.kind not in "fiub":
                raise GraphError(f"{self.source}: constant '{name}' of dtype {value.dtype} cannot be a torch tensor")
            self._constants[name] = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
        return self._constants[name]

    def cached(self, key, make):
        """A value derived once from constants (e.g. a weight in torch's layout)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def plan(self, outputs, feeds):
        """Nodes to evaluate for `outputs`, in dependency order, stopping at the tensors in `feeds`.

        Raises GraphError naming the first node whose op type is not in OPS, an output or
        input that is not in the graph, or a Placeholder that is not fed.
        """
        key = (tuple(outputs), tuple(sorted(feeds)))
        if key in self._plans:
            return self._plans[key]
        for name in feeds:
            node = self.node(tensor_name(name)[0])
            if tensor_name(name)[1] != 0:
                raise GraphError(f"{self.source}: cannot feed '{name}' (node {node.name} has one output)")
        order, done = [], set(tensor_name(f)[0] for f in feeds)
        stack = [(tensor_name(o)[0], False) for o in reversed(outputs)]
        while stack:  # iterative depth-first post-order: the graph is ~1,000 nodes deep in places
            name, expanded = stack.pop()
            if name in done:
                continue
            node = self.node(name)
            if expanded:
                done.add(name)
                order.append(node)
                continue
            if node.op == "Placeholder":
                raise GraphError(f"{self.source}: placeholder '{name}' is needed but not fed; feed {INPUT_NAME}")
            if node.op not in OPS:
                raise GraphError(f"{self.source}: node '{name}' uses the TensorFlow op {node.op}, which "
                                 f"udit/inception.py does not implement (it runs {', '.join(sorted(OPS))}); "
                                 f"use --backend tf for this graph")
            stack.append((name, True))
            stack.extend((tensor_name(i)[0], False) for i in reversed(node.input) if not i.startswith("^"))
        last_use = {}
        for step, node in enumerate(order):
            for i in node.input:
                if not i.startswith("^"):
                    last_use[tensor_name(i)[0]] = step
        self._plans[key] = (order, last_use)
        return self._plans[key]

    @torch.no_grad()
    def run(self, outputs, feeds=None):
        """Evaluate the tensors named in `outputs` given {tensor name: tensor} feeds; a list of tensors."""
        feeds = feeds or {}
        order, last_use = self.plan(outputs, feeds)
        keep = {tensor_name(o)[0] for o in outputs}
        values = {tensor_name(k)[0]: v.to(self.device) for k, v in feeds.items()}
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            for step, node in enumerate(order):
                inputs = [values[tensor_name(i)[0]] for i in node.input if not i.startswith("^")]
                values[node.name] = OPS[node.op](self, node, inputs)
                for i in set(node.input):  # free what no later node reads
                    name = tensor_name(i)[0]
                    if last_use.get(name) == step and name not in keep and name in values:
                        del values[name]
        return [values[tensor_name(o)[0]] for o in outputs]


#################################################################################
#                         ADM's features, torch backend                          #
#################################################################################

def resolve_device(device=None):
    """torch.device for --device (default: cuda when available, else cpu); ActionableError if unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ActionableError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ActionableError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use --device cpu")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: not built into this torch, or hold no data
        raise ActionableError(f"--device {device}: the evaluator runs on cpu or cuda; use --device cpu or cuda:N")
    return device


class InceptionTorch:
    """ADM's evaluator network on torch: pool_3 and spatial features, class probabilities, distances.

    The same interface as evaluator.InceptionFeatures (the TensorFlow backend):
    activations(batches) -> (pool (N, 2048), spatial (N, 2023)) float32 numpy;
    class_probabilities(pool) -> (N, 1008); distances(u, v) -> squared distances.
    """

    backend = "torch"

    def __init__(self, graph_path, device=None):
        device = resolve_device(device)
        self.graph_path = Path(graph_path)
        self.graph = TFGraph.from_file(graph_path, device)
        self.device = self.graph.device
        self.graph.plan([POOL_NAME, SPATIAL_NAME], [INPUT_NAME])  # unknown ops fail here, before any image
        matmul = self.graph.node(SOFTMAX_MATMUL)
        if matmul.op != "MatMul" or len(matmul.input) < 2:
            raise GraphError(f"{graph_path}: '{SOFTMAX_MATMUL}' is a {matmul.op}, not the MatMul of the logits")
        (self.logits_weight,) = self.graph.run([matmul.input[1]])  # (2048, 1008), no bias: as ADM

    def features(self, images):
        """uint8 or float images (N, H, W, 3) 0..255 -> pool (N, 2048), spatial (N, 17 * 17 * 7) float32 tensors."""
        x = torch.tensor(images, dtype=torch.float32, device=self.device)  # a copy: batches are read-only buffers
        pool, spatial = self.graph.run([POOL_NAME, SPATIAL_NAME], {INPUT_NAME: x})
        spatial = spatial[..., :SPATIAL_CHANNELS]  # NHWC: flattened in H, W, C order, as ADM's TF reshape
        return pool.reshape(len(x), -1), spatial.reshape(len(x), -1)

    def activations(self, batches, total=None, desc="activations"):
        from tqdm.auto import tqdm
        pools, spatials = [], []
        for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
            pool, spatial = self.features(np.asarray(batch))
            pools.append(pool.cpu().numpy())
            spatials.append(spatial.cpu().numpy())
        return np.concatenate(pools), np.concatenate(spatials)

    @torch.no_grad()
    def class_probabilities(self, pool_features, batch_size=512):
        """softmax(pool_3 @ W) with W the weight of softmax/logits/MatMul, no bias, as ADM's evaluator."""
        out = []
        for i in range(0, len(pool_features), batch_size):
            x = torch.from_numpy(np.asarray(pool_features[i:i + batch_size], np.float32)).to(self.device)
            out.append(torch.softmax(x @ self.logits_weight, dim=1).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def distances(self, u, v):
        """Squared Euclidean distances (len(u), len(v)) float32, rounded as ADM's float16 graph rounds them.

        ADM computes max(|u|^2 - 2 u.v + |v|^2, 0) on float16 copies and keeps that result
        unless a value is not finite (2 u.v overflows float16), then recomputes in float32.
        The float16 rounding decides which points sit inside a k-NN ball, so it is
        reproduced op by op: see adm_float16_distances.
        """
        u = torch.from_numpy(np.asarray(u, np.float32)).to(self.device)
        v = torch.from_numpy(np.asarray(v, np.float32)).to(self.device)
        d16 = adm_float16_distances(u.half(), v.half())
        if torch.isfinite(d16).all():
            return d16.float().cpu().numpy()
        return pairwise_sq_distances(u, v).cpu().numpy()


def pairwise_sq_distances(u, v):
    """float32 (len(u), len(v)) squared distances |u|^2 - 2 u.v + |v|^2, clamped at 0."""
    norm_u = (u * u).sum(1, keepdim=True)
    norm_v = (v * v).sum(1, keepdim=True).t()
    return torch.clamp(norm_u - 2 * (u @ v.t()) + norm_v, min=0.0)


def adm_float16_distances(u, v):
    """ADM's float16 distance graph on float16 u (N, D), v (M, D): every op rounds to float16.

    square -> reduce_sum (rounded as TensorFlow's CPU kernel sums float16: eigen_half_row_sum)
    -> |u|^2 - 2 u.v (float16 matmul, float32 accumulation) -> + |v|^2 -> max(., 0).
    """
    norm_u = eigen_half_row_sum(u * u)[:, None]
    norm_v = eigen_half_row_sum(v * v)[None, :]
    return torch.clamp((norm_u - 2 * half_matmul(u, v.t())) + norm_v, min=0)


def half_matmul(a, b):
    """float16 a @ b accumulated in float32, as TensorFlow's kernels do (cuBLAS may otherwise reduce in float16)."""
    if a.device.type != "cuda":
        return a @ b
    previous = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = previous


def eigen_half_row_sum(x, lanes=8, leaf=1024):
    """Row sums of float16 x (N, D) in the order of Eigen's inner-most-dimension reducer (TF's CPU reduce_sum).

    Eigen halves a row recursively down to `leaf` values; a leaf is summed in four packet
    accumulators of `lanes` float16 values (each add rounded to float16), combined, then
    horizontally summed in float32 and rounded; the values that fill no packet are added
    one by one. Matches tf.reduce_sum on float16 bit for bit (checked on TF 2.21, x86-64).
    """
    n = x.shape[1]
    if n > leaf:
        half = n // 2
        return eigen_half_row_sum(x[:, :half], lanes, leaf) + eigen_half_row_sum(x[:, half:], lanes, leaf)
    block = 4 * lanes
    n4, n1 = n // block * block, n // lanes * lanes
    accs = torch.zeros(x.shape[0], 4, lanes, dtype=x.dtype, device=x.device)
    for start in range(0, n4, block):
        accs = accs + x[:, start:start + block].reshape(-1, 4, lanes)
    acc = accs[:, 0]
    for start in range(n4, n1, lanes):
        acc = acc + x[:, start:start + lanes]
    acc = ((acc + accs[:, 1]) + accs[:, 2]) + accs[:, 3]
    scalar = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(n1, n):
        scalar = scalar + x[:, j]
    return scalar + acc.float().sum(1).half()
