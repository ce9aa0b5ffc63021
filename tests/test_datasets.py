"""What the model trains on is what the data holds: the public feature layouts."""

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

import extract_features
from udit.data import DataError, open_feature_folder


def latent(j, shape=(1, 4, 8, 8)):
    """Image j's stored latent: distinct bytes per image, the same bytes every time."""
    return np.random.default_rng(j).normal(size=shape).astype(np.float32)


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
    dataset = open_feature_folder(root)
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
