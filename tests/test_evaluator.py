"""evaluator.py: closed-form metric checks and the real TensorFlow path on a stand-in Inception graph."""

import json
import warnings

import numpy as np
import pytest

import evaluator
import udit.hub
from evaluator import (EvaluatorInputError, frechet_distance, inception_score, iter_image_batches,
                       precision_recall, read_precomputed_statistics)


# ----------------------------------------------------------------- closed forms

def test_frechet_distance_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5))
    mu, sigma = evaluator.compute_statistics(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def adm_frechet_distance(mu1, sigma1, mu2, sigma2):
    """guided-diffusion's evaluator formula: scipy's sqrtm of the product."""
    from scipy import linalg
    covmean = linalg.sqrtm(sigma1.dot(sigma2)).real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_frechet_distance_agrees_with_adm_on_well_conditioned_statistics():
    rng = np.random.default_rng(0)
    for dims in (8, 64, 200):
        a = rng.normal(size=(4 * dims, dims)) @ rng.normal(size=(dims, dims)) / np.sqrt(dims)
        b = rng.normal(0.2, 1.3, size=(3 * dims, dims))
        stats_a, stats_b = evaluator.compute_statistics(a), evaluator.compute_statistics(b)
        expected = adm_frechet_distance(*stats_a, *stats_b)
        assert frechet_distance(*stats_a, *stats_b) == pytest.approx(expected, rel=1e-8)
        assert frechet_distance(*stats_b, *stats_a) == pytest.approx(expected, rel=1e-8)


def test_a_batch_scored_against_itself_is_zero_not_negative():
    # 40 images in 256 dimensions: a covariance of rank 39; ADM's formula gives about -7.5e-6.
    features = np.abs(np.random.default_rng(0).normal(size=(40, 256)))
    mu, sigma = evaluator.compute_statistics(features)
    value = frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= value <= 1e-12 * np.trace(sigma)
    shifted = frechet_distance(mu + 0.01, sigma, mu, sigma)  # the mean term is kept exactly
    assert shifted == pytest.approx(256 * 0.01 ** 2, rel=1e-9)


def test_frechet_distance_of_a_singular_and_a_full_covariance():
    # tr sqrt(diag(0, 4) I) = 2: the closed form, where ADM adds 1e-6 to both diagonals.
    assert frechet_distance(np.zeros(2), np.diag([0.0, 4.0]), np.zeros(2), np.eye(2)) == pytest.approx(2.0, abs=1e-12)


@pytest.mark.parametrize("sigma, message", [
    (np.array([[0.0, 1.0], [0.0, 0.0]]), "first covariance is not symmetric"),
    (np.diag([-1.0, 1.0]), "first covariance has eigenvalue -1 < 0"),
])
def test_frechet_distance_refuses_what_is_not_a_covariance(sigma, message):
    with pytest.raises(EvaluatorInputError, match=message):
        frechet_distance(np.zeros(2), sigma, np.zeros(2), np.eye(2))


@pytest.mark.parametrize("classes", [1, 10, 100])
def test_inception_score_of_equally_likely_confident_classes(classes):
    probs = np.full((1000, 1008), 1e-12)
    probs[np.arange(1000), np.arange(1000) % classes] = 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    assert inception_score(probs) == pytest.approx(classes, rel=1e-6)


def numpy_distances(u, v):
    return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1).astype(np.float32)


def test_precision_recall_on_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    ref = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres[:2]])
    # Samples: half on the first reference cluster, half on a cluster the reference lacks.
    sample = np.concatenate([c + rng.normal(size=(50, 2)) for c in (centres[0], centres[2])])
    precision, recall = precision_recall(ref, sample, numpy_distances, batch_size=40)
    assert 0.4 <= precision <= 0.5  # only the samples on the shared cluster are covered
    assert 0.4 <= recall <= 0.5  # only the reference points of the shared cluster are covered


def test_radius_is_the_third_neighbour_excluding_self():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    radii = evaluator.manifold_radii(points, numpy_distances, batch_size=2)
    # Point 0: squared distances 1, 9, 36 -> 36; point 4: 16, 49, 81 -> 81.
    assert radii[0] == 36.0 and radii[4] == 81.0


# ----------------------------------------------------------------- input checking

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8)), "no array 'arr_0'"),
    (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), "dtype float32, expected uint8"),
    (dict(arr_0=np.zeros((4, 8, 8), np.uint8)), r"expected \(N, H, W, 3\)"),
    (dict(arr_0=np.zeros((4, 3, 8, 8), np.uint8)), "8 channels"),
    (dict(arr_0=np.zeros((3, 8, 8, 3), np.uint8)), "holds 3 image.*at least 4"),
])
def test_bad_image_batches_are_named(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EvaluatorInputError, match=message) as info:
        list(iter_image_batches(path))
    assert str(path) in str(info.value)


def test_not_an_npz_and_missing_file(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(EvaluatorInputError, match="not an .npz"):
        list(iter_image_batches(junk))
    with pytest.raises(EvaluatorInputError, match="no such file"):
        list(iter_image_batches(tmp_path / "absent.npz"))


def test_nan_in_precomputed_statistics_is_refused(tmp_path):
    sigma = np.eye(3)
    path = write_npz(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8),
                     mu=np.array([0.0, np.nan, 0.0]), sigma=sigma, mu_s=np.zeros(3), sigma_s=sigma)
    with pytest.raises(EvaluatorInputError, match="'mu' contains NaN"):
        read_precomputed_statistics(path)


def test_streaming_reads_batches_in_order(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(10, 4, 5, 3), dtype=np.uint8)
    for saver in (np.savez, np.savez_compressed):
        path = tmp_path / f"{saver.__name__}.npz"
        saver(path, arr_0=images)
        batches = list(iter_image_batches(path, batch_size=4))
        assert [len(b) for b in batches] == [4, 4, 2]
        assert np.array_equal(np.concatenate(batches), images)


def test_missing_graph_offline_error_names_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("UDIT_INCEPTION_GRAPH", raising=False)
    with pytest.raises(EvaluatorInputError, match="classify_image_graph_def.pb") as info:
        evaluator.find_inception_graph(download=False)
    assert evaluator.INCEPTION_URL in str(info.value) and str(tmp_path) in str(info.value)

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(udit.hub.urllib.request, "urlopen", offline)
    with pytest.raises(EvaluatorInputError, match="fetch https://openaipublic"):
        evaluator.find_inception_graph()
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------- the TensorFlow path

STAND_IN_SIDE = 37  # the stand-in's ResizeBilinear target (the real graph: 299)
STAND_IN_SPATIAL = 9 * 9 * 7  # mixed_6/conv is 9 x 9 here (the real graph: 17 x 17)
REAL_GRAPH_OPS = {"Const", "ExpandDims", "ResizeBilinear", "Sub", "Mul", "Conv2D", "BatchNormWithGlobalNormalization",
                  "CheckNumerics", "Identity", "Relu", "MaxPool", "AvgPool", "Concat"}


def stand_in_layers(rng):
    """(const, conv_block) builders of 2015-Inception-style layers with random weights (TF v1 graph mode).

    conv_block(x, name, kh, kw, out, stride, padding) makes the real graph's conv layer:
    Conv2D -> `name`/batchnorm (an Identity, turned into BatchNormWithGlobalNormalization
    by freeze_stand_in) -> CheckNumerics -> Identity with a control input -> Relu `name`.
    """
    import tensorflow.compat.v1 as tf

    def const(value, name):
        return tf.constant(np.asarray(value, np.float32), name=name)

    def conv_block(x, name, kh, kw, out, stride=1, padding="SAME"):
        fan_in = kh * kw * int(x.shape[-1])
        w = const(rng.normal(size=(kh, kw, int(x.shape[-1]), out)) * np.sqrt(2 / fan_in), f"{name}/conv2d_params")
        y = tf.nn.conv2d(x, w, strides=[1, stride, stride, 1], padding=padding, name=f"{name}/Conv2D")
        for stat, value in (("moving_mean", rng.normal(scale=0.1, size=out)),
                            ("moving_variance", rng.uniform(0.5, 2.0, size=out)),
                            ("beta", rng.normal(scale=0.1, size=out)), ("gamma", rng.uniform(0.5, 1.5, size=out))):
            const(value, f"{name}/batchnorm/{stat}")
        bn = tf.identity(y, name=f"{name}/batchnorm")
        check = tf.debugging.check_numerics(bn, "conv", name=f"{name}/CheckNumerics")
        with tf.control_dependencies([check]):
            dep = tf.identity(bn, name=f"{name}/control_dependency")
        return tf.nn.relu(dep, name=name)
    return const, conv_block


def stand_in_input(size):
    """DecodeJpeg -> Cast -> ExpandDims -> legacy ResizeBilinear to (size, size) -> Sub 128 -> Mul 1/128."""
    import tensorflow.compat.v1 as tf
    contents = tf.placeholder(tf.string, [], name="DecodeJpeg/contents")
    decoded = tf.cast(tf.io.decode_jpeg(contents, channels=3, name="DecodeJpeg"), tf.float32, name="Cast")
    image = tf.expand_dims(decoded, 0, name="ExpandDims")
    size = tf.constant([size, size], name="ResizeBilinear/size")
    resized = tf.raw_ops.ResizeBilinear(images=image, size=size, align_corners=False, name="ResizeBilinear")
    return tf.multiply(tf.subtract(resized, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")


def stand_in_head(x, const, rng):
    """pool_3 (AvgPool over the whole map) -> pool_3/_reshape [1, 2048] -> softmax/logits/MatMul -> Add -> Softmax."""
    import tensorflow.compat.v1 as tf
    pool3 = tf.nn.avg_pool2d(x, ksize=int(x.shape[1]), strides=1, padding="VALID", name="pool_3")
    flat = tf.reshape(pool3, tf.constant([1, 2048], name="pool_3/_reshape/shape"), name="pool_3/_reshape")
    weights = const(rng.normal(size=(2048, 1008)) / 8, "softmax/weights")
    logits = tf.raw_ops.Add(x=tf.matmul(flat, weights, name="softmax/logits/MatMul"),
                            y=const(rng.normal(size=1008), "softmax/biases"), name="softmax/logits")
    tf.nn.softmax(logits, name="softmax")


def freeze_stand_in(graph, path):
    """Write the graph as the 2015 graph's GraphDef: batchnorm Identities -> BatchNormWithGlobalNormalization."""
    graph_def = graph.as_graph_def()
    for node in graph_def.node:
        if node.name.endswith("/batchnorm") and node.op == "Identity":
            node.op = "BatchNormWithGlobalNormalization"
            del node.attr["T"]
            node.attr["T"].type = 1  # DT_FLOAT
            node.input.extend(f"{node.name}/{k}" for k in ("moving_mean", "moving_variance", "beta", "gamma"))
            node.attr["variance_epsilon"].f = 0.001
            node.attr["scale_after_normalization"].b = True
    graph_def.versions.producer = 8  # the op was removed from GraphDef version 9 on
    path.write_bytes(graph_def.SerializeToString())
    return path


def build_stand_in_graph(path, rng=None, extra=None):
    """A frozen graph laid out like the 2015 Inception graph, with random weights, small maps.

    The same op types, names and conventions as classify_image_graph_def.pb: a JPEG decoder
    and Cast in front of ExpandDims (bypassed by feeding ExpandDims:0), legacy ResizeBilinear,
    conv blocks Conv2D -> BatchNormWithGlobalNormalization -> CheckNumerics -> Identity with a
    control input -> Relu, the old Concat, MaxPool / AvgPool, pool_3 -> pool_3/_reshape
    ([1, 2048]) -> softmax/logits/MatMul -> Add -> Softmax, GraphDef producer 8. Odd map sizes,
    strides 1 and 2, SAME padding both even and uneven (the extra row at the bottom), VALID.
    `extra(tf, x) -> x`, when given, is applied after the first conv block (to plant an op).
    """
    import tensorflow.compat.v1 as tf
    rng = rng or np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        const, conv_block = stand_in_layers(rng)
        x = stand_in_input(STAND_IN_SIDE)
        x = conv_block(x, "conv", 3, 3, 8, stride=2, padding="VALID")  # 37 -> 18
        if extra is not None:
            x = extra(tf, x)
        x = conv_block(x, "conv_1", 3, 3, 8)  # 18, SAME 1 + 1
        x = conv_block(x, "conv_2", 3, 3, 8, stride=2)  # 18 -> 9, SAME 0 + 1 (uneven)
        x = tf.nn.max_pool2d(x, ksize=2, strides=1, padding="SAME", name="pool")  # 9, SAME 0 + 1
        x = tf.nn.avg_pool2d(x, ksize=2, strides=1, padding="SAME", name="pool_1")  # 9, uneven, padding not counted
        towers = [conv_block(x, "mixed/conv", 1, 1, 4),
                  conv_block(conv_block(x, "mixed/tower/conv", 1, 3, 4), "mixed/tower/conv_1", 3, 1, 4),
                  conv_block(tf.nn.avg_pool2d(x, ksize=3, strides=1, padding="SAME", name="mixed/tower_1/pool"),
                             "mixed/tower_1/conv", 1, 1, 4)]
        x = tf.raw_ops.Concat(concat_dim=tf.constant(3, name="mixed/join/concat_dim"), values=towers, name="mixed/join")
        x = conv_block(x, "mixed_6/conv", 3, 3, 16)  # 9 x 9 x 16: sFID reads its first 7 channels
        x = tf.nn.max_pool2d(x, ksize=3, strides=2, padding="VALID", name="mixed_10/pool")  # 9 -> 4
        x = conv_block(x, "mixed_10/conv", 1, 1, 2048)
        stand_in_head(x, const, rng)  # pool_3: (N, 1, 1, 2048)
    return freeze_stand_in(graph, path)


@pytest.fixture(scope="module")
def stand_in_graph(tmp_path_factory):
    return build_stand_in_graph(tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb")


def images(seed, n, size=32):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 1, 1, 3))
    return np.clip(base + rng.normal(scale=40, size=(n, size, size, 3)), 0, 255).astype(np.uint8)


def test_features_have_inception_shapes_and_order(stand_in_graph):
    net = evaluator.InceptionFeatures(stand_in_graph)
    batch = images(0, 3)
    pool, spatial = net.activations([batch])
    assert pool.shape == (3, 2048) and spatial.shape == (3, STAND_IN_SPATIAL)
    raw = net.session.run(net.graph.get_tensor_by_name("features/mixed_6/conv:0"),
                          {net.images: batch.astype(np.float32)})
    assert np.array_equal(spatial, raw[..., :7].reshape(3, -1))  # first 7 channels, H, W, C order
    probs = net.class_probabilities(pool)
    assert probs.shape == (3, 1008) and np.allclose(probs.sum(1), 1, atol=1e-5)
    d = net.distances(pool[:2], pool)
    assert d.shape == (2, 3) and d[0, 0] <= 1e-2 * d[0, 1]


def test_end_to_end_command(stand_in_graph, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path / "cache"))
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 40))
    sample = write_npz(tmp_path / "sample.npz", arr_0=images(2, 30))
    out_json = tmp_path / "metrics.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator.main([str(ref), str(sample), "--inception-graph", str(stand_in_graph), "--json", str(out_json)])
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split(":")[0] for line in lines if ":" in line and not line.startswith("using")]
    assert labels[-5:] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    metrics = json.loads(out_json.read_text())
    assert set(metrics) == {"inception_score", "fid", "sfid", "precision", "recall", "evaluation", "protocol"}
    assert metrics["protocol"] is None and metrics["evaluation"]["backend"] == "torch"
    assert metrics["inception_score"] >= 1.0 and metrics["fid"] > 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert len(list((tmp_path / "cache" / "evaluator").glob("ref-*.npz"))) == 1



def test_protocol_card_is_printed_written_and_warned_about(stand_in_graph, tmp_path, monkeypatch, capsys):
    from udit.sampling import write_npz_streaming
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path / "cache"))
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 12))
    card = {"ckpt": "U-DiT-B-400K", "checkpoint_sha256": "ab" * 32, "sampler": "ddpm", "steps": 250,
            "nfe_per_image": 500, "cfg_scale": 1.5, "cfg_interval": None, "weights": "ema", "labels": "balanced",
            "global_seed": 0, "num_samples": 10, "vae": "stabilityai/sd-vae-ft-ema"}
    sample = tmp_path / "sample.npz"
    write_npz_streaming(sample, 10, (24, 24, 3), images(2, 10, size=24), np.zeros(10), protocol=card)
    out_json = tmp_path / "metrics.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator.main([str(ref), str(sample), "--inception-graph", str(stand_in_graph), "--json", str(out_json),
                        "--device", "cpu"])
    captured = capsys.readouterr()
    warns = [line for line in captured.err.splitlines() if line.startswith("evaluator.py: warning:")]
    assert len(warns) == 2
    assert "reference images are 32x32 but samples 24x24" in warns[0]
    assert "10 samples: published FIDs use 50,000" in warns[1]
    out = captured.out.splitlines()
    first = out.index(f"Protocol of {sample}:")
    assert "  checkpoint_sha256: " + "ab" * 8 in out and "  labels: balanced" in out and "  weights: ema" in out
    assert first < out.index(next(line for line in out if line.startswith("FID:")))
    written = json.loads(out_json.read_text())
    assert written["protocol"] == card and written["evaluation"]["sample_count"] == 10
    with np.load(sample) as data:  # the card does not disturb the arrays ADM's evaluator reads
        assert data["arr_0"].shape == (10, 24, 24, 3) and json.loads(data["protocol.json"]) == card


def test_reference_activations_are_cached_by_content(stand_in_graph, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UDIT_CACHE_DIR", str(tmp_path / "cache"))
    net = evaluator.InceptionFeatures(stand_in_graph)
    ref = write_npz(tmp_path / "ref.npz", arr_0=images(1, 10))
    first = evaluator.reference_activations(net, ref)
    assert "using cached" not in capsys.readouterr().out
    second = evaluator.reference_activations(net, ref)
    assert "using cached reference activations" in capsys.readouterr().out
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    write_npz(ref, arr_0=images(3, 10))  # new content under the same name: computed afresh
    third = evaluator.reference_activations(net, ref)
    assert "using cached" not in capsys.readouterr().out and not np.array_equal(third[0], first[0])


def test_precomputed_statistics_override_computed_ones(tmp_path):
    rng = np.random.default_rng(0)
    acts = (rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))
    plain = write_npz(tmp_path / "plain.npz", arr_0=images(1, 5))
    (mu, sigma), (mu_s, _) = evaluator.batch_statistics(plain, acts)
    assert np.allclose(mu, acts[0].mean(0)) and mu_s.shape == (3,)
    stored = dict(mu=np.ones(4), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=2 * np.eye(3))
    with_stats = write_npz(tmp_path / "stats.npz", arr_0=images(1, 5), **stored)
    (mu, sigma), (mu_s, sigma_s) = evaluator.batch_statistics(with_stats, acts)
    assert np.array_equal(mu, stored["mu"]) and np.array_equal(sigma_s, stored["sigma_s"])


def test_command_line_bad_input_exits_2_with_one_line(tmp_path, capsys):
    bad = write_npz(tmp_path / "bad.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    good = write_npz(tmp_path / "good.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as info:
        evaluator.main([str(good), str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.npz" in err[0] and "expected uint8" in err[0]


def test_a_graph_path_that_was_given_but_is_missing_is_named_not_downloaded_into(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded into a path the user gave")
    monkeypatch.setattr(evaluator, "download_url", no_download)
    with pytest.raises(evaluator.EvaluatorInputError, match=r"--inception-graph /nonexistent\.pb: no such file"):
        evaluator.find_inception_graph("/nonexistent.pb")
