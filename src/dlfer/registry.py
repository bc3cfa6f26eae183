"""Registering the fine-tuned model in the MLflow Model Registry, with a guarded champion alias.

The register stage adds the `with_ef_fer1` model as a new version of one registered model and
gives it the candidate alias (params register.alias). The `champion` alias moves to the new
version only when its validation macro-F1 beats the current champion's on the same validation
images (the sha256 of data/balanced/val.npz, a tag of each version): scores on another data copy,
or another split, are not comparable, so such a champion stays until a person moves the alias. The decision never
looks at test metrics: choosing a model on the test split would make the test score a
selection score and bias it upwards. Each version carries its val_macro_f1 as a tag, so the
comparison needs nothing but the registry.

A model trained under the paper protocol never becomes champion: augmented copies of its
validation images sit in its training set, so its validation score is inflated by leakage
and is not comparable with an official-protocol model's.

Uses the MLflow tracking URI already configured (dlfer.tracking.configure()).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

CHAMPION_ALIAS = "champion"
# The finetune stage logs its model under this name (MLflow 3 LoggedModel, or artifact path in MLflow 2).
FINETUNE_MODEL_NAME = "model"
# Where compare logs model.keras when the finetune run logged no MLflow model.
KERAS_FILE_ARTIFACT_PATH = "candidate_model"


class RegistryError(ValueError):
    """The registry step cannot proceed; the message names the cause and the fix."""


def finetune_run_id(model_dir: str | Path) -> str:
    """The MLflow run id the finetune stage recorded beside its model in mlflow_run.json."""
    path = Path(model_dir) / "mlflow_run.json"
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise RegistryError(f"{path}: unreadable or without run_id ({error}); "
                            "rerun the finetune stage, which writes it beside model.keras") from None


@dataclasses.dataclass(frozen=True)
class Registration:
    model_name: str
    version: int
    alias: str
    source: str
    val_macro_f1: float
    champion_moved: bool
    champion_version: int | None
    previous_champion_version: int | None
    previous_champion_val_macro_f1: float | None
    reason: str

    def as_metrics(self) -> dict:
        """The numeric facts for metrics/register.json, prefixed registry_; absent values are left out."""
        values = {
            "registry_version": self.version,
            "registry_val_macro_f1": self.val_macro_f1,
            "registry_champion_moved": self.champion_moved,
            "registry_champion_version": self.champion_version,
            "registry_previous_champion_version": self.previous_champion_version,
            "registry_previous_champion_val_macro_f1": self.previous_champion_val_macro_f1,
        }
        return {key: value for key, value in values.items() if value is not None}

    def describe(self) -> str:
        """Markdown lines that say what was registered and why the champion did or did not move."""
        previous = ("none" if self.previous_champion_version is None else
                    f"version {self.previous_champion_version} (validation macro-F1 "
                    + ("untagged" if self.previous_champion_val_macro_f1 is None
                       else f"{self.previous_champion_val_macro_f1:.4f}") + ")")
        return "\n".join([
            f"- registered `{self.model_name}` version **{self.version}** with alias `{self.alias}`; "
            f"source `{self.source}`",
            f"- its validation macro-F1: {self.val_macro_f1:.4f} (the promotion rule never looks at test metrics)",
            f"- previous champion: {previous}",
            f"- champion moved: **{'yes' if self.champion_moved else 'no'}**; {self.reason}",
        ])


def register_candidate(*, model_name: str, alias: str, finetune_run_id: str, model_file: str | Path,
                       val_macro_f1: float, val_data_sha256: str, protocol: str,
                       artifact_run_id: str) -> Registration:
    """Register the finetune run's model as a new version; set `alias`; move `champion` if it is better.

    artifact_run_id is the active run (register's) that receives model.keras when the finetune
    run logged no MLflow model. val_data_sha256 identifies the validation images val_macro_f1 was
    measured on.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if alias == CHAMPION_ALIAS:
        raise RegistryError(f"params.yaml: register.alias must not be {CHAMPION_ALIAS!r}; that alias moves only on a "
                            "better validation macro-F1. Use e.g. 'candidate'")
    if not isinstance(val_macro_f1, (int, float)) or math.isnan(val_macro_f1):
        raise RegistryError(f"val_macro_f1 must be a number, got {val_macro_f1!r}; check metrics/finetune_*.json")
    client = mlflow.MlflowClient()
    try:
        finetune_run = client.get_run(finetune_run_id)
    except MlflowException:
        raise RegistryError(f"finetune run {finetune_run_id} (from mlflow_run.json) is not in the MLflow store "
                            f"{mlflow.get_tracking_uri()}; rerun finetune against this store or set "
                            "MLFLOW_TRACKING_URI to the store it used") from None

    registered = _registered_model(client, model_name)
    previous_version = registered.aliases.get(CHAMPION_ALIAS)
    previous_score = previous_data = None
    if previous_version is not None:
        previous = client.get_model_version(model_name, previous_version)
        previous_score, previous_data = _score_tag(previous), previous.tags.get("val_data_sha256")
    previous_version = int(previous_version) if previous_version is not None else None

    tags = {"val_macro_f1": repr(float(val_macro_f1)), "val_data_sha256": val_data_sha256,
            "finetune_run_id": finetune_run_id, "protocol": protocol}
    if _has_logged_model(client, finetune_run):
        tags["model_format"] = "mlflow_model"
        version = mlflow.register_model(f"runs:/{finetune_run_id}/{FINETUNE_MODEL_NAME}", model_name, tags=tags)
    else:
        # No MLflow model in the finetune run: keep the exact file that was evaluated, as an
        # artifact of this run, and register that (loadable with keras.models.load_model).
        model_file = Path(model_file)
        if not model_file.is_file():
            raise RegistryError(f"{model_file}: not found and finetune run {finetune_run_id} logged no MLflow model; "
                                "run the finetune stage")
        tags["model_format"] = "keras_file"
        client.log_artifact(artifact_run_id, str(model_file), artifact_path=KERAS_FILE_ARTIFACT_PATH)
        source = f"{client.get_run(artifact_run_id).info.artifact_uri}/{KERAS_FILE_ARTIFACT_PATH}"
        version = client.create_model_version(model_name, source=source, run_id=artifact_run_id, tags=tags)
    client.set_registered_model_alias(model_name, alias, version.version)

    moved, reason = _champion_decision(float(val_macro_f1), protocol, previous_version, previous_score,
                                       same_validation=previous_data == val_data_sha256)
    if moved:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return Registration(
        model_name=model_name,
        version=int(version.version),
        alias=alias,
        source=version.source,
        val_macro_f1=float(val_macro_f1),
        champion_moved=moved,
        champion_version=int(version.version) if moved else previous_version,
        previous_champion_version=previous_version,
        previous_champion_val_macro_f1=previous_score,
        reason=reason,
    )


def _champion_decision(score: float, protocol: str, previous_version: int | None, previous_score: float | None,
                       same_validation: bool) -> tuple[bool, str]:
    if protocol != "official":
        return False, (f"not promoted: trained under the {protocol} protocol, whose validation split leaks "
                       "augmented copies of training images, so its validation macro-F1 is not comparable")
    if previous_version is None:
        return True, "first registered model with a validation score: it becomes champion"
    if previous_score is None:
        return False, (f"not promoted: champion version {previous_version} has no val_macro_f1 tag to compare with; "
                       "tag it or move the alias by hand")
    if not same_validation:
        return False, (f"not promoted: champion version {previous_version} was scored on other validation images "
                       "(another data copy or split), so the scores are not comparable; move the alias by hand "
                       "(MlflowClient().set_registered_model_alias) if the new data should win")
    if score > previous_score:
        return True, f"promoted: validation macro-F1 {score:.4f} beats champion's {previous_score:.4f}"
    return False, f"not promoted: validation macro-F1 {score:.4f} does not beat champion's {previous_score:.4f}"


REGISTERED_MODEL_DESCRIPTION = (
    "EF-FER2: EfficientNet fine-tuned on FER2013 (7 emotions, Kaggle order: angry, disgust, fear, happy, sad, "
    "surprise, neutral). Input (N, 48, 48, 1) float32 grey pixels 0-255, output (N, 7) softmax. Each version is "
    "registered by the register stage of a dlfer run; the alias champion holds the best validation macro-F1, "
    "candidate the latest run. Its run's model card and test figures are in the finetune and evaluate runs.")


def _registered_model(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
        if not registered.description:  # registered before models had a description
            client.update_registered_model(model_name, description=REGISTERED_MODEL_DESCRIPTION)
        return registered
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        return client.create_registered_model(model_name, description=REGISTERED_MODEL_DESCRIPTION)
    except MlflowException as error:  # another compare run created it in between
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_registered_model(model_name)


def _score_tag(model_version) -> float | None:
    try:
        return float(model_version.tags["val_macro_f1"])
    except (KeyError, TypeError, ValueError):
        return None


def _has_logged_model(client, run) -> bool:
    """Whether the run logged an MLflow model named FINETUNE_MODEL_NAME, in MLflow 3 or MLflow 2 style."""
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    if any(client.get_logged_model(output.model_id).name == FINETUNE_MODEL_NAME for output in outputs):
        return True
    artifacts = client.list_artifacts(run.info.run_id, FINETUNE_MODEL_NAME)
    return any(artifact.path == f"{FINETUNE_MODEL_NAME}/MLmodel" for artifact in artifacts)
