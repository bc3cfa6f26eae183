"""preprocess: build the train / val / test splits under the chosen protocol.

Reads   data/raw/fer2013.parquet (fetch), data/validated/audit.parquet (validate)
Writes  data/prepared/dataset.npz: images (N,48,48) uint8, labels (N,), ids (N,), split (N,)
        with split in train/val/test (official) or pool (paper: split after augmentation);
        metrics/preprocess.json
Params  seed, preprocess.protocol, preprocess.drop_*, preprocess.subset_per_class

Images stay 48x48 uint8 here: at the paper's 224x224x3 float32, Training alone is 17 GB. The
model resizes inside itself (finetune.image_size, finetune.channels), so
the stored data is 83 MB and inference cannot drift from training.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from dlfer import tracking
from dlfer.data import splits
from dlfer.files import atomic_path, write_json
from dlfer.params import ParamsError, load_params


def load_inputs(raw_path: Path, audit_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    for path, stage in ((raw_path, "fetch"), (audit_path, "validate")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run `dvc repro {stage}` first")
    table = pd.read_parquet(raw_path)
    audit = pd.read_parquet(audit_path).set_index("image_id").reindex(table["image_id"])
    if audit.isna().any(axis=None):
        raise ValueError(f"{audit_path}: does not cover every image of {raw_path}; rerun `dvc repro validate`")
    return table, audit.reset_index()


def build_dataset(table: pd.DataFrame, audit: pd.DataFrame, params, seed: int) -> tuple[dict, dict]:
    """Arrays of the kept images with their split, and the counts of what was dropped and why."""
    rng = np.random.default_rng(seed)
    split = splits.assign_splits(table["usage"].to_numpy(), params.protocol)
    reasons = splits.drop_mask(audit, split, params.drop_blank, params.drop_conflicting_labels,
                               params.drop_train_duplicates_of_eval)
    keep = ~reasons.any(axis=1).to_numpy()
    labels = table["label"].to_numpy(np.int64)
    keep &= splits.subset_per_class(labels, keep & np.isin(split, ("train", "pool")), params.subset_per_class, rng)
    kept = table[keep]
    dataset = {
        "images": splits.decode_images(kept),
        "labels": labels[keep],
        "ids": kept["image_id"].to_numpy(str),
        "split": split[keep],
    }
    summary = {f"dropped_{reason}": int(reasons[reason].sum()) for reason in reasons.columns}
    summary["dropped_by_subset"] = int((~keep).sum() - reasons.any(axis=1).sum())
    for name in np.unique(dataset["split"]):
        summary[f"n_{name}"] = int((dataset["split"] == name).sum())
    return dataset, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw/fer2013.parquet"))
    parser.add_argument("--audit", type=Path, default=Path("data/validated/audit.parquet"))
    parser.add_argument("--out", type=Path, default=Path("data/prepared/dataset.npz"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/preprocess.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    tracking.configure()  # fail fast on an unreachable tracking server, before any work
    try:
        params = load_params(args.params)
        table, audit = load_inputs(args.raw, args.audit)
        dataset, summary = build_dataset(table, audit, params.preprocess, params.seed)
    except (OSError, ValueError, ParamsError) as error:
        sys.exit(f"preprocess: {error}")
    summary["protocol"] = params.preprocess.protocol
    with atomic_path(args.out) as temporary:
        with temporary.open("wb") as handle:
            np.savez(handle, **dataset)
    write_json(args.metrics, summary)
    with tracking.stage_run("preprocess", {"seed": params.seed, **params.section("preprocess")},
                            tags={"protocol": params.preprocess.protocol}):
        tracking.log_numeric_metrics({**summary, "seconds": round(time.perf_counter() - started, 2)})
        mlflow.log_artifact(str(args.metrics))
    print(f"preprocess: {summary}")


if __name__ == "__main__":
    main()
