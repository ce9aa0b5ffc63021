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

def build_stand_in_graph(path):
    """A frozen graph with the Inception tensor names and input path, random constant weights."""
    import tensorflow.compat.v1 as tf
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        decoded = tf.placeholder(tf.float32, [None, None, 3], name="DecodeJpeg")
        image = tf.expand_dims(decoded, 0, name="ExpandDims")
        resized = tf.image.resize_bilinear(image, [299, 299], align_corners=False, name="ResizeBilinear")
        scaled = tf.multiply(tf.subtract(resized, 128.0), 1.0 / 128.0, name="Mul")
        pooled = tf.nn.avg_pool2d(scaled, ksize=18, strides=17, padding="VALID")  # 17 x 17
        with tf.name_scope("mixed_6"):
            w6 = tf.constant(rng.normal(size=(1, 1, 3, 192)).astype(np.float32))
            spatial = tf.nn.conv2d(pooled, w6, strides=1, padding="VALID", name="conv")
        w7 = tf.constant(rng.normal(size=(1, 1, 192, 2048)).astype(np.float32) / 8)
        features = tf.nn.relu(tf.nn.conv2d(tf.nn.relu(spatial), w7, strides=1, padding="VALID"))
        pool3 = tf.nn.avg_pool2d(features, ksize=17, strides=1, padding="VALID", name="pool_3")
        with tf.name_scope("softmax"), tf.name_scope("logits"):
            w_logits = tf.constant(rng.normal(size=(2048, 1008)).astype(np.float32) / 20)
            tf.matmul(tf.reshape(pool3, [-1, 2048]), w_logits, name="MatMul")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


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
    assert pool.shape == (3, 2048) and spatial.shape == (3, 17 * 17 * 7)
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
    assert set(metrics) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert metrics["inception_score"] >= 1.0 and metrics["fid"] > 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert len(list((tmp_path / "cache" / "evaluator").glob("ref-*.npz"))) == 1



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
