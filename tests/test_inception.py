"""udit/inception.py: the Inception GraphDef run as torch operations gives TensorFlow's tensors and numbers.

Every comparison runs both backends in this process on stand-in graphs built by
test_evaluator.build_stand_in_graph (the real graph's op types, random weights).
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import evaluator
from conftest import ROOT
from test_evaluator import REAL_GRAPH_OPS, build_stand_in_graph, images, write_npz
from udit import inception
from udit.cli import ActionableError
from udit.inception import GraphError, InceptionTorch, TFGraph

REL = 1e-4  # the parity bound for activations and FID / sFID / IS


@pytest.fixture(scope="module")
def stand_in_graph(tmp_path_factory):
    return build_stand_in_graph(tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb")


@pytest.fixture(scope="module")
def backends(stand_in_graph):
    return evaluator.InceptionFeatures(stand_in_graph), InceptionTorch(stand_in_graph, "cpu")


def rel_err(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_stand_in_graph_exercises_the_real_graph_op_types(stand_in_graph):
    graph = TFGraph.from_file(stand_in_graph)
    head = {"Reshape", "MatMul", "Add", "Softmax"}
    assert {node.op for node in graph.nodes.values()} == REAL_GRAPH_OPS | head | {"Placeholder", "DecodeJpeg", "Cast"}
    # Fed at ExpandDims:0; CheckNumerics is only a control input of control_dependency.
    run = REAL_GRAPH_OPS - {"ExpandDims", "CheckNumerics"}
    order, _ = graph.plan([inception.POOL_NAME, inception.SPATIAL_NAME], [inception.INPUT_NAME])
    assert {node.op for node in order} == run
    order, _ = graph.plan(["softmax:0"], [inception.INPUT_NAME])
    assert {node.op for node in order} == run | head
    assert "DecodeJpeg" not in {node.name for node in order}  # fed at ExpandDims:0, as ADM does


@pytest.mark.parametrize("shape", [(4, 32, 32), (3, 23, 41), (2, 64, 48)])
def test_activations_match_tensorflow(backends, shape):
    tf_net, torch_net = backends
    batch = np.random.default_rng(shape[1]).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    tf_pool, tf_spatial = tf_net.activations([batch])
    pool, spatial = torch_net.activations([batch])
    assert pool.shape == tf_pool.shape and spatial.shape == tf_spatial.shape
    assert rel_err(pool, tf_pool) < REL and rel_err(spatial, tf_spatial) < REL
    probs = torch_net.class_probabilities(pool)
    assert rel_err(probs, tf_net.class_probabilities(tf_pool)) < REL


def test_batch_one_reshape_and_softmax_take_batch_n(stand_in_graph, backends):
    """pool_3/_reshape is frozen as [1, 2048]: N images give N rows, each TF's single-image result."""
    tf_net, _ = backends
    batch = images(5, 3).astype(np.float32)
    graph = TFGraph.from_file(stand_in_graph)
    flat, softmax = graph.run(["pool_3/_reshape:0", "softmax:0"], {inception.INPUT_NAME: torch.from_numpy(batch)})
    assert flat.shape == (3, 2048) and softmax.shape == (3, 1008)
    names = ["features/pool_3/_reshape:0", "features/softmax:0"]
    for i in range(3):
        ref_flat, ref_softmax = tf_net.session.run(names, {tf_net.images: batch[i:i + 1]})
        assert rel_err(flat[i:i + 1].numpy(), ref_flat) < REL and rel_err(softmax[i:i + 1].numpy(), ref_softmax) < REL


def test_legacy_resize_matches_tensorflow_op():
    import tensorflow as tf
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 7, 11, 3)).astype(np.float32)
    for size in [(299, 299), (5, 4), (7, 23)]:
        expected = tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=False).numpy()
        actual = inception.resize_bilinear_legacy(torch.from_numpy(x), *size).numpy()
        assert np.abs(actual - expected).max() < 1e-4  # 0..255 values: float32 rounding only


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (18, 3, 2, (0, 1)), (9, 2, 1, (0, 1)), (18, 3, 1, (1, 1)), (17, 1, 1, (0, 0)), (8, 3, 2, (0, 1))])
def test_same_padding_puts_the_odd_row_after(size, kernel, stride, expected):
    assert inception.same_padding(size, kernel, stride) == expected


def test_distances_round_as_adm_float16_graph(backends):
    """k-NN balls hinge on float16 rounding: the torch distances reproduce TF's float16 graph's.

    TF's float16 product itself rounds by CPU: where oneDNN takes it, the two were equal
    bit for bit (the machines of 2026-12-04); where TF falls back to Eigen's kernel ("oneDNN
    supports DT_HALF only on platforms with AVX-512", an AMD EPYC of 2026-12-06), 1 of the
    2,100 distances was apart by one float16 step of the product 2 u.v. So: within that
    step, at most 1% of them off, and far closer than rounding the exact distance once
    (which ADM's graph does not do: 79% of those differ).
    """
    tf_net, torch_net = backends
    rng = np.random.default_rng(0)
    u = (rng.uniform(0, 1, size=(70, 2048)) * rng.uniform(0, 0.5, size=(1, 2048))).astype(np.float32)
    ours, theirs = torch_net.distances(u, u[:30]), tf_net.distances(u, u[:30])
    step = 2 * np.spacing((u @ u[:30].T).astype(np.float16)).astype(np.float32)  # of 2 u.v, rounded in float16
    assert (np.abs(ours - theirs) <= step).all() and (ours != theirs).mean() <= 0.01
    exact = ((u[:, None, :].astype(np.float64) - u[None, :30, :]) ** 2).sum(-1).astype(np.float16).astype(np.float32)
    assert (exact != theirs).mean() > 10 * max((ours != theirs).mean(), 1 / ours.size)
    big = u * 200  # 2 u.v overflows float16: both fall back to float32
    assert rel_err(torch_net.distances(big, big[:5]), tf_net.distances(big, big[:5])) < 1e-5


def test_five_numbers_match_tensorflow(stand_in_graph, tmp_path, monkeypatch):
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path / "cache"))
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 48))
    sample = write_npz(tmp_path / "sample.npz", arr_0=images(2, 40, size=24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {b: evaluator.evaluate(ref, sample, stand_in_graph, backend=b, batch_size=16, device="cpu"
                                         if b == "torch" else None) for b in ("tf", "torch")}
    tf_m, torch_m = results["tf"], results["torch"]
    for key in ("inception_score", "fid", "sfid"):
        assert torch_m[key] == pytest.approx(tf_m[key], rel=REL), key
    assert abs(torch_m["precision"] - tf_m["precision"]) <= 1 / 40 + 1e-12  # one sample
    assert abs(torch_m["recall"] - tf_m["recall"]) <= 1 / 48 + 1e-12  # one reference image
    assert len(list((tmp_path / "cache" / "evaluator").glob("ref-torch-*.npz"))) == 1
    assert len(list((tmp_path / "cache" / "evaluator").glob("ref-tf-*.npz"))) == 1


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A small local ViT with a class token, saved by udit.encoders (the interface DINOv2 loads through)."""
    from udit.encoders import build_local_vit, save_encoder
    config = dict(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "tiny_vit.pt"
    save_encoder(build_local_vit(**config), config, path)
    return path


def test_fd_dinov2_on_class_tokens_with_cached_reference(tiny_encoder, tmp_path, monkeypatch, capsys):
    import torch.nn.functional as F
    from udit.encoders import load_encoder
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path / "cache"))
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 20))
    sample = write_npz(tmp_path / "sample.npz", arr_0=images(2, 16, size=40))
    value = evaluator.fd_dinov2(ref, sample, str(tiny_encoder), device="cpu", batch_size=8)
    assert "using cached" not in capsys.readouterr().out
    # By hand: [0, 1], ImageNet mean / std, antialiased bicubic resize, the class token (EDM2's preprocessing).
    vit = load_encoder(str(tiny_encoder), 28).vit
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def features(batch):
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std
        x = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False, antialias=True)
        return vit.forward_features(x)[:, 0].double().detach().numpy()
    expected = evaluator.frechet_distance(*evaluator.compute_statistics(features(images(2, 16, size=40))),
                                          *evaluator.compute_statistics(features(images(1, 20))))
    assert value == pytest.approx(expected, rel=1e-4) and value > 0
    assert evaluator.fd_dinov2(ref, sample, str(tiny_encoder), device="cpu") == pytest.approx(value, rel=1e-6)
    assert "using cached reference FD-DINOv2 statistics" in capsys.readouterr().out
    assert evaluator.fd_dinov2(ref, ref, str(tiny_encoder), device="cpu") == pytest.approx(0, abs=1e-6)


def test_fd_dinov2_offline_without_weights_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 4))
    with pytest.raises(SystemExit) as info:
        evaluator.main([str(ref), str(ref), "--metrics", "fd_dinov2", "--device", "cpu"])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if ": warning: " not in line]
    assert len(err) == 1 and "--encoder dinov2-vitl14" in err[0] and "--encoder-weights" in err[0]
    assert "vit_large_patch14_dinov2" in err[0]  # names the file to fetch


def test_command_runs_without_tensorflow(stand_in_graph, tiny_encoder, tmp_path):
    """`python evaluator.py ref.npz sample.npz` with TensorFlow not importable: the five numbers and FD-DINOv2."""
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 12))
    sample = write_npz(tmp_path / "sample.npz", arr_0=images(2, 10))
    blocker = ("import sys, runpy; sys.modules['tensorflow'] = None; "  # `import tensorflow` raises ImportError
               f"sys.argv = ['evaluator.py', {str(ref)!r}, {str(sample)!r}, '--inception-graph', "
               f"{str(stand_in_graph)!r}, '--device', 'cpu', '--no-cache', '--metrics', 'adm', 'fd_dinov2', "
               f"'--encoder', {str(tiny_encoder)!r}]; "
               "runpy.run_path('evaluator.py', run_name='__main__'); "
               "assert not any(m.startswith('tensorflow') for m in sys.modules if sys.modules[m] is not None)")
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = [line.split(":")[0] for line in proc.stdout.splitlines() if ":" in line]
    assert labels[-6:] == ["Inception Score", "FID", "sFID", "Precision", "Recall", "FD_DINOv2"]
    assert all(np.isfinite(float(line.split(":")[1])) for line in proc.stdout.splitlines()[-6:])


def planted(op_name):
    def extra(tf, x):
        return {"Tanh": tf.nn.tanh, "Sigmoid": tf.nn.sigmoid}[op_name](x)
    return extra


def test_unknown_op_is_one_line_exit_2(tmp_path, capsys):
    graph = build_stand_in_graph(tmp_path / "tanh.pb", extra=planted("Tanh"))
    with pytest.raises(GraphError, match="op Tanh, which udit/inception.py does not implement"):
        InceptionTorch(graph, "cpu")
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 4))
    with pytest.raises(SystemExit) as info:
        evaluator.main([str(ref), str(ref), "--inception-graph", str(graph), "--device", "cpu"])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if ": warning: " not in line]
    assert len(err) == 1 and err[0].startswith("evaluator.py: error: ") and "Tanh" in err[0]


def test_graph_without_the_needed_tensors_is_refused(tmp_path, capsys):
    import tensorflow.compat.v1 as tf
    graph = tf.Graph()
    with graph.as_default():
        x = tf.placeholder(tf.float32, [None, None, None, 3], name="ExpandDims")
        tf.nn.relu(x, name="pool_3")
    path = tmp_path / "other.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(GraphError, match="no node 'mixed_6/conv'"):
        InceptionTorch(path, "cpu")
    with pytest.raises(evaluator.EvaluatorInputError, match="this is not the 2015 Inception graph"):
        evaluator.InceptionFeatures(path)  # the TensorFlow backend: a ValueError traceback before
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff not a protobuf")
    with pytest.raises(GraphError, match="not a TensorFlow GraphDef"):
        InceptionTorch(junk, "cpu")


@pytest.mark.parametrize("device", ["mps", "meta", "xpu"])
def test_a_device_type_the_evaluator_cannot_use_is_one_line(device):
    from udit.inception import resolve_device
    with pytest.raises(ActionableError, match=f"--device {device}: the evaluator runs on cpu or cuda"):
        resolve_device(device)


def test_missing_or_wrong_encoder_weights_are_one_line(tmp_path):
    from udit.encoders import EncoderError, load_dinov2
    with pytest.raises(EncoderError, match="nope.safetensors: no such file; download"):
        load_dinov2("dinov2-vits14", 224, tmp_path / "nope.safetensors")  # an IndexError before
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(EncoderError, match=r"junk.pth: not dinov2-vits14 weights \(\w+: .+\)"):
        load_dinov2("dinov2-vits14", 224, tmp_path / "junk.pth")


def test_tf_backend_without_tensorflow_is_one_line(stand_in_graph, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 4))
    with pytest.raises(SystemExit) as info:
        evaluator.main([str(ref), str(ref), "--inception-graph", str(stand_in_graph), "--backend", "tf"])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if ": warning: " not in line]
    assert len(err) == 1 and "--backend tf needs TensorFlow" in err[0]


def test_bad_device_is_one_line(stand_in_graph, tmp_path, capsys):
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 4))
    with pytest.raises(SystemExit) as info:
        evaluator.main([str(ref), str(ref), "--inception-graph", str(stand_in_graph), "--device", "tpu7"])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if ": warning: " not in line]
    assert len(err) == 1 and "--device tpu7" in err[0]
