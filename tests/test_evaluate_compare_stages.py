"""The evaluate and compare stages as subprocesses on toy Keras models, a tiny test split and a real sqlite MLflow store."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import migrated_mlflow_store, stage_environment
from dlfer.fer2013 import EMOTIONS
from dlfer.params import VARIANTS

REPOSITORY = Path(__file__).resolve().parents[1]
N_TEST = 70


def run_stage(script: str, arguments: list, workdir: Path, store: Path) -> subprocess.CompletedProcess:
    environment = {**stage_environment(workdir), "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    environment.pop("DVC_ROOT", None)
    return subprocess.run([sys.executable, str(REPOSITORY / "stages" / script), *map(str, arguments)],
                          cwd=workdir, env=environment, capture_output=True, text=True, timeout=300)


def toy_model(seed: int):
    """Same interface as a finetune model, and not mirror-symmetric, so flip TTA changes its output."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((48, 48, 1))
    features = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(features))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Params, test split, two toy models with their finetune runs and metrics, then both evaluate runs."""
    root = tmp_path_factory.mktemp("workspace")
    params = yaml.safe_load((REPOSITORY / "params.yaml").read_text())
    params["evaluate"].update(flip_tta=True, bootstrap_samples=200)
    # The toy models are B0 at 48 px with EF-FER1 from scratch, whatever the CPU profile trains.
    params["finetune"].update(image_size=48, channels=3)
    params["pretrain"].update(source="scratch", backbone="efficientnet_b0")
    params["finetune"]["backbone"] = "efficientnet_b0"
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    rng = np.random.default_rng(0)
    labels = np.arange(N_TEST) % 7
    rng.shuffle(labels)
    ids = np.array([f"PrivateTest_{index:05d}" for index in range(N_TEST)])
    (root / "data" / "balanced").mkdir(parents=True)
    np.savez(root / "data" / "balanced" / "test.npz", images=rng.integers(0, 256, (N_TEST, 48, 48), dtype=np.uint8),
             labels=labels.astype(np.int64), ids=ids)
    # Training holds an augmented copy of test face 3 and an exact duplicate of test face 10: the leak.
    train_ids = np.array(["PrivateTest_00003~aug0", "Training_00001", "Training_00002"])
    np.savez(root / "data" / "balanced" / "train.npz", images=np.zeros((3, 48, 48), np.uint8),
             labels=np.zeros(3, np.int64), ids=train_ids)
    audit_ids = [*ids, "Training_00001", "Training_00002"]
    exact_group = [5 if image_id in ("PrivateTest_00010", "Training_00001") else -1 for image_id in audit_ids]
    (root / "data" / "validated").mkdir(parents=True)
    pd.DataFrame({"image_id": audit_ids, "exact_group": exact_group, "near_group": exact_group}).to_parquet(
        root / "data" / "validated" / "audit.parquet")

    store = migrated_mlflow_store(root / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.MlflowClient().create_experiment("dlfer", artifact_location=(root / "mlruns").as_uri())
    mlflow.set_experiment("dlfer")
    (root / "metrics").mkdir()
    for seed, variant in enumerate(VARIANTS):
        model_dir = root / "models" / "finetune" / variant
        model_dir.mkdir(parents=True)
        toy_model(seed).save(model_dir / "model.keras")
        with mlflow.start_run(run_name=f"finetune_{variant}", tags={"stage": "finetune", "variant": variant}) as run:
            mlflow.log_params({"backbone": "toy", "epochs": 1})
            mlflow.log_artifact(str(model_dir / "model.keras"))
        (model_dir / "mlflow_run.json").write_text(json.dumps(
            {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": mlflow.get_tracking_uri()}))
        (model_dir / "provenance.json").write_text(json.dumps(
            {"variant": variant, "params": {"preprocess": {"protocol": "official"}}, "val_sha256": "a" * 64}))
        (root / "metrics" / f"finetune_{variant}.json").write_text(json.dumps(
            {"train_accuracy": 0.9 - seed / 10, "val_accuracy": 0.6 - seed / 10, "val_loss": 1.0,
             "val_macro_f1": 0.55 - seed / 10, "best_epoch": 1, "seconds": 3.0}))
    (root / "metrics" / "validate.json").write_text(json.dumps(
        {"rows": 35887, "cross_usage_duplicate_images": 3, "exact_duplicate_images": 5, "passed": True}))
    mlflow.set_tracking_uri(None)

    # The CLI as a subprocess for one variant; the other through main() in this process, where
    # Keras is already loaded, to keep the file's run time down.
    result = run_stage("evaluate.py", [
        "--variant", "with_ef_fer1", "--params", "params.yaml", "--model", "models/finetune/with_ef_fer1",
        "--test", "data/balanced/test.npz", "--train", "data/balanced/train.npz",
        "--audit", "data/validated/audit.parquet", "--metrics", "metrics/evaluate_with_ef_fer1.json",
        "--reports", "reports/evaluate/with_ef_fer1"], root, store)
    assert result.returncode == 0, result.stderr
    specification = importlib.util.spec_from_file_location("evaluate_stage", REPOSITORY / "stages" / "evaluate.py")
    evaluate_stage = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(evaluate_stage)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        patch.delenv("DVC_ROOT", raising=False)
        evaluate_stage.main(variant="without_ef_fer1", params_path=Path("params.yaml"),
                            model_dir=Path("models/finetune/without_ef_fer1"), test_path=Path("data/balanced/test.npz"),
                            train_path=Path("data/balanced/train.npz"), audit_path=Path("data/validated/audit.parquet"),
                            metrics_path=Path("metrics/evaluate_without_ef_fer1.json"),
                            reports_dir=Path("reports/evaluate/without_ef_fer1"))
    mlflow.set_tracking_uri(None)
    return root, store


def test_evaluate_writes_outputs_consistent_with_its_predictions(workspace):
    root, store = workspace
    metrics = json.loads((root / "metrics" / "evaluate_with_ef_fer1.json").read_text())
    reports = root / "reports" / "evaluate" / "with_ef_fer1"
    predictions = pd.read_csv(reports / "predictions.csv")
    per_class = pd.read_csv(reports / "per_class.csv")

    assert metrics["n_test"] == N_TEST == len(predictions)
    assert list(predictions["id"]) == [f"PrivateTest_{index:05d}" for index in range(N_TEST)]
    assert metrics["test_accuracy"] == pytest.approx((predictions["actual"] == predictions["predicted"]).mean())
    probabilities = predictions[[f"probability_{emotion}" for emotion in EMOTIONS]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(predictions["predicted"]) == [EMOTIONS[index] for index in probabilities.argmax(axis=1)]
    assert list(per_class["emotion"]) == list(EMOTIONS)
    for row in per_class.itertuples():
        assert metrics[f"f1_{row.emotion}"] == pytest.approx(row.f1)
    assert per_class["support"].sum() == N_TEST
    assert metrics["test_accuracy_ci95_low"] <= metrics["test_accuracy"] <= metrics["test_accuracy_ci95_high"]
    assert metrics["paper_eq4_f1"] == pytest.approx(metrics["test_accuracy"])
    assert (reports / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_measures_the_leak_from_train_ids_and_duplicate_groups(workspace):
    root, _ = workspace
    metrics = json.loads((root / "metrics" / "evaluate_with_ef_fer1.json").read_text())
    predictions = pd.read_csv(root / "reports" / "evaluate" / "with_ef_fer1" / "predictions.csv")
    assert dict(predictions.loc[predictions["train_sibling"] != "none", ["id", "train_sibling"]].values) == {
        "PrivateTest_00003": "augmented", "PrivateTest_00010": "duplicate"}
    assert (metrics["leak_test_with_augmented_sibling"], metrics["leak_test_with_duplicate_in_train"],
            metrics["leak_test_with_train_sibling"]) == (1, 1, 2)
    correct = predictions["actual"] == predictions["predicted"]
    leaked = predictions["train_sibling"] != "none"
    assert metrics["test_accuracy_with_train_sibling"] == pytest.approx(correct[leaked].mean())
    assert metrics["test_accuracy_without_train_sibling"] == pytest.approx(correct[~leaked].mean())


def test_evaluate_averages_the_mirror_with_flip_tta(workspace):
    import keras

    root, _ = workspace
    with np.load(root / "data" / "balanced" / "test.npz") as archive:
        images = archive["images"][..., np.newaxis].astype("float32")
    model = keras.models.load_model(root / "models" / "finetune" / "with_ef_fer1" / "model.keras")
    expected = (model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)) / 2
    predictions = pd.read_csv(root / "reports" / "evaluate" / "with_ef_fer1" / "predictions.csv")
    np.testing.assert_allclose(predictions[[f"probability_{emotion}" for emotion in EMOTIONS]], expected, atol=1e-5)
    assert not np.allclose(expected, model.predict(images, verbose=0), atol=1e-5)


def test_evaluate_also_scores_the_face_alone_as_predict_and_serve_answer(workspace):
    import keras
    from sklearn.metrics import f1_score

    root, _ = workspace
    with np.load(root / "data" / "balanced" / "test.npz") as archive:
        images, labels = archive["images"][..., np.newaxis].astype("float32"), archive["labels"]
    model = keras.models.load_model(root / "models" / "finetune" / "with_ef_fer1" / "model.keras")
    alone = model.predict(images, verbose=0).argmax(axis=1)
    metrics = json.loads((root / "metrics" / "evaluate_with_ef_fer1.json").read_text())
    assert metrics["test_accuracy_one_view"] == pytest.approx(np.mean(alone == labels))
    assert metrics["f1_macro_one_view"] == pytest.approx(f1_score(labels, alone, average="macro"))
    predictions = pd.read_csv(root / "reports" / "evaluate" / "with_ef_fer1" / "predictions.csv")
    assert (predictions["predicted"] != np.array(EMOTIONS)[alone]).any()  # the two views differ here


def test_evaluate_logs_the_same_metrics_and_tags_to_mlflow(workspace):
    root, store = workspace
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("dlfer")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'evaluate'")
    by_variant = {run.data.tags["variant"]: run for run in runs}
    assert set(by_variant) == set(VARIANTS)
    run = by_variant["with_ef_fer1"]
    finetune_run_id = json.loads((root / "models" / "finetune" / "with_ef_fer1" / "mlflow_run.json").read_text())["run_id"]
    assert run.info.run_name == "evaluate_with_ef_fer1"
    assert run.data.tags["protocol"] == "official" and run.data.tags["finetune_run_id"] == finetune_run_id
    written = json.loads((root / "metrics" / "evaluate_with_ef_fer1.json").read_text())
    # An accuracy over no images is null in the file and absent from MLflow, which holds numbers only.
    assert run.data.metrics == pytest.approx({key: value for key, value in written.items() if value is not None})


def test_evaluate_rejects_a_malformed_test_split_in_one_line(workspace, tmp_path):
    root, store = workspace
    np.savez(tmp_path / "test.npz", images=np.zeros((3, 48, 48), np.uint8), labels=np.zeros(3, np.int64))
    result = run_stage("evaluate.py", [
        "--variant", "with_ef_fer1", "--params", root / "params.yaml", "--model", root / "models/finetune/with_ef_fer1",
        "--test", tmp_path / "test.npz", "--train", root / "data/balanced/train.npz",
        "--audit", root / "data/validated/audit.parquet", "--metrics", tmp_path / "out.json",
        "--reports", tmp_path / "reports"], tmp_path, tmp_path / "mlflow.db")
    assert result.returncode != 0
    assert "test.npz: missing array(s) ids" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "reports").exists()


def run_compare(root: Path, store: Path, outputs: Path, saved: Path) -> subprocess.CompletedProcess:
    return run_stage("compare.py", [
        "--params", root / "params.yaml", "--metrics-dir", root / "metrics", "--references", REPOSITORY / "references",
        "--saved-runs", saved, "--report", outputs / "reports" / "compare.md",
        "--chart", outputs / "reports" / "compare.png", "--out-metrics", outputs / "metrics" / "compare.json"],
        outputs, store)


@pytest.fixture
def store_copy(workspace, tmp_path):
    """Each compare test works on its own copy of the store holding both evaluate runs."""
    _, store = workspace
    shutil.copy(store, tmp_path / "mlflow.db")
    return tmp_path / "mlflow.db"


def save_run(saved: Path, name: str, protocol: str, evaluated: dict, params: dict) -> None:
    """A run as `dlfer results save` keeps it: its metrics files and its params diff."""
    (saved / name / "metrics").mkdir(parents=True)
    (saved / name / "metrics" / "evaluate_with_ef_fer1.json").write_text(json.dumps(evaluated))
    (saved / name / "metrics" / "preprocess.json").write_text(json.dumps({"protocol": protocol}))
    (saved / name / "params.diff.yaml").write_text(yaml.safe_dump({**params, "preprocess.protocol": protocol}))


def test_compare_sets_saved_runs_of_both_protocols_side_by_side(workspace, store_copy, tmp_path):
    """As in use: compare with no saved protocol pair, then once runs of one profile under both protocols are saved."""
    root, _ = workspace
    evaluated = {variant: json.loads((root / "metrics" / f"evaluate_{variant}.json").read_text()) for variant in VARIANTS}
    official = evaluated["with_ef_fer1"]
    saved = tmp_path / "saved"
    saved.mkdir()

    result = run_compare(root, store_copy, tmp_path, saved)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "metrics" / "compare.json").read_text())
    assert summary["test_accuracy_with_ef_fer1"] == official["test_accuracy"]
    assert summary["f1_macro_without_ef_fer1"] == evaluated["without_ef_fer1"]["f1_macro"]
    assert summary["ablation_delta_accuracy"] == pytest.approx(
        official["test_accuracy"] - evaluated["without_ef_fer1"]["test_accuracy"])
    assert summary["paper_claim_gap"] == pytest.approx(0.8209 - official["test_accuracy"])
    assert summary["paper_ablation_delta_accuracy"] == pytest.approx(0.1588)
    assert summary["train_accuracy_without_ef_fer1"] == pytest.approx(0.8)
    assert not any(key.startswith("registry") for key in summary)  # registering is the register stage's
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert "-S preprocess.protocol=paper" in report and "dlfer results save" in report
    assert "audit of 35887 images: 3 images appear, exactly or nearly, in more than one official usage; " \
           "5 images sit in exact-duplicate groups." in report
    assert "| [27] | 2024 | HybridizedCNN-LSTM | 79.34 |" in report
    assert "73.28" in report and "82.09" in report
    assert "EF-FER1: efficientnet_b0, trained here on the source-domain images" in report
    assert (tmp_path / "reports" / "compare.png").read_bytes()[:4] == b"\x89PNG"

    # One profile under both protocols, and a paper run of other params that must not be paired with it.
    leaked = {**{key: min(1.0, value + 0.2) for key, value in official.items() if isinstance(value, float)},
              "n_test": 10, "leak_test_with_train_sibling": 6, "leak_test_with_augmented_sibling": 5,
              "leak_test_with_duplicate_in_train": 1}
    save_run(saved, "toy", "official", official, {"finetune.epochs": 6})
    save_run(saved, "toy-paper", "paper", leaked, {"finetune.epochs": 6})
    save_run(saved, "toy-paper-longer", "paper", leaked, {"finetune.epochs": 10})
    result = run_compare(root, store_copy, tmp_path, saved)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert "-S preprocess.protocol=paper" not in report
    difference = 100 * (leaked["test_accuracy"] - official["test_accuracy"])
    assert f"| `toy-paper` / `toy` | DLFER with EF-FER1 | test_accuracy | {100 * official['test_accuracy']:.2f} | " \
           f"{100 * leaked['test_accuracy']:.2f} | {difference:+.2f} |" in report
    assert "In `toy-paper`, 6 of 10 test images have a sibling in train (5 an augmented copy, 1 a duplicate)" in report
    assert "toy-paper-longer" not in report


def test_compare_run_twice_writes_the_same_bytes(workspace, store_copy, tmp_path):
    root, _ = workspace
    written = ("reports/compare.md", "reports/compare.png", "metrics/compare.json")
    outputs = {}
    for attempt in ("first", "second"):
        (tmp_path / attempt).mkdir()
        result = run_compare(root, store_copy, tmp_path / attempt, REPOSITORY / "docs" / "results")
        assert result.returncode == 0, result.stderr
        outputs[attempt] = [(tmp_path / attempt / name).read_bytes() for name in written]
    assert outputs["first"] == outputs["second"]
    assert b"Official vs paper protocol" in outputs["first"][0]


def run_register(root: Path, store: Path, out: Path, model: Path | None = None) -> subprocess.CompletedProcess:
    return run_stage("register.py", [
        "--params", root / "params.yaml", "--model", model or root / "models" / "finetune" / "with_ef_fer1",
        "--finetune-metrics", root / "metrics" / "finetune_with_ef_fer1.json", "--out", out], root, store)


def test_register_adds_a_version_and_moves_the_champion_only_on_the_same_validation_images(workspace, store_copy,
                                                                                             tmp_path):
    root, _ = workspace
    first = run_register(root, store_copy, tmp_path / "first.json")
    assert first.returncode == 0, first.stderr
    registered = json.loads((tmp_path / "first.json").read_text())
    assert registered["registry_version"] == 1 and registered["registry_champion_moved"] is True
    assert registered["registry_val_macro_f1"] == pytest.approx(0.55)

    other_data = tmp_path / "other_copy"
    shutil.copytree(root / "models" / "finetune" / "with_ef_fer1", other_data)
    provenance = json.loads((other_data / "provenance.json").read_text())
    (other_data / "provenance.json").write_text(json.dumps({**provenance, "val_sha256": "b" * 64}))
    second = run_register(root, store_copy, tmp_path / "second.json", model=other_data)
    assert second.returncode == 0, second.stderr
    registered = json.loads((tmp_path / "second.json").read_text())
    assert registered["registry_version"] == 2 and registered["registry_champion_moved"] is False
    assert "other validation images" in registered["reason"]

    broken = tmp_path / "broken"
    shutil.copytree(root / "models" / "finetune" / "with_ef_fer1", broken)
    (broken / "provenance.json").write_text("{}")
    third = run_register(root, store_copy, tmp_path / "third.json", model=broken)
    assert third.returncode != 0 and "provenance.json" in third.stderr and "Traceback" not in third.stderr
    assert not (tmp_path / "third.json").exists()


def test_compare_names_a_missing_metrics_file(workspace, store_copy, tmp_path):
    root, _ = workspace
    metrics_dir = tmp_path / "metrics_in"
    shutil.copytree(root / "metrics", metrics_dir)
    (metrics_dir / "evaluate_without_ef_fer1.json").unlink()
    result = run_stage("compare.py", [
        "--params", root / "params.yaml", "--metrics-dir", metrics_dir, "--references", REPOSITORY / "references",
        "--report", tmp_path / "compare.md", "--chart", tmp_path / "compare.png", "--out-metrics", tmp_path / "c.json",
        "--saved-runs", tmp_path / "no_saved_runs"], tmp_path, store_copy)
    assert result.returncode != 0
    assert "evaluate_without_ef_fer1.json: unreadable" in result.stderr and "dvc repro evaluate" in result.stderr
    assert not (tmp_path / "compare.md").exists()


def test_compare_names_the_ef_fer1_source(workspace, store_copy, tmp_path):
    root, _ = workspace
    run_dir = tmp_path / "run"
    shutil.copytree(root / "metrics", run_dir / "metrics")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"].update(source="imagenet", backbone="efficientnet_lite0")
    params["finetune"]["backbone"] = "efficientnet_lite0"
    params["finetune"]["image_size"] = 64
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage("compare.py", [
        "--params", run_dir / "params.yaml", "--metrics-dir", run_dir / "metrics", "--references",
        REPOSITORY / "references", "--report", tmp_path / "compare.md", "--chart", tmp_path / "compare.png",
        "--out-metrics", tmp_path / "c.json", "--saved-runs", tmp_path / "no_saved_runs"], tmp_path, store_copy)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "compare.md").read_text()
    assert "EF-FER1: efficientnet_lite0, ImageNet weights (`pretrain.source: imagenet`). " \
           "EF-FER2: efficientnet_lite0 fine-tuned at 64x64 px" in report
