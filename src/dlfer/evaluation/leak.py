"""How much of the test split the model has already seen in training: the leak, measured per image.

A test image "has a sibling in train" when training holds
- an augmented copy of the same face, or the face itself when the test image is a copy
  (ids '<original id>~aug<k>', written by augment_balance): possible only under the paper's
  protocol, which augments before it splits;
- an exact or perceptual duplicate of its face (validate's exact_group / near_group), another
  FER2013 image: the official usages hold such pairs, and preprocess drops the Training ones
  (preprocess.drop_train_duplicates_of_eval).
Accuracy on test images with and without a sibling, side by side, is the leak in points.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DUPLICATE_GROUPS = ("exact_group", "near_group")


def original_ids(ids: np.ndarray) -> np.ndarray:
    """The FER2013 image id each image came from: augmented copies '<id>~aug<k>' map to '<id>'."""
    return np.char.partition(ids.astype(str), "~")[:, 0]


def train_siblings(test_ids: np.ndarray, train_ids: np.ndarray, audit: pd.DataFrame) -> pd.DataFrame:
    """Per test image: augmented_sibling, duplicate_in_train, any (booleans), in test_ids' order."""
    test_faces, train_faces = original_ids(test_ids), np.unique(original_ids(train_ids))
    augmented_sibling = np.isin(test_faces, train_faces)
    groups = audit.set_index("image_id")
    duplicate = np.zeros(len(test_ids), dtype=bool)
    for column in DUPLICATE_GROUPS:
        group_of = groups[column]
        test_group = group_of.reindex(test_faces).fillna(-1).to_numpy(np.int64)
        train_group = group_of.reindex(train_faces).fillna(-1).to_numpy(np.int64)
        # How many distinct train faces each group holds; a test face in train itself does not count as its
        # own duplicate (that is the augmented-sibling case).
        faces_in_train = pd.Series(train_group[train_group >= 0]).value_counts()
        in_group = faces_in_train.reindex(test_group).fillna(0).to_numpy(np.int64)
        others = in_group - augmented_sibling.astype(np.int64)
        duplicate |= (test_group >= 0) & (others > 0)
    return pd.DataFrame({"augmented_sibling": augmented_sibling, "duplicate_in_train": duplicate,
                         "any": augmented_sibling | duplicate})


def leak_metrics(siblings: pd.DataFrame, correct: np.ndarray) -> dict:
    """Counts of test images with a train sibling, and accuracy on those with one and on those without.

    An accuracy over no images is reported as null (JSON), never as a number.
    """
    with_sibling = siblings["any"].to_numpy(bool)

    def accuracy(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    return {"leak_test_with_augmented_sibling": int(siblings["augmented_sibling"].sum()),
            "leak_test_with_duplicate_in_train": int(siblings["duplicate_in_train"].sum()),
            "leak_test_with_train_sibling": int(with_sibling.sum()),
            "leak_share_of_test": float(with_sibling.mean()),
            "test_accuracy_with_train_sibling": accuracy(with_sibling),
            "test_accuracy_without_train_sibling": accuracy(~with_sibling)}
