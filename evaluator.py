"""ImageNet sample metrics (IS, FID, sFID, precision, recall), compatible with OpenAI's evaluator.

    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz [--json metrics.json]
        [--backend torch|tf] [--device cuda|cpu]

Same network (the 2015 Inception graph), same features (pool_3 and the first 7 channels
of mixed_6/conv), same statistics and the same float16-then-float32 distance computation
as guided-diffusion's evaluations/evaluator.py, so the same inputs give the same numbers; FID and sFID take the trace of the matrix square
root from singular values (frechet_distance), which agrees with ADM's sqrtm on ordinary
statistics and stays >= 0 where sqrtm goes negative.
The graph runs either as torch operations (--backend torch, the default: udit/inception.py
interprets the GraphDef, no TensorFlow needed, CPU or GPU) or through TensorFlow's v1 API
(--backend tf, ADM's own path, kept for cross-checking). In addition: image batches are
streamed from the .npz instead of loaded whole, the reference batch's activations are
cached, inputs are validated, and the graph is found or downloaded with clear messages.
"""

import hashlib
import json
import os
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from udit import inception
from udit.cli import ActionableError, ArgumentParser, output_file, positive_int
from udit.hub import download_url
from udit.inception import POOL_NAME, SOFTMAX_MATMUL, SPATIAL_CHANNELS, SPATIAL_NAME
from udit.sampling import read_protocol

INCEPTION_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                 "classify_image_graph_def.pb")
INCEPTION_ENV = "UDIT_INCEPTION_GRAPH"
CACHE_ENV = "UDIT_CACHE_DIR"
BATCH_SIZE = 64
PR_NEIGHBOURS = 3  # k of precision and recall (Kynkaanniemi et al. 2019), as ADM's evaluator
# Each image's k-th nearest neighbour among the others: a batch needs more than k images.
MIN_IMAGES = PR_NEIGHBOURS + 1
BACKENDS = ("torch", "tf")
METRICS = ("adm", "fd_dinov2")
FD_ENCODER = "dinov2-vitl14"  # EDM2 / dgm-eval: DINOv2 ViT-L/14, class token, bicubic (antialiased) 224 px
FD_RESOLUTION = 224
PROTOCOL_COUNT = 50_000  # images per published FID (ADM, DiT, U-DiT)
# The protocol card's entries that decide a number, in the order they are printed (SPEC §6, §11).
CARD_KEYS = ("ckpt", "checkpoint_sha256", "model", "weights", "vae", "sampler", "steps", "spacing", "time_shift",
             "nfe_per_image", "cfg_scale", "cfg_interval", "cfg_channels", "autoguidance", "guide_ckpt", "labels",
             "global_seed", "num_samples", "precision")


class EvaluatorInputError(ValueError):
    """A bad input file or setting; the message names the file, the problem and the fix."""


def cache_dir():
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "udit"))


#################################################################################
#                          Reading image batches                                #
#################################################################################

@contextmanager
def open_npy_member(path, name="arr_0"):
    """Yield (file object positioned at the data, shape, dtype) of `name` inside an .npz."""
    path = Path(path)
    if not path.is_file():
        raise EvaluatorInputError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise EvaluatorInputError(f"{path}: not an .npz file (not a zip archive); write it with "
                                  f"numpy.savez(path, arr_0=images)") from None
    with zf:
        if f"{name}.npy" not in zf.namelist():
            found = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy")) or "nothing"
            raise EvaluatorInputError(f"{path}: no array '{name}' (found: {found}); "
                                      f"expected the images as '{name}', uint8 (N, H, W, 3)")
        with zf.open(f"{name}.npy") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise EvaluatorInputError(f"{path}: '{name}' uses .npy format {version}, expected 1.0 or 2.0")
            except ValueError as err:
                if isinstance(err, EvaluatorInputError):
                    raise
                raise EvaluatorInputError(f"{path}: '{name}' is not a valid .npy array ({err})") from None
            if fortran:
                raise EvaluatorInputError(f"{path}: '{name}' is stored in Fortran order; "
                                          f"save a C-contiguous array (numpy.ascontiguousarray)")
            yield f, shape, dtype


def check_images_header(path, shape, dtype):
    """Raise EvaluatorInputError unless the header describes uint8 images (N >= MIN_IMAGES, H, W, 3)."""
    if dtype != np.uint8:
        raise EvaluatorInputError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images in 0..255 "
                                  f"(convert with clip(127.5 * x + 128, 0, 255).astype(np.uint8))")
    if len(shape) != 4:
        raise EvaluatorInputError(f"{path}: arr_0 has shape {shape}, expected (N, H, W, 3)")
    if shape[3] != 3:
        raise EvaluatorInputError(f"{path}: arr_0 has {shape[3]} channels (shape {shape}), expected "
                                  f"NHWC RGB images (N, H, W, 3)")
    if shape[0] < MIN_IMAGES:
        raise EvaluatorInputError(f"{path}: arr_0 holds {shape[0]} image(s); at least {MIN_IMAGES} are needed "
                                  f"(precision and recall use each image's {PR_NEIGHBOURS} nearest neighbours)")


def iter_image_batches(path, batch_size=BATCH_SIZE):
    """Yield uint8 (B, H, W, 3) batches of arr_0, read from the file as they are needed."""
    with open_npy_member(path) as (f, shape, dtype):
        check_images_header(path, shape, dtype)
        image_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * image_bytes)
            if len(data) != count * image_bytes:
                raise EvaluatorInputError(f"{path}: arr_0 is truncated (the header promises {shape[0]} "
                                          f"images, the data ends at image {start + len(data) // image_bytes})")
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


def count_images(path):
    with open_npy_member(path) as (_, shape, dtype):
        check_images_header(path, shape, dtype)
        return shape[0]


def read_precomputed_statistics(path):
    """(mu, sigma, mu_s, sigma_s) stored in the .npz (the reference batch has them), or None."""
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data.files:
            return None
        missing = [k for k in ("sigma", "mu_s", "sigma_s") if k not in data.files]
        if missing:
            raise EvaluatorInputError(f"{path}: has 'mu' but not {', '.join(missing)}; precomputed statistics "
                                      f"need mu, sigma, mu_s and sigma_s")
        stats = tuple(np.asarray(data[k], dtype=np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s"))
    for name, value in zip(("mu", "sigma", "mu_s", "sigma_s"), stats):
        if not np.isfinite(value).all():
            raise EvaluatorInputError(f"{path}: precomputed statistic '{name}' contains NaN or Inf; "
                                      f"recompute it or remove it to use statistics of arr_0")
    mu, sigma, mu_s, sigma_s = stats
    for m, s, label in ((mu, sigma, "mu/sigma"), (mu_s, sigma_s, "mu_s/sigma_s")):
        if m.ndim != 1 or s.shape != (m.shape[0], m.shape[0]):
            raise EvaluatorInputError(f"{path}: {label} have shapes {m.shape} and {s.shape}, expected (D,) and (D, D)")
    return stats


def image_shape(path):
    """(H, W) of the images in arr_0."""
    with open_npy_member(path) as (_, shape, dtype):
        check_images_header(path, shape, dtype)
        return tuple(shape[1:3])


def protocol_card(path):
    """The sample batch's protocol card (written by sample_ddp.py into the .npz), or None."""
    try:
        return read_protocol(path)
    except ValueError as err:
        raise EvaluatorInputError(str(err)) from None


def protocol_warnings(ref_path, sample_path):
    """One-line warnings for a comparison published numbers cannot be set beside."""
    warns = []
    ref_hw, sample_hw = image_shape(ref_path), image_shape(sample_path)
    if ref_hw != sample_hw:
        warns.append(f"reference images are {ref_hw[0]}x{ref_hw[1]} but samples {sample_hw[0]}x{sample_hw[1]}; "
                     f"the numbers are not comparable to those of a same-size reference batch")
    n = count_images(sample_path)
    if n < PROTOCOL_COUNT:
        warns.append(f"{n} samples: published FIDs use {PROTOCOL_COUNT:,} (FID is biased upward with fewer); "
                     f"sample with --num-fid-samples {PROTOCOL_COUNT}")
    return warns


def describe_card(card):
    """The card's deciding entries, one `key: value` line each (checkpoint digests shortened)."""
    lines = []
    for key in CARD_KEYS:
        if card.get(key) is not None:
            value = card[key]
            lines.append(f"  {key}: {value[:16] if key.endswith('sha256') else value}")
    return "\n".join(lines)


def file_digest(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


#################################################################################
#                                 Metrics                                       #
#################################################################################

def compute_statistics(activations):
    """Gaussian fit of (N, D) features: mean (D,), covariance (D, D)."""
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def covariance_sqrt(sigma, which):
    """Symmetric square root (D, D) of a covariance (D, D): U sqrt(max(l, 0)) U^T from sigma = U diag(l) U^T.

    Raises EvaluatorInputError when sigma is not one: not symmetric, or with an eigenvalue
    below -1e-5 of the largest (float32-stored statistics round to about 1e-7; rounding
    below that is clamped to 0).
    """
    scale = np.abs(sigma).max(initial=0.0)
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-6 * scale:
        raise EvaluatorInputError(f"the {which} covariance is not symmetric; statistics must be np.cov of features")
    values, vectors = np.linalg.eigh(sigma)
    if values[0] < -1e-5 * max(values[-1], 0.0):
        raise EvaluatorInputError(f"the {which} covariance has eigenvalue {values[0]:.3g} < 0, so it is not a "
                                  f"covariance; statistics must be np.cov of features")
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D) covariances.

    |mu1 - mu2|^2 + tr sigma1 + tr sigma2 - 2 tr sqrt(sigma1 sigma2) (Dowson & Landau 1982;
    FID, Heusel et al. 2017). ADM takes scipy's sqrtm of the product, which for a
    near-singular one (fewer images than dimensions) is off by ~sqrt(eps) per eigenvalue
    and gives a negative FID for a batch against itself. Here sigma1 sigma2 = R1 R1 R2 R2
    (R = covariance_sqrt) is similar to (R1 R2)(R1 R2)^T, so the trace of its square root is
    the sum of the singular values of R1 R2, each accurate to eps of the largest: identical
    statistics give 0 to rounding, and well-conditioned ones ADM's value. A distance is
    never negative: a trace term below 0 by at most 8 D eps (tr sigma1 + tr sigma2), the
    rounding bound, is 0.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise EvaluatorInputError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    trace_sqrt = np.linalg.svd(covariance_sqrt(sigma1, "first") @ covariance_sqrt(sigma2, "second"),
                               compute_uv=False).sum()
    traces = np.trace(sigma1) + np.trace(sigma2)
    spread = traces - 2 * trace_sqrt
    rounding = 8 * sigma1.shape[0] * np.finfo(np.float64).eps * traces
    if spread < -rounding:
        raise ValueError(f"Frechet distance: trace term {spread:.3g} < 0 beyond rounding ({rounding:.3g})")
    return float(diff.dot(diff) + max(spread, 0.0))


def inception_score(probs, split_size=5000):
    """Mean over splits of exp(mean KL(p(y|x) || p(y))) for class probabilities (N, K)."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def manifold_radii(features, distances, k=PR_NEIGHBOURS, batch_size=10000):
    """Distance of each feature to its k-th nearest neighbour within the set (self excluded)."""
    n = len(features)
    radii = np.zeros(n, dtype=np.float32)
    for begin in range(0, n, batch_size):
        rows = features[begin:begin + batch_size]
        block = np.concatenate([distances(rows, features[c:c + batch_size]) for c in range(0, n, batch_size)], axis=1)
        radii[begin:begin + len(rows)] = np.partition(block, k, axis=1)[:, k]
    return radii


def precision_recall(ref_features, sample_features, distances, k=PR_NEIGHBOURS, batch_size=10000):
    """Improved precision (samples inside some reference ball) and recall (the converse)."""
    ref_radii = manifold_radii(ref_features, distances, k, batch_size)
    sample_radii = manifold_radii(sample_features, distances, k, batch_size)
    ref_covered = np.zeros(len(ref_features), dtype=bool)
    sample_covered = np.zeros(len(sample_features), dtype=bool)
    for r in range(0, len(ref_features), batch_size):
        for s in range(0, len(sample_features), batch_size):
            d = distances(ref_features[r:r + batch_size], sample_features[s:s + batch_size])
            ref_covered[r:r + batch_size] |= (d <= sample_radii[None, s:s + batch_size]).any(axis=1)
            sample_covered[s:s + batch_size] |= (d <= ref_radii[r:r + batch_size, None]).any(axis=0)
    return float(sample_covered.mean()), float(ref_covered.mean())


#################################################################################
#                        The Inception network (TensorFlow)                     #
#################################################################################

def find_inception_graph(path=None, download=True):
    """Path of classify_image_graph_def.pb: the argument, $UDIT_INCEPTION_GRAPH, or the cache."""
    where = "--inception-graph" if path else f"${INCEPTION_ENV}" if os.environ.get(INCEPTION_ENV) else None
    path = Path(path or os.environ.get(INCEPTION_ENV) or cache_dir() / "classify_image_graph_def.pb")
    if path.is_file():
        return path
    if where:  # a path the user chose is never filled by a download
        raise EvaluatorInputError(f"{where} {path}: no such file; download {INCEPTION_URL} there, or leave "
                                  f"{where} unset to have it downloaded into {cache_dir()}")
    if not download:
        raise EvaluatorInputError(f"Inception graph not found at {path}; download {INCEPTION_URL} there "
                                  f"or pass --inception-graph PATH")
    print(f"downloading the Inception graph to {path} ...")
    try:
        return download_url(INCEPTION_URL, path)
    except OSError as err:
        raise EvaluatorInputError(f"could not download the Inception graph ({err}); fetch {INCEPTION_URL} by "
                                  f"hand and put it at {path}, or pass --inception-graph PATH") from None


class InceptionFeatures:
    """pool_3 and spatial features, class probabilities and pairwise distances in one TF session."""

    backend = "tf"

    def __init__(self, graph_path):
        import tensorflow as tf2
        import tensorflow.compat.v1 as tf

        for gpu in tf2.config.list_physical_devices("GPU"):
            tf2.config.experimental.set_memory_growth(gpu, True)
        self.graph_path = Path(graph_path)
        graph_def = tf.GraphDef()
        try:
            graph_def.ParseFromString(self.graph_path.read_bytes())
        except Exception as err:  # protobuf raises its own DecodeError
            raise EvaluatorInputError(f"{graph_path}: not a TensorFlow GraphDef ({err}); download it again "
                                      f"from {INCEPTION_URL}") from None
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            try:
                pool, spatial = tf.import_graph_def(graph_def, input_map={"ExpandDims:0": self.images},
                                                    return_elements=[POOL_NAME, SPATIAL_NAME], name="features")
                (matmul,) = tf.import_graph_def(graph_def, return_elements=[SOFTMAX_MATMUL], name="softmax")
            except ValueError as err:  # a tensor ADM reads is missing
                raise EvaluatorInputError(f"{graph_path}: {' '.join(str(err).split())}; this is not the 2015 "
                                          f"Inception graph (download {INCEPTION_URL})") from None
            self.pool = tf.reshape(pool, [tf.shape(pool)[0], -1])
            spatial = spatial[..., :SPATIAL_CHANNELS]
            self.spatial = tf.reshape(spatial, [tf.shape(spatial)[0], -1])  # H, W, C order

            self.pool_input = tf.placeholder(tf.float32, shape=[None, 2048])
            self.softmax = tf.nn.softmax(tf.matmul(self.pool_input, matmul.inputs[1]))

            self.u = tf.placeholder(tf.float32, shape=[None, None])
            self.v = tf.placeholder(tf.float32, shape=[None, None])
            d16 = _pairwise_sq_distances(tf, tf.cast(self.u, tf.float16), tf.cast(self.v, tf.float16))
            self.dist = tf.cond(tf.reduce_all(tf.math.is_finite(d16)),
                                lambda: tf.cast(d16, tf.float32),
                                lambda: _pairwise_sq_distances(tf, self.u, self.v))
        config = tf.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True
        self.session = tf.Session(graph=self.graph, config=config)

    def activations(self, batches, total=None, desc="activations"):
        """(pool (N, 2048), spatial (N, 2023)) float32 for an iterable of uint8 NHWC batches."""
        pools, spatials = [], []
        for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
            pool, spatial = self.session.run([self.pool, self.spatial], {self.images: batch.astype(np.float32)})
            pools.append(pool)
            spatials.append(spatial)
        return np.concatenate(pools), np.concatenate(spatials)

    def class_probabilities(self, pool_features, batch_size=512):
        return np.concatenate([self.session.run(self.softmax, {self.pool_input: pool_features[i:i + batch_size]})
                               for i in range(0, len(pool_features), batch_size)])

    def distances(self, u, v):
        """Squared Euclidean distances (len(u), len(v)), float16 unless that overflows."""
        return self.session.run(self.dist, {self.u: u, self.v: v})


def _pairwise_sq_distances(tf, u, v):
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, False, True) + norm_v, 0.0)


#################################################################################
#                                 Evaluation                                    #
#################################################################################

def batch_activations(net, path, batch_size=BATCH_SIZE, desc="activations"):
    n = count_images(path)
    return net.activations(iter_image_batches(path, batch_size), total=-(-n // batch_size), desc=desc)


def reference_activations(net, path, use_cache=True, batch_size=BATCH_SIZE):
    """Activations of the reference batch, cached by the file's and the graph's content hashes and the backend."""
    if not use_cache:
        return batch_activations(net, path, batch_size, "reference batch")
    key = f"{net.backend}-{file_digest(path)[:16]}-{file_digest(net.graph_path)[:16]}"
    cached = cache_dir() / "evaluator" / f"ref-{key}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as data:
            print(f"using cached reference activations {cached}")
            return data["pool"], data["spatial"]
    acts = batch_activations(net, path, batch_size, "reference batch")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.stem + ".tmp.npz")
    np.savez(tmp, pool=acts[0], spatial=acts[1])
    os.replace(tmp, cached)
    return acts


def batch_statistics(path, activations):
    """((mu, sigma), (mu_s, sigma_s)): precomputed ones stored in the file win."""
    stored = read_precomputed_statistics(path)
    if stored is not None:
        return (stored[0], stored[1]), (stored[2], stored[3])
    return compute_statistics(activations[0]), compute_statistics(activations[1])


def inception_network(graph_path, backend="torch", device=None):
    """ADM's Inception network on `backend`: torch (udit/inception.py, on `device`) or tf (TensorFlow)."""
    if backend == "tf":
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise EvaluatorInputError("--backend tf needs TensorFlow (pip install tensorflow-cpu, see "
                                      "requirements.txt); --backend torch needs none") from None
        return InceptionFeatures(graph_path)
    return inception.InceptionTorch(graph_path, device)


def evaluate(ref_path, sample_path, graph_path=None, use_cache=True, batch_size=BATCH_SIZE, backend="torch",
             device=None):
    """All five metrics as a dict: inception_score, fid, sfid, precision, recall."""
    count_images(ref_path), count_images(sample_path)  # fail fast, before the network loads
    net = inception_network(find_inception_graph(graph_path), backend, device)
    print("computing reference batch activations...")
    ref_acts = reference_activations(net, ref_path, use_cache, batch_size)
    ref_stats, ref_stats_spatial = batch_statistics(ref_path, ref_acts)
    print("computing sample batch activations...")
    sample_acts = batch_activations(net, sample_path, batch_size, "sample batch")
    sample_stats, sample_stats_spatial = batch_statistics(sample_path, sample_acts)
    print("Computing evaluations...")
    precision, recall = precision_recall(ref_acts[0], sample_acts[0], net.distances)
    return {
        "inception_score": inception_score(net.class_probabilities(sample_acts[0])),
        "fid": frechet_distance(*sample_stats, *ref_stats),
        "sfid": frechet_distance(*sample_stats_spatial, *ref_stats_spatial),
        "precision": precision,
        "recall": recall,
    }


#################################################################################
#                      FD-DINOv2 (EDM2, dgm-eval)                               #
#################################################################################

def load_fd_encoder(name=FD_ENCODER, weights=None, device=None):
    """(encoder, weights file) for FD-DINOv2: images (N, 3, H, W) in [-1, 1] -> class tokens (N, D).

    name: a DINOv2 name of udit.encoders (weights from `weights`, else the Hugging Face
    cache or hub; offline without them is one line naming the file to fetch) or a file
    of udit.encoders.save_encoder (tests, other encoders). DINOv2 runs at 224 px whatever
    the image size, as EDM2's statistics are computed.
    """
    from udit import encoders
    if name in encoders.DINOV2:
        weights = weights or encoders.cached_weights(name)
        encoder = encoders.load_encoder(name, FD_RESOLUTION, weights, resolution=FD_RESOLUTION, tokens="class",
                                        antialias=True)
    else:
        encoder, weights = encoders.load_encoder(name, FD_RESOLUTION, weights, tokens="class", antialias=True), name
    return encoder.to(inception.resolve_device(device)), Path(weights)


def encoder_features(encoder, path, batch_size=BATCH_SIZE, desc="FD-DINOv2 features"):
    """(N, D) float64 features of the images in arr_0 (uint8 NHWC), batch by batch."""
    import torch
    device = next(encoder.buffers()).device
    n = count_images(path)
    out = []
    for batch in tqdm(iter_image_batches(path, batch_size), total=-(-n // batch_size), desc=desc, unit="batch"):
        x = torch.tensor(batch, device=device).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy: batch is read-only
        out.append(encoder(x).double().cpu().numpy())
    return np.concatenate(out)


def fd_dinov2(ref_path, sample_path, encoder_name=FD_ENCODER, weights=None, device=None, use_cache=True,
              batch_size=BATCH_SIZE):
    """Frechet distance between the class-token Gaussians of reference and samples (EDM2's FD_DINOv2).

    The reference statistics are cached by the contents of the reference file and of the
    encoder's weights.
    """
    count_images(ref_path), count_images(sample_path)
    encoder, weights_file = load_fd_encoder(encoder_name, weights, device)
    cached = cache_dir() / "evaluator" / f"fd-{file_digest(ref_path)[:16]}-{file_digest(weights_file)[:16]}.npz"
    if use_cache and cached.is_file():
        with np.load(cached, allow_pickle=False) as data:
            print(f"using cached reference FD-DINOv2 statistics {cached}")
            ref_stats = data["mu"], data["sigma"]
    else:
        ref_stats = compute_statistics(encoder_features(encoder, ref_path, batch_size, "reference FD-DINOv2"))
        if use_cache:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.stem + ".tmp.npz")
            np.savez(tmp, mu=ref_stats[0], sigma=ref_stats[1])
            os.replace(tmp, cached)
    sample_stats = compute_statistics(encoder_features(encoder, sample_path, batch_size, "sample FD-DINOv2"))
    return frechet_distance(*sample_stats, *ref_stats)


def build_parser():
    parser = ArgumentParser(prog="evaluator.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    parser.add_argument("sample_batch", help="sample batch .npz with arr_0 uint8 (N, H, W, 3)")
    parser.add_argument("--json", metavar="PATH", type=output_file, help="also write the metrics to this JSON file")
    parser.add_argument("--inception-graph", metavar="PATH",
                        help=f"classify_image_graph_def.pb (default: ${INCEPTION_ENV}, else downloaded once "
                             f"into {cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="recompute the reference batch activations")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help="images per Inception batch (64, as the original)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="torch: the graph's ops as torch operations, no TensorFlow (default); "
                             "tf: ADM's TensorFlow path, for cross-checking")
    parser.add_argument("--device", help="torch backend and FD-DINOv2: cuda, cuda:1, cpu, ... (default: cuda when "
                                         "available)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=["adm"],
                        help="adm: ADM's IS, FID, sFID, precision, recall (default); fd_dinov2: FD in DINOv2 "
                             "ViT-L/14 class-token features (EDM2)")
    parser.add_argument("--encoder", default=FD_ENCODER,
                        help="FD-DINOv2's encoder: a udit.encoders DINOv2 name or a save_encoder file")
    parser.add_argument("--encoder-weights", metavar="PATH",
                        help="FD-DINOv2: a local DINOv2 weight file (timm .safetensors or the original .pth)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in (args.ref_batch, args.sample_batch):
        if not Path(path).is_file():
            parser.error(f"{path}: no such file")
    if args.device and args.backend == "tf" and "fd_dinov2" not in args.metrics:
        parser.error("--device applies to --backend torch and FD-DINOv2; TensorFlow places the graph itself")
    try:
        card = protocol_card(args.sample_batch)
        for line in protocol_warnings(args.ref_batch, args.sample_batch):
            print(f"evaluator.py: warning: {line}", file=sys.stderr)
        metrics = {}
        if "fd_dinov2" in args.metrics:  # first: a missing encoder fails before Inception's long run
            metrics["fd_dinov2"] = fd_dinov2(args.ref_batch, args.sample_batch, args.encoder, args.encoder_weights,
                                             args.device, not args.no_cache, args.batch_size)
        if "adm" in args.metrics:
            metrics.update(evaluate(args.ref_batch, args.sample_batch, args.inception_graph, not args.no_cache,
                                    args.batch_size, args.backend, args.device))
    except (EvaluatorInputError, ActionableError) as err:
        parser.exit(2, f"evaluator.py: error: {err}\n")
    if card is None:
        print(f"Protocol: {args.sample_batch} carries no protocol card (written by sample_ddp.py)")
    else:
        print(f"Protocol of {args.sample_batch}:\n{describe_card(card)}")
    for key, label in (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
                       ("precision", "Precision"), ("recall", "Recall"), ("fd_dinov2", "FD_DINOv2")):
        if key in metrics:
            print(f"{label}:", metrics[key])
    if args.json:
        evaluation = {"reference": str(args.ref_batch), "sample": str(args.sample_batch), "backend": args.backend,
                      "sample_count": count_images(args.sample_batch), "metrics": args.metrics}
        if "fd_dinov2" in args.metrics:
            evaluation["fd_encoder"] = args.encoder
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**metrics, "evaluation": evaluation, "protocol": card}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
