"""augment_balance: balance the training classes with the paper's augmentation.

Reads   data/prepared/dataset.npz (preprocess)
Writes  data/balanced/train.npz, data/balanced/val.npz, data/balanced/test.npz: images (N,48,48)
        uint8, labels (N,), ids (N,) -- augmented copies get ids '<original id>~aug<k>';
        reports/augment_balance/samples.png (originals and augmented copies per class);
        metrics/augment_balance.json (class counts before and after)
Params  seed, preprocess.protocol, augment_balance.*

official protocol: only train is augmented; val and test pass through untouched.
paper protocol: the whole pool is augmented first, then split 80/20 and 20% of train as val
(the paper's order, which leaks augmented copies of a face across the split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from dlfer import tracking  # noqa: E402
from dlfer.data import augment, splits
from dlfer.fer2013 import EMOTIONS  # noqa: E402
from dlfer.files import atomic_path, write_json  # noqa: E402
from dlfer.params import ParamsError, load_params  # noqa: E402

SPLITS = ("train", "val", "test")


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return {emotion: int((labels == index).sum()) for index, emotion in enumerate(EMOTIONS)}


def balance(images, labels, ids, params, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    settings = augment.AugmentSettings(params.rotation_degrees, params.zoom, params.shift,
                                       params.horizontal_flip, params.fill_mode)
    copies = augment.balance_plan(labels, params.target_per_class, params.max_copies_per_image, rng)
    augmented, sources = augment.augment_copies(images, copies, settings, rng)
    copy_number = np.concatenate([np.arange(count) for count in copies]) if len(sources) else np.zeros(0, int)
    augmented_ids = np.array([f"{ids[source]}~aug{k}" for source, k in zip(sources, copy_number)], dtype=str)
    return (np.concatenate([images, augmented]), np.concatenate([labels, labels[sources]]),
            np.concatenate([ids.astype(str), augmented_ids]))


def build_splits(dataset, protocol: str, params, seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images, labels, ids, split = (dataset[key] for key in ("images", "labels", "ids", "split"))
    if protocol == "paper":
        images, labels, ids = balance(images, labels, ids, params, rng)
        split = splits.paper_split(labels, seed)
    else:
        train = split == "train"
        balanced = balance(images[train], labels[train], ids[train], params, rng)
        images, labels, ids = (np.concatenate([part, whole[~train]]) for part, whole in
                               zip(balanced, (images, labels, ids)))
        split = np.concatenate([np.full(len(balanced[0]), "train"), split[~train]])
    return {name: {"images": images[split == name], "labels": labels[split == name], "ids": ids[split == name]}
            for name in SPLITS}


def is_augmented(ids: np.ndarray) -> np.ndarray:
    return np.char.find(ids.astype(str), "~aug") >= 0


def sample_grid(train: dict, path: Path, per_class: int = 6) -> None:
    """For each class: one original training image followed by augmented copies of it."""
    augmented = is_augmented(train["ids"])
    figure, axes = plt.subplots(len(EMOTIONS), per_class, figsize=(per_class * 1.2, len(EMOTIONS) * 1.3))
    for row, emotion in enumerate(EMOTIONS):
        of_class = train["labels"] == row
        copies = np.flatnonzero(of_class & augmented)
        if len(copies):
            original_id = train["ids"][copies[0]].split("~")[0]
            family = np.char.startswith(train["ids"].astype(str), original_id + "~")
            chosen = list(np.flatnonzero(train["ids"] == original_id)[:1]) + list(np.flatnonzero(family))
        else:  # the largest class gets no copies
            chosen = list(np.flatnonzero(of_class))
        for column in range(per_class):
            axes[row, column].axis("off")
            if column < len(chosen):
                axes[row, column].imshow(train["images"][chosen[column]], cmap="gray", vmin=0, vmax=255)
        axes[row, 0].set_title(f"{emotion}: original, then augmented copies", fontsize=7, loc="left")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dataset", type=Path, default=Path("data/prepared/dataset.npz"))
    parser.add_argument("--out-dir", type=Path, default=Path("data/balanced"))
    parser.add_argument("--samples", type=Path, default=Path("reports/augment_balance/samples.png"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/augment_balance.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    tracking.configure()  # fail fast on an unreachable tracking server, before any work
    try:
        params = load_params(args.params)
        if not args.dataset.is_file():
            raise FileNotFoundError(f"{args.dataset}: not found; run `dvc repro preprocess` first")
        with np.load(args.dataset) as stored:
            dataset = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, ParamsError) as error:
        sys.exit(f"augment_balance: {error}")
    protocol = params.preprocess.protocol
    before = dataset["labels"][dataset["split"] == ("pool" if protocol == "paper" else "train")]
    result = build_splits(dataset, protocol, params.augment_balance, params.seed)
    metrics = {"protocol": protocol, "before": class_counts(before),
               "after": class_counts(result["train"]["labels"]),
               "augmented_images": int(sum(is_augmented(part["ids"]).sum() for part in result.values())),
               **{f"n_{name}": int(len(part["labels"])) for name, part in result.items()}}
    for name, part in result.items():
        with atomic_path(args.out_dir / f"{name}.npz") as temporary:
            with temporary.open("wb") as handle:
                np.savez(handle, **part)
    sample_grid(result["train"], args.samples)
    write_json(args.metrics, metrics)
    with tracking.stage_run("augment_balance", {"seed": params.seed, "protocol": protocol,
                                                **params.section("augment_balance")}, tags={"protocol": protocol}):
        tracking.log_numeric_metrics({**metrics, "seconds": round(time.perf_counter() - started, 2)})
        mlflow.log_artifact(str(args.samples))
        mlflow.log_artifact(str(args.metrics))
    print(f"augment_balance: {metrics['n_train']} train ({metrics['augmented_images']} augmented), "
          f"{metrics['n_val']} val, {metrics['n_test']} test")


if __name__ == "__main__":
    main()
