"""What the model trains on is what the data holds: hidden files, labels, the public feature layouts."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import extract_features
import train
from conftest import TINY_UDIT_KWARGS, make_image_folder
from udit.cli import error_message
from udit.data import COMPACT_LAYOUT, DataError, ImageDataset, list_image_folder, open_feature_folder

COMMON = ["--model", "U-DiT-S", "--model-kwargs", TINY_UDIT_KWARGS, "--num-classes", "2",
          "--global-batch-size", "4", "--log-every", "2", "--num-workers", "0"]


def latent(j, shape=(1, 4, 8, 8)):
    """Image j's stored latent: distinct bytes per image, the same bytes every time."""
    return np.random.default_rng(j).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------- hidden names

def add_hidden_entries(root):
    """What Jupyter, git, macOS Finder and macOS zip archives leave in a data folder."""
    png = next((root / "class_0").iterdir()).read_bytes()
    for path in [".ipynb_checkpoints/img_0-checkpoint.png", "__MACOSX/class_0/._img_0.png", ".git/objects/a.png",
                 "class_0/.ipynb_checkpoints/img_0-checkpoint.png", "class_1/._img_0.png",
                 "class_1/deeper/.cache/img.png", "class_1/__MACOSX/img.png"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(png)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "class_1" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "class_1" / "deeper").mkdir(exist_ok=True)
    (root / "class_1" / "deeper" / "visible.png").write_bytes(png)  # a real image in a sub-folder counts
    return root


def test_hidden_folders_and_files_are_neither_classes_nor_samples(tmp_path):
    root = add_hidden_entries(make_image_folder(tmp_path / "images", classes=2, per_class=3, size=8))
    samples, classes = list_image_folder(root)
    assert classes == ["class_0", "class_1"]
    assert [(p[len(str(root)) + 1:], label) for p, label in samples] == [
        ("class_0/img_0.png", 0), ("class_0/img_1.png", 0), ("class_0/img_2.png", 0),
        ("class_1/deeper/visible.png", 1), ("class_1/img_0.png", 1), ("class_1/img_1.png", 1),
        ("class_1/img_2.png", 1)]
    assert ImageDataset(root, 8).labels_present() == [0, 1]


def test_extracted_features_record_only_the_real_classes(tiny_data, tmp_path):
    root = add_hidden_entries(make_image_folder(tmp_path / "images", classes=2, per_class=1, size=8))
    assert extract_features.main(["--data-path", str(root), "--features-path", str(tmp_path / "f"), "--vae-path",
                                  str(tiny_data["vae"]), "--num-workers", "0"]) == 0
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["classes"] == ["class_0", "class_1"] and meta["count"] == 3
    assert np.load(tmp_path / "f" / "labels.npy").tolist() == [0, 1, 1]


def test_an_extraction_resumes_with_the_vae_moved_but_not_with_other_vae_weights(tiny_data, tmp_path, capsys):
    import shutil
    from diffusers.models import AutoencoderKL
    root = make_image_folder(tmp_path / "images", classes=2, per_class=1, size=8)
    moved = shutil.copytree(tiny_data["vae"], tmp_path / "vae")
    common = ["--data-path", str(root), "--features-path", str(tmp_path / "f"), "--num-workers", "0", "--vae-path"]
    assert extract_features.main([*common, str(tiny_data["vae"])]) == 0
    assert extract_features.main([*common, str(moved)]) == 0  # refused before: "vae: PATH vs PATH"
    vae = AutoencoderKL.from_pretrained(moved)
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.01)  # same config, other latents: they were mixed into the store silently
    vae.save_pretrained(moved)
    assert extract_features.main([*common, str(moved)]) == 2
    assert "holds features of another job (vae_digest: " in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("layout", ["fast-DiT", "U-DiT"])
def test_hidden_files_in_feature_folders_are_ignored(tmp_path, layout):
    root = write_release(tmp_path / "f", 4, processes=1 if layout == "fast-DiT" else 2, layout=layout)
    for folder in ("imagenet256_features", "imagenet256_labels"):
        (root / folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / folder / ("._0.npy" if layout == "fast-DiT" else "._0_0.npy")).write_bytes(b"\0\5\26\7")
        (root / folder / ".ipynb_checkpoints").mkdir()
    for hidden in (".ipynb_checkpoints", "__MACOSX/imagenet256_features", ".old_labels"):
        (root / hidden).mkdir(parents=True)
    (root / "._imagenet256_features").write_bytes(b"\0\5\26\7")
    dataset = open_feature_folder(root)
    assert len(dataset) == 4 and torch.equal(dataset[3][0], torch.from_numpy(latent(3)[0]))


# ----------------------------------------------------------------- the public layouts

def write_release(root, count, processes, layout="U-DiT", label=lambda j: j % 3):
    """A feature folder as fast-DiT's / U-DiT's extract_features.py writes it on `processes` processes:
    torch's DistributedSampler without shuffling pads `count` images to a multiple of `processes`
    with copies of the first ones, and process r saves its i-th image as {i}_{r}.npy."""
    feats, labels = root / "imagenet256_features", root / "imagenet256_labels"
    feats.mkdir(parents=True)
    labels.mkdir()
    for r in range(processes):
        for i, j in enumerate(DistributedSampler(range(count), num_replicas=processes, rank=r, shuffle=False)):
            name = f"{i}.npy" if layout == "fast-DiT" else f"{i}_{r}.npy"
            np.save(feats / name, latent(j))
            np.save(labels / name, np.array([label(j)]))
    return root


@pytest.mark.parametrize("count, processes", [
    (16, 8),  # no padding: every file is an image
    (15, 8),  # padding 1, as the released ImageNet set (1,281,167 images on 8 processes)
    (17, 8),  # 24 files, 7 of them copies
    (10, 2), (9, 2), (1, 2),
    (3, 8),   # fewer images than processes: the copies wrap around
])
def test_udit_layout_gives_exactly_the_images_it_holds(tmp_path, count, processes):
    root = write_release(tmp_path / "f", count, processes)
    dataset = open_feature_folder(root, num_classes=3)
    assert len(dataset) == count
    for j in range(count):
        features, label, _ = dataset[j]
        assert torch.equal(features, torch.from_numpy(latent(j)[0])) and label == j % 3


def test_udit_layout_keeps_real_images_that_share_labels_with_the_first(tmp_path):
    root = write_release(tmp_path / "f", 16, 8, label=lambda j: 0)  # one class: labels cannot tell copies
    assert len(open_feature_folder(root)) == 16


def test_udit_layout_with_a_missing_file_is_refused(tmp_path):
    root = write_release(tmp_path / "f", 16, 8)
    for folder in ("imagenet256_features", "imagenet256_labels"):
        (root / folder / "1_3.npy").unlink()
    with pytest.raises(DataError, match="1 of the 16 files of an extraction by 8 processes are missing .*1_3.npy"):
        open_feature_folder(root)


def test_converting_a_padded_release_keeps_every_image_once(tmp_path):
    public = write_release(tmp_path / "public", 17, 8)
    assert extract_features.main(["--convert", str(public), "--features-path", str(tmp_path / "ours"),
                                  "--num-workers", "0"]) == 0
    features, labels = np.load(tmp_path / "ours" / "features.npy"), np.load(tmp_path / "ours" / "labels.npy")
    assert features.shape == (17, 1, 2, 4, 8, 8) and labels.tolist() == [j % 3 for j in range(17)]
    assert np.array_equal(features[16, 0, 0], latent(16)[0].astype(np.float16))


# ----------------------------------------------------------------- labels against --num-classes

def train_on(features, tmp_path, *flags):
    return train.main(["--feature-path", str(features), "--image-size", "64", "--max-steps", "4",
                       "--results-dir", str(tmp_path / "r"), *COMMON, *flags])


@pytest.mark.parametrize("layout", ["fast-DiT", "U-DiT"])
@pytest.mark.parametrize("bad", [2, -1])
def test_a_label_outside_num_classes_is_one_line_naming_the_file(tmp_path, capsys, layout, bad):
    root = write_release(tmp_path / "f", 8, 1 if layout == "fast-DiT" else 2, layout=layout,
                         label=lambda j: bad if j == 5 else j % 2)
    assert train_on(root, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = "5.npy" if layout == "fast-DiT" else "2_1.npy"
    assert len(err) == 1 and f"imagenet256_labels/{name}: label {bad} is not a class index in 0..1 " \
                              f"(--num-classes 2)" in err[0]


def test_a_label_file_that_is_not_one_integer_is_refused(tmp_path):
    root = write_release(tmp_path / "f", 2, 1, layout="fast-DiT")
    np.save(root / "imagenet256_labels" / "1.npy", np.array([1.0]))
    dataset = open_feature_folder(root, num_classes=2)
    assert dataset[0][1] == 0 and dataset.labels_present() is None
    with pytest.raises(DataError, match="1.npy: a label file holds one integer class index, found float64"):
        dataset[1]


def test_a_worker_error_reaches_the_user_as_its_own_line(tmp_path):
    root = write_release(tmp_path / "f", 2, 1, layout="fast-DiT", label=lambda j: 7)
    with pytest.raises(DataError) as info:
        next(iter(DataLoader(open_feature_folder(root, num_classes=2), num_workers=1)))
    assert error_message(info.value) == (f"{root / 'imagenet256_labels' / '0.npy'}: label 7 is not a class index "
                                         f"in 0..1 (--num-classes 2); give --num-classes the data's class count, "
                                         f"or fix the labels")


def write_compact(root, labels, classes=None):
    root.mkdir()
    np.save(root / "features.npy", np.zeros((len(labels), 1, 2, 4, 4, 4), np.float16))
    np.save(root / "labels.npy", np.array(labels, dtype=np.int64))
    meta = {"layout": COMPACT_LAYOUT, "complete": True, "count": len(labels)}
    (root / "meta.json").write_text(json.dumps(meta if classes is None else {**meta, "classes": classes}))
    return root


def test_compact_labels_are_checked_when_opened(tmp_path):
    good = write_compact(tmp_path / "good", [3, 0, 3, 1])
    assert open_feature_folder(good, num_classes=4).labels_present() == [0, 1, 3]
    with pytest.raises(DataError, match=r"labels.npy \(row 0\): label 3 is not a class index in 0..2 "
                                        r"\(--num-classes 3\)"):
        open_feature_folder(good, num_classes=3)
    with pytest.raises(DataError, match=r"labels.npy \(row 1\): label -2 is negative; class indices start at 0"):
        open_feature_folder(write_compact(tmp_path / "negative", [0, -2]))
    with pytest.raises(DataError, match="extracted from 3 class folders, more than --num-classes 2"):
        open_feature_folder(write_compact(tmp_path / "named", [0, 1], classes=["a", "b", "c"]), num_classes=2)


# ----------------------------------------------------------------- image modes

def two_level_image(mode, low, high):
    """A 16 x 16 image of `mode`: the left half holds `low`, the right half `high` (pixel values of the mode)."""
    from PIL import Image
    if mode == "I;16":  # Pillow cannot fill or paste values of 2**15 and above into I;16
        return Image.fromarray(np.repeat(np.array([[low] * 8 + [high] * 8], np.uint16), 16, axis=0))
    image = Image.new(mode, (16, 16), low)
    image.paste(high, (8, 0, 16, 16))
    return image


def palette_image():
    from PIL import Image
    image = Image.new("P", (16, 16), 0)
    image.putpalette([32, 32, 32, 128, 128, 128] + [0] * 762)
    image.paste(1, (8, 0, 16, 16))
    return image


# mode -> (image, file suffix, (R, G, B) expected on the left half, on the right half). Greyscale of
# more than 8 bits holds 1/8 and 1/2 of its full scale (65535 or 1.0): 32 and 128 of 255.
IMAGE_MODES = {
    "L": (lambda: two_level_image("L", 32, 128), ".png", (32,) * 3, (128,) * 3),
    "LA": (lambda: two_level_image("LA", (32, 0), (128, 255)), ".png", (32,) * 3, (128,) * 3),
    "P": (palette_image, ".png", (32,) * 3, (128,) * 3),
    "RGBA": (lambda: two_level_image("RGBA", (10, 20, 30, 0), (200, 100, 50, 255)), ".png", (10, 20, 30), (200, 100, 50)),
    "CMYK": (lambda: two_level_image("CMYK", (255, 0, 0, 0), (0, 0, 0, 0)), ".tif", (0, 255, 255), (255, 255, 255)),
    "I;16": (lambda: two_level_image("I;16", 8192, 32768), ".png", (32,) * 3, (128,) * 3),
    "I": (lambda: two_level_image("I", 8192, 32768), ".tif", (32,) * 3, (128,) * 3),
    "F": (lambda: two_level_image("F", 0.125, 0.5), ".tif", (32,) * 3, (128,) * 3),
}


@pytest.mark.parametrize("mode", list(IMAGE_MODES))
def test_every_image_mode_loads_at_its_real_scale(tmp_path, mode):
    from PIL import Image
    from udit.data import load_rgb
    make, suffix, left, right = IMAGE_MODES[mode]
    make().save(tmp_path / f"img{suffix}")
    assert Image.open(tmp_path / f"img{suffix}").mode == mode  # the file really holds that mode
    rgb = np.asarray(load_rgb(tmp_path / f"img{suffix}"))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert (rgb[:, :8] == left).all() and (rgb[:, 8:] == right).all()


def test_a_16_bit_png_trains_at_its_real_scale_not_saturated(tmp_path):
    (tmp_path / "c0").mkdir()
    two_level_image("I;16", 8192, 32768).save(tmp_path / "c0" / "grey16.png")
    image, _, ok = ImageDataset(tmp_path, 16, flip=False)[0]
    assert ok
    # 1/8 and 1/2 of full scale; convert("RGB") alone gives +1.0 on both halves.
    assert torch.allclose(image[:, :, :8], torch.tensor(32 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(image[:, :, 8:], torch.tensor(128 / 127.5 - 1), atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda: two_level_image("F", 0.0, 255.0), "mode F values span 0..255, outside 0..1"),
    (lambda: two_level_image("I", -1, 70000), "mode I values span -1..70000, outside 0..65535"),
    (lambda: two_level_image("LAB", (50, 0, 0), (50, 0, 0)), "image mode LAB has no known RGB scale"),
])
def test_images_without_a_known_scale_are_refused_in_one_line(tmp_path, make, message):
    from udit.data import load_rgb
    make().save(tmp_path / "img.tif")
    with pytest.raises(DataError, match=message):
        load_rgb(tmp_path / "img.tif")
