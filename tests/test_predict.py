"""`dlfer predict` on real photos, FER2013 composites and crops, a video, and bad inputs, with a toy Keras model."""

import csv
import io
import json
import zipfile

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import FER2013_ZIP, migrated_mlflow_store, require
from dlfer.cli.model import register
from dlfer.deploy import faces, predict
from dlfer.fer2013 import EMOTIONS

PASTE_SIDE = 144


def toy_model():
    """The finetune models' interface: (N,48,48,1) raw pixels 0-255 in, (N,7) softmax out; not symmetric."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((48, 48, 1))
    features = keras.layers.Rescaling(1 / 255)(inputs)
    features = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(features)
    features = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(features)
    features = keras.layers.Flatten()(features)
    return keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(features))


def fer2013_crops(count: int, emotions=("happy", "neutral", "surprise")) -> list[np.ndarray]:
    from PIL import Image

    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        names = sorted(name for name in archive.namelist()
                       if name.startswith("test/") and "/PrivateTest_" in name and name.split("/")[1] in emotions)
        return [np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in names[:count]]


def composite(crops: list[np.ndarray]) -> tuple[np.ndarray, list[faces.Box]]:
    """RGB 600x900 noisy gradient with the crops enlarged to 144 pixels in a 2x3 grid; their boxes."""
    import cv2

    rows, columns = np.mgrid[0:600, 0:900]
    noise = np.random.default_rng(0).normal(0, 6, rows.shape)
    grey = np.clip(90 + 60 * columns / 900 + 30 * rows / 600 + noise, 0, 255).astype(np.uint8)
    boxes = []
    for index, crop in enumerate(crops):
        x, y = 40 + (index % 3) * 290, 60 + (index // 3) * 290
        grey[y:y + PASTE_SIDE, x:x + PASTE_SIDE] = cv2.resize(crop, (PASTE_SIDE, PASTE_SIDE),
                                                              interpolation=cv2.INTER_CUBIC)
        boxes.append(faces.Box(x, y, PASTE_SIDE, PASTE_SIDE))
    return np.repeat(grey[..., None], 3, axis=2), boxes


def iou(first, second) -> float:
    width = max(0, min(first.x + first.width, second.x + second.width) - max(first.x, second.x))
    height = max(0, min(first.y + first.height, second.y + second.height) - max(first.y, second.y))
    return width * height / (first.width * first.height + second.width * second.height - width * height)


def save(path, rgb_or_grey):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb_or_grey).save(path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.keras"
    toy_model().save(path)
    return path


@pytest.fixture(scope="module")
def classifier(model_file):
    return predict.load_classifier(model_file)[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of real inputs and broken ones, and where the faces are."""
    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    save(folder / "astronaut.jpg", skimage_data.astronaut())
    image, pasted = composite(fer2013_crops(18)[12:18])  # six faces the cascade finds four of
    save(folder / "nested" / "group.png", image)
    save(folder / "plain.png", composite([])[0])  # a photo without a face
    (folder / "notes.jpg").write_text("not an image at all")
    (folder / "ignored.txt").write_text("not an input: the suffix is neither image nor video")
    return folder, pasted


def test_folder_of_photos_gives_faces_where_they_are_and_reports_bad_files(photos, classifier, tmp_path):
    folder, pasted = photos
    (tmp_path / "empty").mkdir()
    inputs, problems = predict.collect_inputs([folder, tmp_path / "empty", tmp_path / "missing.jpg"])
    assert sorted(item.relative.as_posix() for item in inputs) == [
        "astronaut.jpg", "nested/group.png", "notes.jpg", "plain.png"]
    assert [problem.reason.split(" (")[0] for problem in problems] == ["folder holds no images or videos",
                                                                       "no such file or folder"]

    outcome = predict.predict_inputs(inputs, classifier, progress=False)
    problems = {path.rsplit("/", 1)[1]: reason for path, reason in outcome.problems}
    assert set(problems) == {"notes.jpg", "plain.png"}
    assert problems["notes.jpg"].startswith("not a readable image")
    assert problems["plain.png"].startswith("no face found")

    by_file = {}
    for record in outcome.records:
        by_file.setdefault(record["file"].rsplit("/", 1)[1], []).append(record)
    assert len(by_file["astronaut.jpg"]) == 1
    astronaut = by_file["astronaut.jpg"][0]
    assert 190 <= astronaut["x"] + astronaut["width"] / 2 <= 260 and astronaut["frame"] is None
    assert astronaut["face"] == 1 and astronaut["time"] is None
    group = by_file["group.png"]
    assert len(group) >= 3
    places = []
    for record in group:
        box = faces.Box(record["x"], record["y"], record["width"], record["height"])
        assert max(iou(box, paste) for paste in pasted) >= 0.4
        places.append(max(range(len(pasted)), key=lambda k: iou(box, pasted[k])))
    # Numbered from 1 in reading order: the pasted 2x3 grid's order, row by row, left to right.
    assert [record["face"] for record in group] == list(range(1, len(group) + 1)) and places == sorted(places)
    for record in outcome.records:
        probabilities = [record[f"probability_{emotion}"] for emotion in EMOTIONS]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert record["emotion"] == EMOTIONS[int(np.argmax(probabilities))]


def keras_answers(model_file, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The model's own probabilities for each crop and for its mirror, straight from Keras."""
    import keras

    model = keras.models.load_model(model_file)
    batch = np.stack(crops)[..., None].astype(np.float32)
    return model.predict(batch, verbose=0), model.predict(batch[:, :, ::-1], verbose=0)


def test_no_detect_on_fer2013_crops_gives_the_mean_of_each_face_and_its_mirror(tmp_path, model_file, classifier):
    crops = fer2013_crops(10, emotions=EMOTIONS)
    for index, crop in enumerate(crops):
        save(tmp_path / f"crop_{index}.png", crop)  # PNG: lossless, so the pixels are FER2013's own
    inputs, _ = predict.collect_inputs([tmp_path])
    outcome = predict.predict_inputs(inputs, classifier, detect=False, batch_size=3, progress=False)
    assert outcome.problems == []
    assert all((record["x"], record["y"], record["width"], record["height"]) == (0, 0, 48, 48)
               for record in outcome.records)
    face, mirror = keras_answers(model_file, crops)
    got = np.array([[record[f"probability_{emotion}"] for emotion in EMOTIONS] for record in outcome.records])
    np.testing.assert_allclose(got, (face + mirror) / 2, atol=2e-6)
    assert np.abs(face - mirror).max() > 1e-3  # the toy model is not symmetric: the mean is not the face alone


def test_no_mirror_gives_the_face_alone_from_a_plain_or_a_mirror_averaged_model(tmp_path, model_file):
    from dlfer.model import mirror

    crops = fer2013_crops(6, emotions=EMOTIONS)
    face, reflected = keras_answers(model_file, crops)
    batch = np.stack(crops)[..., None].astype(np.float32)
    averaged_file = tmp_path / "averaged.keras"  # as an export's mlflow_model holds it
    mirror.mirror_averaged(toy_model()).save(averaged_file)
    for source in (model_file, averaged_file):
        alone, description = predict.load_classifier(source, mirror=False)
        np.testing.assert_allclose(alone(batch), face, atol=2e-6)
        assert "each face alone" in description
        both, description = predict.load_classifier(source, mirror=True)
        np.testing.assert_allclose(both(batch), (face + reflected) / 2, atol=2e-6)  # never mirrored twice
        assert "its mirror" in description
    crop_files = [save(tmp_path / f"crop_{index}.png", crop) for index, crop in enumerate(crops)]
    both = (face + reflected) / 2
    for option, expected in (("--no-mirror", face), ("--mirror", both), (None, both)):
        out = tmp_path / f"{option}.csv"
        result = run_cli(["predict", *crop_files, "--no-detect", "-m", model_file, "-f", "csv", "-o", out,
                          *([option] if option else [])])
        assert result.exit_code == 0, result.output
        with out.open() as handle:
            got = np.array([[float(row[f"probability_{emotion}"]) for emotion in EMOTIONS]
                            for row in csv.DictReader(handle)])
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_an_export_answers_as_exported_and_refuses_a_mirror_option(tmp_path):
    tflite = tmp_path / "model_int8.tflite"
    tflite.write_bytes(b"not read: the option is refused first")
    face = save(tmp_path / "face.png", fer2013_crops(1)[0])
    for option in ("--mirror", "--no-mirror"):
        result = run_cli(["predict", face, "--no-detect", "-m", tflite, option])
        assert result.exit_code == 2
        assert (f"predict: {tflite}: an export answers as it was exported (mirror_average in its parity.json); "
                f"drop {option}, or export again with it") in result.stderr


def test_batch_size_changes_nothing_but_speed(photos, classifier):
    inputs, _ = predict.collect_inputs([photos[0]])
    one = predict.predict_inputs(inputs, classifier, batch_size=1, progress=False)
    many = predict.predict_inputs(inputs, classifier, batch_size=64, progress=False)
    assert one.problems == many.problems and len(one.records) == len(many.records) > 0
    columns = [f"probability_{emotion}" for emotion in EMOTIONS]
    for alone, batched in zip(one.records, many.records):
        # Kernels for other batch sizes may round the last float bit differently: the 6th decimal can move.
        assert {key: value for key, value in alone.items() if key not in columns} == \
            {key: value for key, value in batched.items() if key not in columns}
        np.testing.assert_allclose([alone[column] for column in columns], [batched[column] for column in columns],
                                   atol=2e-6)


def write_video(path, frames, fps=10.0):
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_video_frames_are_classified_and_an_annotated_copy_written(tmp_path, classifier):
    import cv2

    skimage_data = pytest.importorskip("skimage.data")
    portrait = skimage_data.astronaut()[::2, ::2].copy()  # 256x256
    blank = np.full_like(portrait, 128)
    video = write_video(tmp_path / "clip.mp4", [portrait, portrait, blank, blank, portrait, blank])
    faceless = write_video(tmp_path / "faceless.avi", [blank] * 3)
    annotated = tmp_path / "annotated"
    inputs, _ = predict.collect_inputs([video, faceless])
    outcome = predict.predict_inputs(inputs, classifier, frame_step=2, annotate_dir=annotated, batch_size=2,
                                     progress=False)
    # Frames 0, 2 and 4 are sampled; 2 is blank. (The cascade may add a false box on a compressed frame.)
    assert sorted({record["frame"] for record in outcome.records}) == [0, 4]
    assert {record["frame"]: record["time"] for record in outcome.records} == {0: 0.0, 4: 0.4}  # 10 frames a second
    for frame in (0, 4):
        centres = [record["x"] + record["width"] / 2 for record in outcome.records if record["frame"] == frame]
        assert any(95 <= centre <= 130 for centre in centres), centres  # her face, at half the photo's scale
    assert [(path.rsplit("/", 1)[1], reason.split(" ")[0]) for path, reason in outcome.problems] == [
        ("faceless.avi", "no")]
    copy = cv2.VideoCapture(str(annotated / "clip.mp4"))
    assert int(copy.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    ok, first = copy.read()
    copy.release()
    assert ok and first.shape == portrait.shape
    # The green box is drawn around the face: the frame now holds saturated green pixels.
    assert ((first[:, :, 1] > 200) & (first[:, :, 0] < 80) & (first[:, :, 2] < 80)).sum() > 50
    assert not list(annotated.glob(".*partial*"))


def test_not_a_video_is_reported_not_raised(tmp_path, classifier):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    outcome = predict.predict_inputs(predict.collect_inputs([broken])[0], classifier, progress=False)
    assert outcome.records == [] and "not a readable video" in outcome.problems[0].reason


def run_cli(arguments):
    app = typer.Typer()
    app.callback()(lambda: None)  # keeps `predict` a subcommand, as in dlfer's app
    register(app)
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def test_cli_writes_jsonl_csv_and_a_table_and_exits_1_on_bad_inputs(photos, model_file, tmp_path):
    folder, _ = photos
    result = run_cli(["predict", folder, "--model", model_file, "--format", "jsonl", "--no-progress"])
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {record["file"].rsplit("/", 1)[1] for record in records} == {"astronaut.jpg", "group.png"}
    assert "notes.jpg: not a readable image" in result.stderr and "plain.png: no face found" in result.stderr

    out = tmp_path / "faces.csv"
    annotated = tmp_path / "annotated"
    result = run_cli(["predict", folder / "astronaut.jpg", "--model", model_file, "--format", "csv",
                      "--out", out, "--annotate", annotated])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and list(rows[0]) == list(predict.RECORD_FIELDS) and rows[0]["frame"] == ""
    assert (annotated / "astronaut.jpg").is_file()

    result = run_cli(["predict", folder / "astronaut.jpg", "--model", model_file])
    header, row = result.stdout.splitlines()
    assert header.split()[:6] == ["file", "frame", "time", "face", "box", "(x,y,w,h)"] and "astronaut.jpg" in row


def test_cli_exits_2_when_nothing_can_run(tmp_path, model_file, monkeypatch):
    result = run_cli(["predict", tmp_path / "missing", "--model", model_file])
    assert result.exit_code == 2 and "no such file or folder" in result.stderr
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "face.png", np.zeros((48, 48), dtype=np.uint8))
    result = run_cli(["predict", "face.png", "--no-detect"])  # no pipeline output here: the default model is absent
    assert result.exit_code == 2 and "models/finetune/with_ef_fer1/model.keras: not found" in result.stderr
    result = run_cli(["predict", "face.png", "--format", "xml", "--model", model_file])
    assert result.exit_code == 2


def test_model_from_the_mlflow_registry_by_alias(tmp_path, model_file, monkeypatch):
    import mlflow

    store = migrated_mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.create_experiment("dlfer", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment)
    # As the compare stage registers a finetune model that was logged as a plain .keras file.
    client.log_artifact(run.info.run_id, str(model_file), artifact_path="candidate_model")
    client.create_registered_model("toy-fer")
    version = client.create_model_version("toy-fer", f"{run.info.artifact_uri}/candidate_model", run.info.run_id)
    client.set_registered_model_alias("toy-fer", "champion", version.version)

    classifier, description = predict.load_classifier("models:/toy-fer@champion")
    crops = np.stack(fer2013_crops(4, emotions=EMOTIONS))[..., None].astype(np.float32)
    np.testing.assert_allclose(classifier(crops), predict.load_classifier(model_file)[0](crops), atol=1e-6)
    assert "candidate_model" in description
    with pytest.raises(ValueError, match="not found in the MLflow store"):
        predict.load_classifier("models:/toy-fer@nonexistent")


def test_cli_summarises_each_video_as_emotion_shares_over_time(tmp_path, model_file):
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    portrait = skimage_data.astronaut()[::2, ::2].copy()
    blank = np.full_like(portrait, 128)
    # 5 frames a second: her face for 1 s, no face for 1 s, her face again for 0.6 s.
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "talk.mp4", [portrait] * 5 + [blank] * 5 + [portrait] * 3, fps=5.0)
    result = run_cli(["predict", tmp_path / "clips", "--model", model_file, "--format", "csv",
                      "--out", tmp_path / "faces.csv", "--summary", tmp_path / "summary"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "faces.csv").open()))
    assert [float(row["time"]) for row in rows if row["face"] == "1"][:5] == [0.0, 0.2, 0.4, 0.6, 0.8]

    timeline = list(csv.DictReader((tmp_path / "summary" / "talk.csv").open()))
    assert [(row["start"], row["end"]) for row in timeline] == [("0.0", "1.0"), ("1.0", "2.0"), ("2.0", "3.0")]
    faces_per_second = [int(row["faces"]) for row in timeline]
    assert faces_per_second[1] == 0 and faces_per_second[0] >= 5 and faces_per_second[2] >= 3
    for row, count in zip(timeline, faces_per_second):
        assert abs(sum(float(row[emotion]) for emotion in EMOTIONS) - (1 if count else 0)) < 1e-3
    # Overall shares, on stderr, agree with the per-face rows.
    emotions = [row["emotion"] for row in rows]
    leading = max(EMOTIONS, key=emotions.count)
    assert f"talk.mp4: {len(rows)} face(s)" in result.stderr
    assert f"{leading} {emotions.count(leading) / len(emotions):.0%}" in result.stderr
    plot = np.asarray(Image.open(tmp_path / "summary" / "talk.png").convert("RGB"))
    assert plot.shape[:2] == (400, 1000) and (plot.min(axis=2) < 200).mean() > 0.3  # the shares were drawn
