"""dlfer.evaluation.leak: which test faces training has already seen, as an augmented copy or a duplicate."""

import numpy as np
import pandas as pd

from dlfer.evaluation import leak


def audit(groups: dict[str, tuple[int, int]]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(groups), "exact_group": [exact for exact, _ in groups.values()],
                         "near_group": [near for _, near in groups.values()]})


def test_an_augmented_copy_on_either_side_is_a_sibling():
    table = audit({"a": (-1, -1), "b": (-1, -1), "c": (-1, -1)})
    # The paper's protocol: test holds a's original and a copy of b; train holds a copy of a and b itself.
    siblings = leak.train_siblings(np.array(["a", "b~aug2", "c"]), np.array(["a~aug0", "b"]), table)
    assert siblings["augmented_sibling"].tolist() == [True, True, False]
    assert not siblings["duplicate_in_train"].any()


def test_a_duplicate_counts_only_when_another_face_of_its_group_is_in_train():
    table = audit({"t1": (0, -1), "x": (0, -1), "t2": (-1, 3), "y": (-1, 3), "t3": (1, 4), "t4": (-1, -1)})
    test_ids = np.array(["t1", "t2", "t3", "t4~aug0"])
    siblings = leak.train_siblings(test_ids, np.array(["x", "y~aug1", "t3~aug0", "t4"]), table)
    # t1: exact duplicate x in train; t2: near duplicate y (as a copy) in train; t3: only itself in its
    # groups, so an augmented sibling but no duplicate; t4: its own original in train.
    assert siblings["duplicate_in_train"].tolist() == [True, True, False, False]
    assert siblings["augmented_sibling"].tolist() == [False, False, True, True]


def test_leak_metrics_split_accuracy_by_sibling_and_say_null_for_an_empty_side():
    siblings = pd.DataFrame({"augmented_sibling": [True, False, False, False],
                             "duplicate_in_train": [True, True, False, False]})
    siblings["any"] = siblings["augmented_sibling"] | siblings["duplicate_in_train"]
    result = leak.leak_metrics(siblings, np.array([True, False, True, True]))
    assert result["leak_test_with_train_sibling"] == 2 and result["leak_share_of_test"] == 0.5
    assert (result["leak_test_with_augmented_sibling"], result["leak_test_with_duplicate_in_train"]) == (1, 2)
    assert result["test_accuracy_with_train_sibling"] == 0.5
    assert result["test_accuracy_without_train_sibling"] == 1.0
    none = siblings.assign(any=False, augmented_sibling=False, duplicate_in_train=False)
    assert leak.leak_metrics(none, np.array([True, False, True, True]))["test_accuracy_with_train_sibling"] is None
