"""Training data: ImageNet-style folders, the public VAE-feature layouts and our compact layout.

Every random choice of the data pipeline (the horizontal flip, the VAE posterior
sample) is drawn from a generator seeded by (seed, epoch, index), so a sample is the
same whatever the number of workers or processes, and a resumed run sees exactly the
data an uninterrupted one would.
"""

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from udit.vae import SD_VAE_SCALE

log = logging.getLogger(__name__)

COMPACT_LAYOUT = "udit-compact-v1"
KEEP_IMAGES_HINT = ("extract the features of the image folder with extract_features.py --keep-images (or train "
                    "from --data-path)")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """Unusable training data; the message says what was found and what is expected."""


def is_hidden(name):
    """True for names that are never data: dot-files and dot-folders (.ipynb_checkpoints, .DS_Store,
    .git, macOS's ._* AppleDouble files) and the __MACOSX folder that macOS zip archives carry."""
    return name.startswith(".") or name == "__MACOSX"


def check_label(value, where, num_classes):
    """A class index as an int; DataError naming `where` if it is negative or >= num_classes (None: unknown)."""
    value = int(value)
    if num_classes is None and value < 0:
        raise DataError(f"{where}: label {value} is negative; class indices start at 0")
    if num_classes is not None and not 0 <= value < num_classes:
        raise DataError(f"{where}: label {value} is not a class index in 0..{num_classes - 1} (--num-classes "
                        f"{num_classes}); give --num-classes the data's class count, or fix the labels")
    return value


#################################################################################
#                                 Images                                        #
#################################################################################

# Modes whose convert("RGB") keeps the stored scale: 1 / 8-bit, palette, CMYK, YCbCr, HSV.
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
# Modes with alpha: the alpha channel is dropped and the stored colours kept.
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# Greyscale of more than 8 bits: the full-scale value each stores. Pillow opens 16-bit PNG and
# TIFF as I;16*, and 16-bit PGM as I, scaled to 65535 whatever the file's maxval.
HIGH_DEPTH_FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def load_rgb(path):
    """The image at `path` as an 8-bit RGB PIL image at its real scale: every loader of images uses this.

    Pillow's convert("RGB") clamps 16-bit greyscale (I;16, I) at 255, so a value of 1/8 of
    full scale would come out white; those modes, and 32-bit float (F, full scale 1.0), are
    rescaled to 0..255 here (rounded). Alpha (LA, PA, RGBA) is dropped, the stored colours
    kept, as torchvision's default loader and ADM's image_datasets.py do with
    convert("RGB"): images then match those pipelines and the public reference batches.
    Raises DataError for a mode without a known scale (LAB, ...) or high-depth values
    outside 0..full scale (e.g. a float TIFF in 0..255).
    """
    with Image.open(path) as image:
        mode = image.mode
        if mode in EIGHT_BIT_MODES or mode in ALPHA_MODES:
            return image.convert("RGB")
        if mode not in HIGH_DEPTH_FULL_SCALE:
            raise DataError(f"{path}: image mode {mode} has no known RGB scale; convert it to RGB (e.g. with "
                            f"Pillow's ImageCms) or remove it")
        values = np.asarray(image, dtype=np.float64)
    full = HIGH_DEPTH_FULL_SCALE[mode]
    if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= full):
        raise DataError(f"{path}: mode {mode} values span {values.min():g}..{values.max():g}, outside 0..{full:g} "
                        f"(the full scale of the mode); rescale the file to 0..{full:g} or save it as 8-bit")
    return Image.fromarray(np.rint(values * (255 / full)).astype(np.uint8), mode="L").convert("RGB")


def center_crop_arr(pil_image, image_size):
    """ADM centre crop: halve with BOX while the short side >= 2x target, BICUBIC resize, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def image_to_tensor(arr):
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def image_files(folder):
    """Sorted image paths under `folder` at any depth, following links as torchvision does.

    Hidden names (is_hidden) are skipped at every depth: a .ipynb_checkpoints folder or a
    ._img.jpg AppleDouble file inside a class folder is not a sample.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found += [Path(dirpath, f) for f in filenames
                  if not is_hidden(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def list_image_folder(root):
    """(samples [(path, class index)], class names) of root/<class>/<image>, sorted as torchvision does.

    Hidden folders (is_hidden: .ipynb_checkpoints, .git, __MACOSX, ...) are not classes and
    hidden files are not images, so they cannot shift the class indices.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-path {root}: no such directory; expected an ImageFolder root "
                        f"(one sub-folder of images per class, e.g. imagenet/train)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not is_hidden(d.name))
    samples = [(str(path), index) for index, name in enumerate(classes) for path in image_files(root / name)]
    if not samples:
        raise DataError(f"--data-path {root}: no images found; expected one sub-folder of images per class")
    return samples, classes


class SeededDataset(Dataset):
    """Base: a per-item generator seeded by (seed, epoch, index); call set_epoch each epoch."""

    def __init__(self, seed):
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def rng(self, index):
        return np.random.default_rng([self.seed, self.epoch, index])


class ImageDataset(SeededDataset):
    """ImageFolder with the ADM centre crop and a random horizontal flip.

    Items: (image (3, S, S) in [-1, 1], label, ok). An unreadable image is replaced by
    the next readable one and reported with ok = False, so a corrupt file never stops a
    long run; the trainer counts them in its log.
    """

    def __init__(self, root, image_size, seed=0, flip=True):
        super().__init__(seed)
        self.samples, self.classes = list_image_folder(root)
        self.image_size = image_size
        self.flip = flip

    def __len__(self):
        return len(self.samples)

    def labels_present(self):
        """Sorted class indices that have at least one image."""
        return sorted({label for _, label in self.samples})

    def load(self, index):
        path, label = self.samples[index]
        return center_crop_arr(load_rgb(path), self.image_size), label

    def __getitem__(self, index):
        ok = True
        for attempt in range(len(self.samples)):
            try:
                arr, label = self.load((index + attempt) % len(self.samples))
                break
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                ok = False
                log.warning("skipping unreadable image %s (%s)", self.samples[(index + attempt) % len(self.samples)][0], err)
        else:
            raise DataError("no readable image in the data folder")
        if self.flip and self.rng(index).random() < 0.5:
            arr = arr[:, ::-1]
        return image_to_tensor(arr), label, ok


#################################################################################
#                               VAE features                                    #
#################################################################################

class PublicFeatureDataset(SeededDataset):
    """The fast-DiT and U-DiT releases: one .npy (1, C, H, W) latent and one (1,) label per image.

    Labels are checked as items are read (a DataError naming the file if one is not a class
    index below num_classes): reading all of ImageNet's 1.28M label files up front takes minutes.
    """

    # Both releases were extracted with sd-vae-ft-ema/mse: (scaling factor, shift).
    latent_normalization = (SD_VAE_SCALE, 0.0)

    def __init__(self, feature_files, label_files, seed=0, num_classes=None):
        super().__init__(seed)
        self.feature_files, self.label_files = feature_files, label_files
        self.num_classes = num_classes

    def __len__(self):
        return len(self.feature_files)

    def labels_present(self):
        """None: unknown without reading every label file."""
        return None

    def __getitem__(self, index):
        features = np.load(self.feature_files[index], allow_pickle=False)
        label = np.load(self.label_files[index], allow_pickle=False)
        if label.size != 1 or label.dtype.kind not in "iu":
            raise DataError(f"{self.label_files[index]}: a label file holds one integer class index, found "
                            f"{label.dtype} of shape {label.shape}")
        label = check_label(label.reshape(-1)[0], self.label_files[index], self.num_classes)
        return torch.from_numpy(features.reshape(features.shape[-3:]).astype(np.float32)), label, True


class CompactFeatureDataset(SeededDataset):
    """Our layout: memory-mapped VAE posterior moments of both flips.

    features.npy (N, F, 2, C, H, W) float16: for each of F flips (2: as is and mirrored;
    1 for converted public sets) the posterior mean and std, already normalised with the
    VAE's (scaling_factor, shift_factor), recorded in meta.json (0.18215, 0 before they were).
    A fresh flip and posterior sample mean + std * eps are drawn every epoch.
    All labels are checked against num_classes when the folder is opened.

    images=True: items are (latent, label, ok, image) with the clean centre-cropped image
    (3, S, S) in [-1, 1] of exactly that latent (mirrored with the mirrored latent), from
    images.npy (N, S, S, 3) uint8 (extract_features.py --keep-images); the encoder of
    representation alignment reads it. DataError if the folder holds no images.
    """

    def __init__(self, root, seed=0, flip=True, num_classes=None, images=False):
        super().__init__(seed)
        self.root = Path(root)
        self.flip = flip
        self.meta = read_compact_meta(self.root)
        if not self.meta.get("complete"):
            raise DataError(f"--feature-path {root}: feature extraction did not finish; rerun "
                            f"extract_features.py with the same arguments to complete it")
        if images and not self.meta.get("images"):
            raise DataError(f"--feature-path {root} holds no images, which the alignment encoder needs: "
                            f"{KEEP_IMAGES_HINT}")
        self.with_images = images
        self.features = self.images = None  # opened lazily so that each worker maps the files itself
        self.labels = np.load(self.root / "labels.npy", allow_pickle=False)
        self.latent_normalization = (float(self.meta.get("scaling_factor", SD_VAE_SCALE)),
                                     float(self.meta.get("shift_factor", 0.0)))
        self.present = np.unique(self.labels).tolist()
        classes = self.meta.get("classes")
        if num_classes is not None and classes is not None and len(classes) > num_classes:
            raise DataError(f"--feature-path {root}: extracted from {len(classes)} class folders, more than "
                            f"--num-classes {num_classes}")
        for value in (self.present[:1] + self.present[-1:]):
            check_label(value, f"{self.root / 'labels.npy'} (row {int(np.argmax(self.labels == value))})",
                        num_classes)

    def __len__(self):
        return len(self.labels)

    def labels_present(self):
        """Sorted class indices that have at least one sample."""
        return self.present

    def __getitem__(self, index):
        if self.features is None:
            self.features = np.load(self.root / "features.npy", mmap_mode="r", allow_pickle=False)
        rng = self.rng(index)
        moments = self.features[index]
        flip = rng.integers(moments.shape[0]) if self.flip else 0
        mean, std = moments[flip].astype(np.float32)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        latent, label = torch.from_numpy(mean + std * eps), int(self.labels[index])
        if not self.with_images:
            return latent, label, True
        if self.images is None:
            self.images = np.load(self.root / "images.npy", mmap_mode="r", allow_pickle=False)
        image = self.images[index]
        return latent, label, True, image_to_tensor(np.array(image[:, ::-1] if flip else image))  # out of the map


def read_compact_meta(root):
    meta_path = Path(root) / "meta.json"
    meta = json.loads(meta_path.read_text())
    if meta.get("layout") != COMPACT_LAYOUT:
        raise DataError(f"{meta_path}: layout {meta.get('layout')!r}, expected {COMPACT_LAYOUT!r}")
    return meta


def _numbered_files(folder, pattern):
    """{key groups as ints: path} of the files in `folder` whose whole name matches `pattern`."""
    found = {}
    for entry in folder.iterdir():
        match = None if is_hidden(entry.name) else pattern.fullmatch(entry.name)
        if match:
            found[tuple(int(g) for g in match.groups())] = entry
    return found


def _same_entry(a, b):
    """Whether two (feature, label) file pairs hold byte-identical arrays."""
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def udit_release_order(features, labels, where):
    """Keys of a U-DiT `{i}_{r}.npy` folder in data order, without the padding copies.

    The release was extracted by R processes, each given its share of a DistributedSampler
    without shuffling, which pads N images to T = R * ceil(N / R) entries with copies of the
    first T - N (< R) images; process r saved its i-th entry as {i}_{r}.npy. In the order
    p = i * R + r, entry p is image p for p < N, and the padding entry p >= N copies image
    (p - N) mod N with the same bytes. The padding k is the largest k < R for which the last k
    entries are byte-identical (feature and label files) to the images they would copy; only
    those, at most 2 (R - 1) pairs of files, are read. Real images whose features and labels
    are byte-identical could be taken for padding; any other sample is kept, and so is a copy
    that its extraction encoded afresh (another random flip or posterior draw). The reference
    loader always drops one entry: right when the padding is one (ImageNet on 8 processes,
    SPEC 5), wrong otherwise.

    Returns (keys, R, k). DataError if a process's files are missing.
    """
    processes = max(r for _, r in features) + 1
    per_process = max(i for i, _ in features) + 1
    if len(features) != processes * per_process:
        missing = sorted({(i, r) for i in range(per_process) for r in range(processes)} - set(features))
        raise DataError(f"{where}: {len(missing)} of the {processes * per_process} files of an extraction by "
                        f"{processes} processes are missing (e.g. {', '.join(f'{i}_{r}.npy' for i, r in missing[:3])}"
                        f"); the folder is incomplete")
    keys = sorted(features, key=lambda k: k[0] * processes + k[1])
    total = len(keys)
    loaded = {}

    def entry(p):
        if p not in loaded:
            loaded[p] = tuple(np.load(files[keys[p]], allow_pickle=False) for files in (features, labels))
        return loaded[p]

    for padding in range(processes - 1, 0, -1):
        count = total - padding
        if all(_same_entry(entry(p), entry((p - count) % count)) for p in range(count, total)):
            return keys[:count], processes, padding
    return keys, processes, 0


def open_feature_folder(root, seed=0, flip=True, num_classes=None, images=False):
    """Dataset for a feature folder in any known layout, detected from its contents.

    - ours (extract_features.py): meta.json, features.npy, labels.npy;
    - fast-DiT: <name>_features/{i}.npy and <name>_labels/{i}.npy;
    - U-DiT release: <name>_features/{i}_{r}.npy (r = extracting process), in data order
      without the copies that padded the extraction (udit_release_order).
    Hidden names (.DS_Store, ._0.npy, .ipynb_checkpoints, __MACOSX) are ignored. Labels are
    checked against num_classes (None: only that they are class indices >= 0). The public
    layouts fixed the flip at extraction; `flip` only affects ours. images=True: items also
    carry the clean image (CompactFeatureDataset); the public layouts hold none (DataError).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--feature-path {root}: no such directory")
    if (root / "meta.json").is_file():
        return CompactFeatureDataset(root, seed, flip, num_classes, images)
    entries = sorted(d for d in root.iterdir() if not is_hidden(d.name))
    feature_dirs = [d for d in entries if d.is_dir() and d.name.endswith("_features")]
    label_dirs = [d for d in entries if d.is_dir() and d.name.endswith("_labels")]
    if len(feature_dirs) != 1 or len(label_dirs) != 1:
        raise DataError(f"--feature-path {root}: unknown layout; expected meta.json (extract_features.py) or "
                        f"exactly one *_features and one *_labels folder (fast-DiT / U-DiT releases), found "
                        f"{[d.name for d in entries][:6]}")
    features_dir, labels_dir = feature_dirs[0], label_dirs[0]
    for pattern, name in ((re.compile(r"(\d+)\.npy"), "fast-DiT"), (re.compile(r"(\d+)_(\d+)\.npy"), "U-DiT")):
        features = _numbered_files(features_dir, pattern)
        if features:
            break
    else:
        raise DataError(f"{features_dir}: no feature files named {{i}}.npy (fast-DiT) or {{i}}_{{r}}.npy (U-DiT)")
    labels = _numbered_files(labels_dir, pattern)
    unpaired = set(features) ^ set(labels)
    if unpaired:
        raise DataError(f"{root}: {len(unpaired)} feature files have no label file or the reverse "
                        f"(e.g. {sorted(unpaired)[:3]}); the folder is incomplete")
    if images:
        raise DataError(f"--feature-path {root}: a {name} feature layout holds no images, which the "
                        f"alignment encoder needs: {KEEP_IMAGES_HINT}")
    if name == "U-DiT":
        keys, processes, padding = udit_release_order(features, labels, features_dir)
        log.info("feature folder %s: U-DiT layout of %d processes, %d files, %d padding copies left out, "
                 "%d samples", root, processes, len(features), padding, len(keys))
    else:
        keys = sorted(features)
        log.info("feature folder %s: fast-DiT layout, %d samples", root, len(keys))
    return PublicFeatureDataset([features[k] for k in keys], [labels[k] for k in keys], seed, num_classes)


#################################################################################
#                                 Sampling order                                #
#################################################################################

class ResumableDistributedSampler(Sampler):
    """This rank's share of a seeded permutation per epoch, starting at any batch.

    All ranks get the same number of indices (the tail that does not divide evenly is
    dropped), so they stay in lockstep. `start_index` skips what an interrupted run of
    the same epoch already consumed.
    """

    def __init__(self, size, rank, world_size, seed, epoch=0, start_index=0):
        if size < world_size:
            raise DataError(f"{size} samples cannot be shared by {world_size} processes")
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch, self.start_index = epoch, start_index

    def per_rank(self):
        return self.size // self.world_size

    def __len__(self):
        return self.per_rank() - self.start_index

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.per_rank() * self.world_size]
        return iter(order[self.rank::self.world_size][self.start_index:].tolist())
