import numpy as np
import pandas as pd
import pytest

from dlfer.data import splits


def test_official_protocol_maps_usages_to_splits():
    usages = np.array(["Training", "PublicTest", "PrivateTest", "Training"])
    assert splits.assign_splits(usages, "official").tolist() == ["train", "val", "test", "train"]
    assert set(splits.assign_splits(usages, "paper")) == {"pool"}
    with pytest.raises(ValueError, match="unknown split protocol"):
        splits.assign_splits(usages, "random")


def test_duplicates_of_eval_marks_only_train_members_of_groups_that_reach_eval():
    exact_group = np.array([0, 0, 1, 1, -1, 2, 2])
    split = np.array(["train", "test", "train", "train", "train", "val", "train"])
    assert splits.duplicates_of_eval(exact_group, split).tolist() == [True, False, False, False, False, False, True]


def test_near_duplicates_of_eval_are_dropped_from_train_too():
    audit = pd.DataFrame({"blank": False, "label_conflict": False, "exact_group": [-1, -1, -1],
                          "near_group": [4, 4, -1]})
    split = np.array(["train", "val", "train"])
    reasons = splits.drop_mask(audit, split, False, False, drop_train_duplicates_of_eval=True)
    assert reasons["duplicate_of_eval"].tolist() == [True, False, False]


def test_drop_mask_never_drops_validation_or_test_rows():
    audit = pd.DataFrame({"blank": [True, True, False], "label_conflict": [False, True, True],
                          "exact_group": [-1, 0, 0], "near_group": [-1, -1, -1]})
    split = np.array(["train", "test", "train"])
    reasons = splits.drop_mask(audit, split, drop_blank=True, drop_conflicting_labels=True,
                               drop_train_duplicates_of_eval=True)
    assert reasons.any(axis=1).tolist() == [True, False, True]
    kept = splits.drop_mask(audit, split, drop_blank=False, drop_conflicting_labels=False,
                            drop_train_duplicates_of_eval=False)
    assert not kept.any(axis=None)


def test_subset_per_class_caps_each_selectable_class_and_is_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 5)
    selectable = np.ones(len(labels), bool)
    selectable[-5:] = False  # class 2 sits in val: never subset
    first = splits.subset_per_class(labels, selectable, 4, np.random.default_rng(1))
    second = splits.subset_per_class(labels, selectable, 4, np.random.default_rng(1))
    assert first.tolist() == second.tolist()
    assert first[labels == 0].sum() == 4 and first[labels == 1].sum() == 3 and first[labels == 2].all()
    assert splits.subset_per_class(labels, selectable, 0, np.random.default_rng(1)).all()


def test_paper_split_is_80_20_then_20_percent_of_train_as_val_and_seeded():
    labels = np.repeat(np.arange(7), 100)
    split = splits.paper_split(labels, seed=3)
    counts = {name: int((split == name).sum()) for name in ("train", "val", "test")}
    assert counts == {"train": 448, "val": 112, "test": 140}
    assert np.array_equal(split, splits.paper_split(labels, seed=3))
    assert not np.array_equal(split, splits.paper_split(labels, seed=4))


def test_decode_images_reshapes_pixel_bytes():
    images = np.arange(2 * 48 * 48, dtype=np.uint32).astype(np.uint8).reshape(2, 48, 48)
    table = pd.DataFrame({"pixels": [image.tobytes() for image in images]})
    assert np.array_equal(splits.decode_images(table), images)
