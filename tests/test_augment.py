import dataclasses

import numpy as np

from dlfer.data import augment

PAPER = augment.AugmentSettings(rotation_degrees=10, zoom=0.2, shift=0.1, horizontal_flip=0.5, fill_mode="nearest")
IDENTITY = augment.AugmentSettings(rotation_degrees=0, zoom=0, shift=0, horizontal_flip=0, fill_mode="nearest")


def face_like_image(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(48, 48), dtype=np.uint8)


def test_identity_settings_return_the_image_unchanged():
    image = face_like_image()
    assert np.array_equal(augment.random_affine(image, IDENTITY, np.random.default_rng(0)), image)


def test_always_flip_mirrors_the_image():
    image = face_like_image()
    flip_only = augment.AugmentSettings(0, 0, 0, horizontal_flip=1.0, fill_mode="nearest")
    assert np.array_equal(augment.random_affine(image, flip_only, np.random.default_rng(0)), image[:, ::-1])


def test_paper_augmentation_changes_the_image_keeps_range_and_is_seeded():
    image = face_like_image()
    first = augment.random_affine(image, PAPER, np.random.default_rng(7))
    again = augment.random_affine(image, PAPER, np.random.default_rng(7))
    other = augment.random_affine(image, PAPER, np.random.default_rng(8))
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, image) and not np.array_equal(first, other)


def test_shift_moves_content_and_nearest_fill_repeats_the_edge():
    image = np.zeros((48, 48), np.uint8)
    image[:, :4] = 200  # a bright left edge
    shift_only = augment.AugmentSettings(0, 0, shift=0.1, horizontal_flip=0, fill_mode="nearest")
    shifted = augment.random_affine(image, shift_only, np.random.default_rng(0))
    assert not np.array_equal(shifted, image)
    # An evenly bright face: whatever the shift, nearest fill repeats the border, so no pixel changes;
    # constant fill (zeros) would leave a dark band where the shift uncovered the border.
    bright = np.full((48, 48), 200, np.uint8)
    for seed in range(5):
        assert np.all(augment.random_affine(bright, shift_only, np.random.default_rng(seed)) == 200)
    constant = dataclasses.replace(shift_only, fill_mode="constant")
    assert (augment.random_affine(bright, constant, np.random.default_rng(0)) == 0).any()


def test_balance_plan_brings_every_class_to_the_largest():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    copies = augment.balance_plan(labels, target_per_class=0, max_copies_per_image=0, rng=np.random.default_rng(0))
    totals = {label: int((labels == label).sum() + copies[labels == label].sum()) for label in (0, 1, 2)}
    assert totals == {0: 10, 1: 10, 2: 10}
    assert copies[labels == 1].max() - copies[labels == 1].min() <= 1  # spread evenly


def test_balance_plan_respects_target_and_cap():
    labels = np.array([0] * 10 + [1] * 2)
    copies = augment.balance_plan(labels, target_per_class=12, max_copies_per_image=3, rng=np.random.default_rng(0))
    assert copies[labels == 0].sum() == 2
    assert copies[labels == 1].tolist() == [3, 3]  # capped: class 1 stays at 8 < 12


def test_augment_copies_records_sources():
    images = np.stack([face_like_image(seed) for seed in range(3)])
    augmented, sources = augment.augment_copies(images, np.array([0, 2, 1]), PAPER, np.random.default_rng(0))
    assert sources.tolist() == [1, 1, 2]
    assert augmented.shape == (3, 48, 48)
