"""finetune: EF-FER2, the emotion classifier, trained with or without EF-FER1's weights (the paper's ablation).

Reads   --train, --val       data/balanced/{train,val}.npz: images (N,48,48) uint8, labels (N,) Kaggle order, ids.
                             Never the test split: only the evaluate stage reads it.
        --audit              data/validated/audit.parquet: must exist (training waits for validation)
        --pretrained         models/pretrain/ (pretrain): backbone.weights.h5 and provenance.json
Writes  --out                models/finetune/<variant>/: model.keras (the whole EF-FER2, preprocessing inside:
                             (N,48,48,1) pixels 0-255 -> (N,7) probabilities), provenance.json (with the
                             training's seconds, speed and resumed_at_epoch), mlflow_run.json
        --checkpoints        checkpoints/finetune/<variant>/: resumable training state (DVC persist: a killed
                             run resumes from its last finished epoch, continues its MLflow run and ends with
                             the metrics of a run never killed; a params or data change starts fresh)
        --metrics            metrics/finetune_<variant>.json: only figures a rerun reproduces (no timings)
        --plots              plots/finetune_<variant>.csv: per-epoch train/val accuracy and loss (paper Fig. 5)
Params  seed, preprocess.protocol (MLflow tag), augment_balance.* (provenance only),
        pretrain.* (source, backbone), finetune.*
MLflow  run finetune_<variant>, tags stage=finetune, variant, protocol, resumed_at_epoch; params, per-epoch
        and final metrics (timings among them), the model (name "model"), provenance.json and the plots CSV

--variant with_ef_fer1     the backbone starts from EF-FER1 (random, with a warning, when pretrain.source is none)
--variant without_ef_fer1  the backbone starts from random weights, whatever pretrain did
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from dlfer import tracking
from dlfer.fer2013 import EMOTIONS, IMAGE_SIDE
from dlfer.files import atomic_directory, atomic_path, read_json, sha256_of_file, write_json
from dlfer.model import backbones, class_bias, distributed, train
from dlfer.params import VARIANTS, ParamsError, load_params

PREDICT_BATCH_SIZE = 256
# What the logged MLflow model needs; listing it skips MLflow's slow requirement inference.
MODEL_REQUIREMENTS = ["tensorflow", "keras"]


class FinetuneInputError(ValueError):
    """An input of the finetune stage is missing or malformed; the message names it and the fix."""


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FinetuneInputError(f"{path}: not found; run `dvc repro augment_balance` first")
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["images"], archive["labels"]
    except (KeyError, OSError, ValueError) as error:
        raise FinetuneInputError(f"{path}: not an npz with images and labels ({error}); "
                                 "rerun `dvc repro augment_balance`") from None
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or images.dtype != np.uint8:
        raise FinetuneInputError(f"{path}: images must be (N,{IMAGE_SIDE},{IMAGE_SIDE}) uint8, got "
                                 f"{images.shape} {images.dtype}; rerun `dvc repro augment_balance`")
    if len(images) == 0 or labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise FinetuneInputError(f"{path}: needs N>0 images and N integer labels, got {len(images)} images and "
                                 f"labels {labels.shape} {labels.dtype}")
    if labels.min() < 0 or labels.max() >= len(EMOTIONS):
        raise FinetuneInputError(f"{path}: labels must lie in 0..{len(EMOTIONS) - 1} (Kaggle order), "
                                 f"found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


def pretrained_backbone(variant: str, params, pretrained_dir: Path):
    """(EF-FER1's backbone to start from or None, a provenance note) for this variant."""
    if variant == "without_ef_fer1":
        return None, {"initialisation": "random (without EF-FER1)"}
    provenance_path = pretrained_dir / "provenance.json"
    if not provenance_path.is_file():
        raise FinetuneInputError(f"{provenance_path}: not found; run `dvc repro pretrain` first")
    provenance = read_json(provenance_path)
    if provenance["source"] == "none":
        warnings.warn("pretrain.source is none: the with_ef_fer1 variant starts from random weights, "
                      "exactly like without_ef_fer1", stacklevel=2)
        return None, {"initialisation": "random (pretrain.source is none)"}
    if provenance["backbone"] != params.finetune.backbone:
        raise FinetuneInputError(f"{provenance_path}: EF-FER1 is a {provenance['backbone']} but finetune.backbone is "
                                 f"{params.finetune.backbone}; set both to the same backbone and rerun")
    weights_path = pretrained_dir / "backbone.weights.h5"
    if not weights_path.is_file():
        raise FinetuneInputError(f"{weights_path}: not found; rerun `dvc repro pretrain`")
    source = backbones.build_backbone(provenance["backbone"], params.finetune.image_size,
                                   channels=provenance.get("channels", 3))
    source.load_weights(weights_path)
    return source, {"initialisation": f"EF-FER1 ({provenance['source']})",
                    "pretrained_weights_sha256": sha256_of_file(weights_path)}


def evaluate_best(model, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and macro-F1 of the best weights on the validation split, in inference mode.

    The loss comes from the training history instead: Keras computes it from the logits, unclipped,
    which probabilities alone cannot reproduce.
    """
    probabilities = model.predict(images[..., np.newaxis].astype(np.float32), batch_size=PREDICT_BATCH_SIZE,
                                  verbose=0)
    predicted = probabilities.argmax(axis=1)
    return {"val_accuracy": float((predicted == labels).mean()),
            "val_macro_f1": float(f1_score(labels, predicted, average="macro", labels=range(len(EMOTIONS)),
                                           zero_division=0))}


def fit_class_bias(model, images: np.ndarray, labels: np.ndarray, objective: str) -> dict:
    """Fit the per-class logit offsets on the validation split's objective (val_macro_f1 or val_accuracy) and
    fold them into the model's head; returns the offsets and the objective before and after. The views are each
    face and its mirror, as evaluate makes them with flip_tta (the default): a finetune param rather than
    evaluate's, so that switching TTA reruns evaluate only."""
    bias, before, after = class_bias.fit_class_bias(class_bias.predict_views(model, images, flip_tta=True), labels,
                                                    objective)
    class_bias.add_to_head(model, bias)
    print(f"finetune: class bias fitted on {objective.replace('val_', 'validation ')} ({before:.4f} -> {after:.4f}): "
          + ", ".join(f"{emotion} {offset:+.2f}" for emotion, offset in zip(EMOTIONS, bias)))
    return {f"class_bias_{objective}_before": before, f"class_bias_{objective}_after": after,
            **{f"class_bias_{emotion}": float(offset) for emotion, offset in zip(EMOTIONS, bias)}}


def write_plots(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=train.HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def log_model(model, example: np.ndarray) -> None:
    tracking.log_keras_model(model, "model", example[..., np.newaxis].astype(np.float32), MODEL_REQUIREMENTS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--train", type=Path, default=Path("data/balanced/train.npz"))
    parser.add_argument("--val", type=Path, default=Path("data/balanced/val.npz"))
    parser.add_argument("--audit", type=Path, default=Path("data/validated/audit.parquet"))
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrain"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        params = load_params(arguments.params)
        tracking.configure()  # fail fast on an unreachable tracking store, before any work
        settings = train.TrainingSettings.from_params(params.finetune, params.seed)
        ray = distributed.RaySettings.from_params(params.finetune) if settings.distribution == "ray" else None
        runtime = train.configure_runtime(settings)
        if not arguments.audit.is_file():
            raise FinetuneInputError(f"{arguments.audit}: not found; run `dvc repro validate` first")
        if params.finetune.backbone not in backbones.BACKBONES:
            raise ParamsError(f"params.yaml: finetune.backbone is {params.finetune.backbone!r}; choose one of "
                              f"{', '.join(backbones.BACKBONES)}")
        train_split, val_split = load_split(arguments.train), load_split(arguments.val)
        source, initialisation = pretrained_backbone(arguments.variant, params, arguments.pretrained)
    except (OSError, ValueError) as error:
        sys.exit(f"finetune: {error}")

    preprocess, finetune = params.preprocess, params.finetune
    logged_params = {"seed": params.seed, "variant": arguments.variant, "preprocess": params.section("preprocess"),
                     "augment_balance": params.section("augment_balance"), "pretrain": params.section("pretrain"),
                     "finetune": params.section("finetune")}
    data_hashes = {"train_sha256": sha256_of_file(arguments.train), "val_sha256": sha256_of_file(arguments.val)}
    checkpoint_dir = train.keyed_checkpoint_dir(arguments.checkpoints,
                                                {**logged_params, **data_hashes, **initialisation})

    def build():
        return backbones.build_classifier(finetune.backbone, finetune.image_size, finetune.channels,
                                          finetune.dropout, pretrained_backbone=source,
                                          batch_norm_momentum=finetune.batch_norm_momentum)

    # A killed run left its MLflow run RUNNING and its id beside its training state: continue that run.
    with tracking.stage_run("finetune", logged_params, run_name=f"finetune_{arguments.variant}",
                            tags={"variant": arguments.variant, "protocol": preprocess.protocol,
                                  "initialisation": initialisation["initialisation"]},
                            resume_run_id=train.recorded_run_id(checkpoint_dir, tracking.tracking_uri())) as run:
        train.record_run(checkpoint_dir, run.info.run_id, tracking.tracking_uri())
        result = distributed.fit(build, train_split, val_split, settings, checkpoint_dir, len(EMOTIONS),
                                 runtime=runtime, ray=ray, log_to_mlflow=True)
        bias_metrics = (fit_class_bias(result.model, *val_split, finetune.class_bias)
                        if finetune.class_bias != "none" else {})
        # Only what a rerun reproduces, killed and resumed or not, so that DVC sees no change without one.
        metrics = {"train_accuracy": result.best["accuracy"], "val_loss": result.best["val_loss"], **bias_metrics,
                   **evaluate_best(result.model, *val_split), "best_epoch": result.best_epoch,
                   "epochs_run": result.epochs_run, "epochs_planned": finetune.epochs,
                   # The time budget is a safety net: a run it stopped depends on the machine's speed.
                   "truncated": result.stopped_by == "max_seconds",
                   "train_images": len(train_split[0]), "val_images": len(val_split[0])}
        # How this run went, which differs between runs: provenance and MLflow only.
        training = {"seconds": round(result.seconds, 2), "images_per_second": round(result.train_images_per_second, 2),
                    "resumed_at_epoch": result.resumed_at_epoch}
        provenance = {"variant": arguments.variant, **initialisation, "params": logged_params, **data_hashes,
                      "git_commit": tracking.git_commit(), "best_epoch": result.best_epoch,
                      "stopped_by": result.stopped_by, "runtime": result.runtime, "training": training}
        run_record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                      "tracking_uri": tracking.tracking_uri()}
        # MLflow first: if logging fails, no output claims a run that lacks its model.
        log_model(result.model, val_split[0][:2])
        data_name = f"FER2013 ({preprocess.protocol} protocol)"
        tracking.log_dataset(*train_split, f"{data_name} train", arguments.train, "training")
        tracking.log_dataset(*val_split, f"{data_name} val", arguments.val, "validation")
        tracking.log_training_curves(result.history, f"finetune {arguments.variant}")
        tracking.log_numeric_metrics({**metrics, "training_seconds": training["seconds"],
                                      "train_images_per_second": training["images_per_second"],
                                      "seconds": round(time.perf_counter() - started, 2)})

        import mlflow

        mlflow.set_tag("resumed_at_epoch", result.resumed_at_epoch)
        with atomic_directory(arguments.out) as temporary:
            result.model.save(temporary / "model.keras")
            write_json(temporary / "provenance.json", provenance)
            write_json(temporary / "mlflow_run.json", run_record)
        write_plots(arguments.plots, result.history)
        write_json(arguments.metrics, metrics)
        mlflow.log_artifact(str(arguments.out / "provenance.json"))
        mlflow.log_artifact(str(arguments.plots))
    print(f"finetune {arguments.variant}: {metrics}")


if __name__ == "__main__":
    main()
