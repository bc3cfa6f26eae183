"""preprocess.match_training_sharpness: the sigma estimate on synthetic and real FER2013 faces."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from conftest import FER2013_ZIP, require
from dlfer.sharpness import gaussian_blur, match_training_sharpness, matching_sigma
from dlfer.validation import laplacian_variance


def smooth_random_faces(count: int, seed: int = 0) -> np.ndarray:
    """Sharp-edged 48x48 images: random blocks, like the hard edges a face photo has."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (count, 12, 12), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)


def test_recovers_the_sigma_that_blurred_the_reference():
    sharp = smooth_random_faces(300)
    for sigma in (1.5, 3.0):
        reference = gaussian_blur(smooth_random_faces(300, seed=1), sigma)
        assert abs(matching_sigma(reference, sharp) - sigma) < 0.25


def test_equally_sharp_usages_are_left_alone():
    images = smooth_random_faces(60)
    usages = np.array(["Training"] * 40 + ["PublicTest"] * 10 + ["PrivateTest"] * 10)
    matched, summary = match_training_sharpness(images, usages)
    assert summary["eval_blur_sigma"] == 0.0 and summary["eval_images_blurred"] == 0
    assert np.array_equal(matched, images)


def test_only_the_evaluation_usages_are_blurred():
    images = smooth_random_faces(60)
    usages = np.array(["Training"] * 40 + ["PublicTest"] * 10 + ["PrivateTest"] * 10)
    images[:40] = gaussian_blur(images[:40], 2.5)
    matched, summary = match_training_sharpness(images, usages)
    assert 2.2 < summary["eval_blur_sigma"] < 2.8 and summary["eval_images_blurred"] == 20
    assert np.array_equal(matched[:40], images[:40])
    ratio = summary["sharpness_median_eval_after"] / summary["sharpness_median_training"]
    assert 0.8 < ratio < 1.25


def test_real_fer2013_training_faces_are_the_test_faces_blurred_by_about_three_pixels():
    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        names = archive.namelist()
        def read(prefix: str) -> np.ndarray:
            chosen = [name for name in names if f"/{prefix}_" in name][::40][:200]
            return np.stack([np.array(Image.open(io.BytesIO(archive.read(name)))) for name in chosen])
        training, private_test = read("Training"), read("PrivateTest")
    sigma = matching_sigma(training, private_test)
    assert 2.5 < sigma < 3.5  # 3.01 on all of the shared copy; sharp Kaggle data gives 0
    blurred = gaussian_blur(private_test, sigma)
    ratio = np.median(laplacian_variance(blurred)) / np.median(laplacian_variance(training))
    assert 0.8 < ratio < 1.25
