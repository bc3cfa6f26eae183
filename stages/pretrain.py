"""pretrain: EF-FER1, the backbone whose weights EF-FER2 starts from (the paper's section 2.3).

Reads   --source-domain  data/raw/source_domain.npz (fetch): train_images (N,S,S,3) uint8, train_labels,
                         val_images, val_labels, class_names; used by source=scratch only
        --audit          data/validated/audit.parquet (validate): must exist; pretraining waits for validation
Writes  --out            models/pretrain/: backbone.weights.h5 (absent for source=none), provenance.json
                         (source, backbone, params, input sha256, git commit; weights sha256 for imagenet;
                         for scratch the training's seconds, speed and resumed_at_epoch),
                         mlflow_run.json ({run_id, experiment_id, tracking_uri})
        --checkpoints    checkpoints/pretrain/: resumable training state (source=scratch; DVC persist)
        --metrics        metrics/pretrain.json: only figures a rerun reproduces (timings go to MLflow)
Params  seed, pretrain.* (source, weights_file, backbone, image_size, epochs, batch_size, learning_rate,
        max_seconds)
MLflow  run "pretrain", tag source; per-epoch metrics for scratch; provenance.json as an artifact

pretrain.source:
  scratch   train the backbone and a temporary head on the source-domain images (the paper trains
            EF-FER1 on ImageNet; offline we use Imagenette, ten ImageNet classes) at pretrain.image_size;
            the metric is source-domain validation accuracy
  imagenet  Keras' published ImageNet weights (downloaded, or pretrain.weights_file on offline
            machines); for efficientnet_lite0 the converted TF weights of dlfer.model.lite0
  none      nothing to transfer: EF-FER2 starts from random weights (the ablation)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from dlfer import tracking
from dlfer.files import atomic_directory, sha256_of_file, write_json
from dlfer.model import backbones, distributed, train
from dlfer.params import ParamsError, load_params

# Dropout of the temporary head, as keras.applications' EfficientNet-B0 top; it is thrown away afterwards.
PRETRAIN_HEAD_DROPOUT = 0.2


class PretrainInputError(ValueError):
    """An input of the pretrain stage is missing or unusable; the message names it and the fix."""


def load_source_domain(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise PretrainInputError(f"{path}: not found; run `dvc repro fetch` first")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    missing = {"train_images", "train_labels", "val_images", "val_labels", "class_names"} - set(arrays)
    if missing:
        raise PretrainInputError(f"{path}: missing array(s) {', '.join(sorted(missing))}; rerun `dvc repro fetch`")
    if len(arrays["train_images"]) == 0 or len(arrays["val_images"]) == 0:
        raise PretrainInputError(f"{path}: holds no source-domain images, which pretrain.source=scratch needs; "
                                 "set fetch.source_domain to an ImageNet-layout set (e.g. imagenette-128.zip), "
                                 "or set pretrain.source to imagenet or none")
    for split in ("train", "val"):
        images = arrays[f"{split}_images"]
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise PretrainInputError(f"{path}: {split}_images must be (N,S,S,3) uint8, got {images.shape} "
                                     f"{images.dtype}; rerun `dvc repro fetch`")
    return arrays


# What EF-FER1 training never varies: its source domain is balanced and already augmented by its
# size, it trains every epoch it is given, on the device TensorFlow picks (mixed precision and XLA
# where a GPU makes them pay, dlfer's CPU kernels on a CPU, as finetune's "auto").
FIXED_TRAINING_SETTINGS = {"class_weights": "none", "early_stopping_patience": 0, "mixed_precision": "auto",
                           "jit_compile": "auto", "cpu_kernels": "auto", "cpu_math": "fp32", "distribution": "auto",
                           "online_flip": 0.0, "online_shift": 0.0, "online_rotation": 0.0, "online_zoom": 0.0,
                           "weight_decay": 0.0}


def train_from_scratch(domain: dict, params, checkpoints: Path):
    """EF-FER1 trained on the source domain; returns (its backbone, the fit result)."""
    pretrain = params.pretrain
    num_classes = len(domain["class_names"])
    stored_size = domain["train_images"].shape[1]

    def build():
        return backbones.build_pretrain_classifier(pretrain.backbone, pretrain.image_size, num_classes,
                                                   PRETRAIN_HEAD_DROPOUT, input_size=stored_size,
                                                   batch_norm_momentum=pretrain.batch_norm_momentum)

    settings = train.TrainingSettings.from_params(pretrain, params.seed, **FIXED_TRAINING_SETTINGS)
    checkpoint_dir = train.keyed_checkpoint_dir(checkpoints, {"seed": params.seed, "pretrain": params.section("pretrain"),
                                                              "data": domain["sha256"]})
    result = distributed.fit(build, (domain["train_images"], domain["train_labels"]),
                                  (domain["val_images"], domain["val_labels"]), settings, checkpoint_dir,
                                  num_classes, log_to_mlflow=True)
    return result.model.get_layer(backbones.BACKBONE_LAYER), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--source-domain", type=Path, default=Path("data/raw/source_domain.npz"))
    parser.add_argument("--audit", type=Path, default=Path("data/validated/audit.parquet"))
    parser.add_argument("--out", type=Path, default=Path("models/pretrain"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/pretrain"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/pretrain.json"))
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        params = load_params(arguments.params)
        tracking.configure()  # fail fast on an unreachable tracking store, before any work
        if not arguments.audit.is_file():
            raise PretrainInputError(f"{arguments.audit}: not found; run `dvc repro validate` first")
        pretrain = params.pretrain
        if pretrain.backbone not in backbones.BACKBONES:
            raise ParamsError(f"params.yaml: pretrain.backbone is {pretrain.backbone!r}; choose one of "
                              f"{', '.join(backbones.BACKBONES)}")
        domain = None
        if pretrain.source == "scratch":
            domain = load_source_domain(arguments.source_domain)
            domain["sha256"] = sha256_of_file(arguments.source_domain)
    except (OSError, ValueError) as error:
        sys.exit(f"pretrain: {error}")

    provenance = {"source": pretrain.source, "backbone": pretrain.backbone, "channels": 3,
                  "params": {"seed": params.seed, "pretrain": params.section("pretrain")},
                  "git_commit": tracking.git_commit()}
    if arguments.source_domain.is_file():
        provenance["source_domain_sha256"] = sha256_of_file(arguments.source_domain)
    metrics = {}
    # DVC keeps this folder between runs (persist) and requires it to exist, whatever the source.
    arguments.checkpoints.mkdir(parents=True, exist_ok=True)
    with tracking.stage_run("pretrain", {"seed": params.seed, **params.section("pretrain")},
                            tags={"source": pretrain.source, "backbone": pretrain.backbone}) as run:
        backbone = None
        try:
            if pretrain.source == "scratch":
                backbone, result = train_from_scratch(domain, params, arguments.checkpoints)
                metrics.update(source_val_accuracy=result.best["val_accuracy"],
                               source_train_accuracy=result.best["accuracy"],
                               source_val_loss=result.best["val_loss"], best_epoch=result.best_epoch,
                               epochs_run=result.epochs_run, epochs_planned=pretrain.epochs,
                               truncated=result.stopped_by == "max_seconds",
                               source_classes=len(domain["class_names"]))
                # How this run went, which differs between runs: provenance and MLflow, not the metrics file.
                provenance.update(best_epoch=result.best_epoch, stopped_by=result.stopped_by, runtime=result.runtime,
                                  class_names=domain["class_names"].tolist(),
                                  training={"seconds": round(result.seconds, 2),
                                            "images_per_second": round(result.train_images_per_second, 2),
                                            "resumed_at_epoch": result.resumed_at_epoch})
            elif pretrain.source == "imagenet":
                weights = pretrain.weights_file or "imagenet"
                backbone = backbones.build_backbone(pretrain.backbone, pretrain.image_size)
                provenance["weights"] = backbones.load_backbone_weights(backbone, pretrain.backbone, weights)
        except (OSError, ValueError) as error:
            sys.exit(f"pretrain: {error}")
        if backbone is not None:
            metrics["backbone_parameters"] = backbone.count_params()
        run_record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                      "tracking_uri": tracking.tracking_uri()}
        with atomic_directory(arguments.out) as temporary:
            if backbone is not None:
                backbone.save_weights(temporary / "backbone.weights.h5")
                provenance["backbone_weights_sha256"] = sha256_of_file(temporary / "backbone.weights.h5")
            write_json(temporary / "provenance.json", provenance)
            write_json(temporary / "mlflow_run.json", run_record)
        write_json(arguments.metrics, metrics)
        import mlflow

        logged = {**metrics, "seconds": round(time.perf_counter() - started, 2)}
        if "training" in provenance:
            logged.update(training_seconds=provenance["training"]["seconds"],
                          train_images_per_second=provenance["training"]["images_per_second"])
            mlflow.set_tag("resumed_at_epoch", provenance["training"]["resumed_at_epoch"])
        tracking.log_numeric_metrics(logged)
        mlflow.log_artifact(str(arguments.out / "provenance.json"))
    print(f"pretrain: {metrics}")


if __name__ == "__main__":
    main()
