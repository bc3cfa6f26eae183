"""dlfer.registry on a real sqlite MLflow store in tmp_path, with a toy Keras model."""

import mlflow
import numpy as np
import pytest

from conftest import migrated_mlflow_store
from dlfer import registry

MODEL_NAME = "dlfer-ef-fer2"


@pytest.fixture(scope="module")
def keras_model_file(tmp_path_factory):
    import keras

    inputs = keras.Input((48, 48, 1))
    outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture
def store(tmp_path):
    migrated_mlflow_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().create_experiment("dlfer", artifact_location=(tmp_path / "mlruns").as_uri())
    mlflow.set_experiment("dlfer")
    yield uri
    mlflow.set_tracking_uri(None)


def finetune_run(model_file, log_mlflow_model=False) -> str:
    with mlflow.start_run(run_name="finetune_with_ef_fer1") as run:
        if log_mlflow_model:
            import keras

            mlflow.keras.log_model(keras.models.load_model(model_file), name=registry.FINETUNE_MODEL_NAME,
                                   pip_requirements=["tensorflow"])
        else:
            mlflow.log_artifact(str(model_file))
    return run.info.run_id


def register(model_file, val_macro_f1, protocol="official", log_mlflow_model=False,
             val_data="a" * 64) -> registry.Registration:
    run_id = finetune_run(model_file, log_mlflow_model)
    with mlflow.start_run(run_name="register") as register_run:
        return registry.register_candidate(model_name=MODEL_NAME, alias="candidate", finetune_run_id=run_id,
                                           model_file=model_file, val_macro_f1=val_macro_f1,
                                           val_data_sha256=val_data, protocol=protocol,
                                           artifact_run_id=register_run.info.run_id)


def aliases():
    return {alias: int(version) for alias, version in mlflow.MlflowClient().get_registered_model(MODEL_NAME).aliases.items()}


def test_first_model_becomes_champion_from_the_keras_file(store, keras_model_file, tmp_path):
    result = register(keras_model_file, 0.41)
    assert result.version == 1 and result.champion_moved and result.champion_version == 1
    assert result.previous_champion_version is None and result.previous_champion_val_macro_f1 is None
    assert aliases() == {"candidate": 1, "champion": 1}
    version = mlflow.MlflowClient().get_model_version(MODEL_NAME, "1")
    assert float(version.tags["val_macro_f1"]) == pytest.approx(0.41)
    assert version.tags["model_format"] == "keras_file"
    # The registered source holds the very file that was evaluated.
    registered_file = tmp_path / "mlruns" / version.run_id / "artifacts" / registry.KERAS_FILE_ARTIFACT_PATH / "model.keras"
    assert registered_file.read_bytes() == keras_model_file.read_bytes()


def test_the_registered_model_has_a_description(store, keras_model_file, tmp_path):
    register(keras_model_file, 0.5)
    assert "FER2013" in mlflow.MlflowClient().get_registered_model(MODEL_NAME).description


def test_worse_model_does_not_move_the_champion_and_better_one_does(store, keras_model_file):
    register(keras_model_file, 0.50)
    worse = register(keras_model_file, 0.45)
    assert not worse.champion_moved
    assert worse.previous_champion_version == 1 and worse.previous_champion_val_macro_f1 == pytest.approx(0.50)
    assert aliases() == {"candidate": 2, "champion": 1}

    tie = register(keras_model_file, 0.50)
    assert not tie.champion_moved and aliases()["champion"] == 1

    better = register(keras_model_file, 0.55)
    assert better.champion_moved and better.version == 4 and better.champion_version == 4
    assert better.previous_champion_version == 1
    assert aliases() == {"candidate": 4, "champion": 4}
    assert better.as_metrics()["registry_champion_moved"] is True


def test_a_better_score_on_other_validation_images_does_not_move_the_champion(store, keras_model_file):
    register(keras_model_file, 0.50, val_data="a" * 64)
    other_copy = register(keras_model_file, 0.90, val_data="b" * 64)
    assert not other_copy.champion_moved and "other validation images" in other_copy.reason
    assert aliases() == {"candidate": 2, "champion": 1}
    assert register(keras_model_file, 0.60, val_data="a" * 64).champion_moved


def test_paper_protocol_model_is_never_champion(store, keras_model_file):
    result = register(keras_model_file, 0.99, protocol="paper")
    assert not result.champion_moved and result.champion_version is None
    assert "leaks" in result.reason
    assert aliases() == {"candidate": 1}
    assert "registry_champion_version" not in result.as_metrics()


def test_logged_mlflow_model_is_registered_from_the_finetune_run(store, keras_model_file):
    result = register(keras_model_file, 0.6, log_mlflow_model=True)
    version = mlflow.MlflowClient().get_model_version(MODEL_NAME, str(result.version))
    assert version.tags["model_format"] == "mlflow_model"
    assert version.source.startswith("models:/")
    # The champion loads back and predicts like the file it came from.
    import keras

    images = np.random.default_rng(0).integers(0, 256, size=(4, 48, 48, 1)).astype("float32")
    champion = mlflow.keras.load_model(f"models:/{MODEL_NAME}@champion")
    np.testing.assert_allclose(champion.predict(images, verbose=0),
                               keras.models.load_model(keras_model_file).predict(images, verbose=0), rtol=1e-6)


def test_unknown_finetune_run_is_a_clear_error(store, keras_model_file):
    with mlflow.start_run() as run, pytest.raises(registry.RegistryError, match="not in the MLflow store"):
        registry.register_candidate(model_name=MODEL_NAME, alias="candidate", finetune_run_id="0" * 32,
                                    model_file=keras_model_file, val_macro_f1=0.5, val_data_sha256="a" * 64,
                                    protocol="official", artifact_run_id=run.info.run_id)


def test_alias_champion_is_refused(keras_model_file):
    with pytest.raises(registry.RegistryError, match="register.alias"):
        registry.register_candidate(model_name=MODEL_NAME, alias="champion", finetune_run_id="x",
                                    model_file=keras_model_file, val_macro_f1=0.5, val_data_sha256="a" * 64,
                                    protocol="official", artifact_run_id="y")
