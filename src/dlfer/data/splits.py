"""Train / val / test construction under the two split protocols.

`official`: FER2013's own usages -- Training for training, PublicTest for validation (model
selection), PrivateTest for the test the literature reports. Cleaning (blanks, label
conflicts, Training images duplicated in the evaluation usages) touches Training only, so
the test set stays the benchmark everyone else reports on.

`paper`: DLFER's protocol -- pool all 35,887 images, augment-balance the pool, *then* split
randomly 80/20 into train/test and 20% of train into validation. Augmented copies of one face
then land on both sides of the split; that leak is what this pipeline measures. The pooling
happens here, the split in augment_balance, so the paper's order is kept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from dlfer.fer2013 import IMAGE_SIDE

SPLIT_OF_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def decode_images(table: pd.DataFrame) -> np.ndarray:
    """The canonical table's pixel bytes as an (N, 48, 48) uint8 array (validate already checked the shape)."""
    flat = np.frombuffer(b"".join(table["pixels"].tolist()), dtype=np.uint8)
    return flat.reshape(len(table), IMAGE_SIDE, IMAGE_SIDE)


def drop_mask(audit: pd.DataFrame, split: np.ndarray, drop_blank: bool, drop_conflicting_labels: bool,
              drop_train_duplicates_of_eval: bool) -> pd.DataFrame:
    """Per-image reasons to drop it (one boolean column per reason); only train/pool rows are ever dropped."""
    trainable = np.isin(split, ("train", "pool"))
    reasons = pd.DataFrame(index=audit.index)
    reasons["blank"] = trainable & drop_blank & audit["blank"].to_numpy(bool)
    reasons["label_conflict"] = trainable & drop_conflicting_labels & audit["label_conflict"].to_numpy(bool)
    leaked = np.zeros(len(split), dtype=bool)
    for column in ("exact_group", "near_group"):
        leaked |= duplicates_of_eval(audit[column].to_numpy(), split)
    reasons["duplicate_of_eval"] = (split == "train") & drop_train_duplicates_of_eval & leaked
    return reasons


def duplicates_of_eval(group: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Train images in a duplicate group (exact or perceptual) that reaches val or test: they leak the answer."""
    in_group = group >= 0
    eval_groups = np.unique(group[in_group & np.isin(split, ("val", "test"))])
    return (split == "train") & in_group & np.isin(group, eval_groups)


def subset_per_class(labels: np.ndarray, selectable: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask keeping at most `per_class` selectable rows of each label (0 keeps everything); others untouched."""
    keep = np.ones(len(labels), dtype=bool)
    if per_class <= 0:
        return keep
    for label in np.unique(labels[selectable]):
        rows = np.flatnonzero(selectable & (labels == label))
        if len(rows) > per_class:
            dropped = rng.choice(rows, size=len(rows) - per_class, replace=False)
            keep[dropped] = False
    return keep


def assign_splits(usages: np.ndarray, protocol: str) -> np.ndarray:
    """The split name of each image: train/val/test from the official usage, or 'pool' under the paper protocol."""
    if protocol == "official":
        return np.array([SPLIT_OF_USAGE[usage] for usage in usages])
    if protocol == "paper":
        return np.full(len(usages), "pool")
    raise ValueError(f"unknown split protocol {protocol!r}; use 'official' or 'paper'")


def paper_split(labels: np.ndarray, seed: int) -> np.ndarray:
    """The paper's random split of a pooled (already augmented) set: 80/20 train/test, then 20% of train as val.

    The paper does not say whether its split is stratified; stratifying keeps the class shares
    equal across splits, which only makes the split's variance smaller.
    """
    indices = np.arange(len(labels))
    train_val, test = train_test_split(indices, test_size=0.2, random_state=seed, stratify=labels)
    train, val = train_test_split(train_val, test_size=0.2, random_state=seed, stratify=labels[train_val])
    split = np.empty(len(labels), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split.astype(str)
