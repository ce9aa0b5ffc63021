"""Images per second of the evaluator's Inception network: torch backend vs TensorFlow, side by side.

    python bench/evaluator_speed.py [--graph classify_image_graph_def.pb] [--rounds 3] [--device cuda]

Without --graph (no network here) it times a stand-in with the real graph's architecture
and op types at full size (299 px input, the 2015 Inception-v3 layout: 94 conv layers,
mixed ... mixed_10, pool_3 2048) and random weights: the same work per image as the real
graph. Both backends read the same GraphDef and get the same uint8 256 px batches (ADM's
input, batch 64); rounds alternate between them and the median is reported. The features
of the two are compared too (max relative error).
"""

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from udit.cli import ArgumentParser, positive_int  # noqa: E402


def build_full_size_stand_in(path, seed=0):
    """The 2015 graph's layer layout (names, kernels, strides, paddings, widths) with random weights."""
    import tensorflow.compat.v1 as tf
    from test_evaluator import freeze_stand_in, stand_in_head, stand_in_input, stand_in_layers
    rng = np.random.default_rng(seed)

    graph = tf.Graph()
    with graph.as_default():
        const, conv = stand_in_layers(rng)

        def cat(name, values):
            return tf.raw_ops.Concat(concat_dim=tf.constant(3, name=f"{name}/join/concat_dim"), values=values,
                                     name=f"{name}/join")

        def pool(x, name, kind, stride=1, padding="SAME"):
            fn = tf.nn.avg_pool2d if kind == "avg" else tf.nn.max_pool2d
            return fn(x, ksize=3, strides=stride, padding=padding, name=name)

        x = stand_in_input(299)
        x = conv(x, "conv", 3, 3, 32, stride=2, padding="VALID")
        x = conv(x, "conv_1", 3, 3, 32, padding="VALID")
        x = conv(x, "conv_2", 3, 3, 64)
        x = pool(x, "pool", "max", 2, "VALID")
        x = conv(x, "conv_3", 1, 1, 80, padding="VALID")
        x = conv(x, "conv_4", 3, 3, 192, padding="VALID")
        x = pool(x, "pool_1", "max", 2, "VALID")
        for name, width in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):  # 35 x 35
            t = conv(conv(x, f"{name}/tower/conv", 1, 1, 48), f"{name}/tower/conv_1", 5, 5, 64)
            t1 = conv(conv(conv(x, f"{name}/tower_1/conv", 1, 1, 64), f"{name}/tower_1/conv_1", 3, 3, 96),
                      f"{name}/tower_1/conv_2", 3, 3, 96)
            t2 = conv(pool(x, f"{name}/tower_2/pool", "avg"), f"{name}/tower_2/conv", 1, 1, width)
            x = cat(name, [conv(x, f"{name}/conv", 1, 1, 64), t, t1, t2])
        t1 = conv(conv(conv(x, "mixed_3/tower/conv", 1, 1, 64), "mixed_3/tower/conv_1", 3, 3, 96),
                  "mixed_3/tower/conv_2", 3, 3, 96, stride=2, padding="VALID")
        x = cat("mixed_3", [conv(x, "mixed_3/conv", 3, 3, 384, stride=2, padding="VALID"), t1,
                            pool(x, "mixed_3/pool", "max", 2, "VALID")])  # 17 x 17 x 768
        for name, c7 in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
            t = conv(conv(conv(x, f"{name}/tower/conv", 1, 1, c7), f"{name}/tower/conv_1", 1, 7, c7),
                     f"{name}/tower/conv_2", 7, 1, 192)
            t1 = conv(x, f"{name}/tower_1/conv", 1, 1, c7)
            for i, (kh, kw) in enumerate(((7, 1), (1, 7), (7, 1))):
                t1 = conv(t1, f"{name}/tower_1/conv_{i + 1}", kh, kw, c7)
            t1 = conv(t1, f"{name}/tower_1/conv_4", 1, 7, 192)
            t2 = conv(pool(x, f"{name}/tower_2/pool", "avg"), f"{name}/tower_2/conv", 1, 1, 192)
            x = cat(name, [conv(x, f"{name}/conv", 1, 1, 192), t, t1, t2])  # mixed_6/conv: sFID's tensor
        t = conv(conv(x, "mixed_8/tower/conv", 1, 1, 192), "mixed_8/tower/conv_1", 3, 3, 320, stride=2,
                 padding="VALID")
        t1 = conv(x, "mixed_8/tower_1/conv", 1, 1, 192)
        for i, (kh, kw) in enumerate(((1, 7), (7, 1))):
            t1 = conv(t1, f"mixed_8/tower_1/conv_{i + 1}", kh, kw, 192)
        t1 = conv(t1, "mixed_8/tower_1/conv_3", 3, 3, 192, stride=2, padding="VALID")
        x = cat("mixed_8", [t, t1, pool(x, "mixed_8/pool", "max", 2, "VALID")])  # 8 x 8 x 1280
        for name, kind in (("mixed_9", "avg"), ("mixed_10", "max")):
            t = conv(x, f"{name}/tower/conv", 1, 1, 384)
            t = cat(f"{name}/tower/mixed", [conv(t, f"{name}/tower/mixed/conv", 1, 3, 384),
                                            conv(t, f"{name}/tower/mixed/conv_1", 3, 1, 384)])
            t1 = conv(conv(x, f"{name}/tower_1/conv", 1, 1, 448), f"{name}/tower_1/conv_1", 3, 3, 384)
            t1 = cat(f"{name}/tower_1/mixed", [conv(t1, f"{name}/tower_1/mixed/conv", 1, 3, 384),
                                               conv(t1, f"{name}/tower_1/mixed/conv_1", 3, 1, 384)])
            t2 = conv(pool(x, f"{name}/tower_2/pool", kind), f"{name}/tower_2/conv", 1, 1, 192)
            x = cat(name, [conv(x, f"{name}/conv", 1, 1, 320), t, t1, t2])  # 8 x 8 x 2048
        stand_in_head(x, const, rng)
    return freeze_stand_in(graph, path)


def main():
    p = ArgumentParser(prog="evaluator_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", help="classify_image_graph_def.pb (default: a full-size stand-in, built once)")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--batches", type=positive_int, default=2, help="batches of 64 per round and backend")
    p.add_argument("--device", default="cpu", help="torch backend's device")
    p.add_argument("--skip-tf", action="store_true", help="torch backend only (e.g. a GPU machine without TF)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    import torch
    import evaluator
    from udit.inception import InceptionTorch
    graph = Path(args.graph) if args.graph else ROOT / "bench" / ".inception_stand_in.pb"
    if not graph.is_file():
        build_full_size_stand_in(graph)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(64, 256, 256, 3), dtype=np.uint8)
    nets = {"torch": InceptionTorch(graph, args.device)}
    if not args.skip_tf:
        nets["tf"] = evaluator.InceptionFeatures(graph)
    for net in nets.values():  # warm-up: plans, kernels, allocations
        net.activations([batch[:8]], desc="warm-up")
    times = {name: [] for name in nets}
    for _ in range(args.rounds):
        for name, net in nets.items():
            start = time.perf_counter()
            net.activations([batch] * args.batches, desc=name)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "device": args.device, "graph": str(graph.name),
              "images_per_round": 64 * args.batches}
    for name, ts in times.items():
        result[f"{name}_images_per_s"] = 64 * args.batches / float(np.median(ts))
        print(f"{name:5s} backend: {result[f'{name}_images_per_s']:.1f} images/s (median of {len(ts)} rounds: "
              f"{', '.join(f'{t:.1f} s' for t in ts)})")
    if "tf" in nets:
        a, b = nets["torch"].activations([batch[:16]]), nets["tf"].activations([batch[:16]])
        result["max_rel_err_pool"] = float(np.abs(a[0] - b[0]).max() / np.abs(b[0]).max())
        result["max_rel_err_spatial"] = float(np.abs(a[1] - b[1]).max() / np.abs(b[1]).max())
        print(f"torch vs tf features: max relative error pool {result['max_rel_err_pool']:.1e}, "
              f"spatial {result['max_rel_err_spatial']:.1e}; speed-up "
              f"{result['torch_images_per_s'] / result['tf_images_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
