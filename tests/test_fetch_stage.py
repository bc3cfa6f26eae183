"""The fetch stage run as DVC runs it: a subprocess in a scratch project, on real FER2013 and Imagenette samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dlfer.fer2013 import CANONICAL_COLUMNS, EMOTIONS, USAGES
from dlfer.files import sha256_of_file

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared" / "datasets"
FER2013_ZIP = SHARED / "fer2013" / "fer2013.zip"
IMAGENETTE_ZIP = SHARED / "imagenette" / "imagenette-128.zip"
OUTPUTS = ("data/raw/fer2013.parquet", "data/raw/source_domain.npz", "metrics/fetch.json")


def sample_zip(source: Path, target: Path, per_group: int, group_of) -> Path:
    """Copy the first `per_group` members of every group of a shared zip into a small zip."""
    if not source.is_file():
        pytest.skip(f"{source} absent: the stage test reads the shared dataset copy")
    taken: dict[tuple, int] = {}
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as sample:
        for name in archive.namelist():
            group = group_of(name)
            if group is not None and taken.get(group, 0) < per_group:
                taken[group] = taken.get(group, 0) + 1
                sample.writestr(name, archive.read(name))
    return target


@pytest.fixture
def project(tmp_path):
    """A scratch project: params.yaml from the repository with fetch pointed at small real samples."""
    fer_zip = sample_zip(FER2013_ZIP, tmp_path / "downloads" / "fer-sample.zip", 3,
                         lambda name: (name.split("/")[1], name.split("/")[2].split("_")[0]))
    # Three Imagenette classes under data/external/, where `source_domain: auto` looks.
    classes = ("n01440764", "n02102040", "n02979186")
    sample_zip(IMAGENETTE_ZIP, tmp_path / "data" / "external" / "imagenette-sample.zip", 4,
               lambda name: tuple(name.split("/")[:2]) if name.split("/")[1] in classes else None)
    params = yaml.safe_load((REPOSITORY / "params.yaml").read_text())
    params["fetch"].update(source=str(fer_zip), sha256="", source_domain="auto", source_domain_size=16,
                           source_domain_per_class=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path, fer_zip, params


def run_stage(directory: Path, params: dict | None = None, tracking_uri: str = "") -> subprocess.CompletedProcess:
    if params is not None:
        (directory / "params.yaml").write_text(yaml.safe_dump(params))
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DLFER_FER2013", "DLFER_SOURCE_DOMAIN", "DVC_ROOT")}
    environment |= {"MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{directory / 'mlflow.db'}",
                    "KAGGLEHUB_CACHE": str(directory / "kagglehub-cache")}
    command = [sys.executable, str(REPOSITORY / "stages" / "fetch.py"), "--params", "params.yaml",
               "--out", OUTPUTS[0], "--source-domain-out", OUTPUTS[1], "--metrics", OUTPUTS[2]]
    return subprocess.run(command, cwd=directory, env=environment, capture_output=True, text=True, timeout=120)


def test_stage_writes_table_source_domain_metrics_and_mlflow_run(project):
    directory, fer_zip, _ = project
    result = run_stage(directory)
    assert result.returncode == 0, result.stderr

    table = pd.read_parquet(directory / OUTPUTS[0])
    assert tuple(table.columns) == CANONICAL_COLUMNS
    assert len(table) == 3 * len(EMOTIONS) * len(USAGES)  # the sample holds 3 per (emotion, usage)
    metrics = json.loads((directory / OUTPUTS[2]).read_text())
    assert metrics["images"] == len(table)
    assert metrics["usage"] == {usage: int((table["usage"] == usage).sum()) for usage in USAGES}
    assert metrics["class"]["PublicTest"]["disgust"] == len(table.query("usage == 'PublicTest' and emotion == 'disgust'"))
    # Checkout-relative, and no timings: the file reads the same on every machine (the path goes to MLflow).
    assert metrics["source"] == {"kind": "zip", "origin": "fetch.source", "location": "downloads/fer-sample.zip",
                                 "sha256": sha256_of_file(fer_zip)}
    assert metrics["source_domain"]["origin"] == "data/external"
    assert metrics["source_domain"]["location"] == "data/external/imagenette-sample.zip"
    assert "seconds" not in metrics and "seconds" not in metrics["source_domain"]
    with np.load(directory / OUTPUTS[1]) as domain:
        assert domain["train_images"].shape == (3 * 2, 16, 16, 3)
        assert domain["val_images"].shape == (3 * 4, 16, 16, 3)
        assert domain["class_names"].tolist() == sorted(domain["class_names"].tolist())

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{directory / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dlfer"], filter_string="attributes.run_name = 'fetch'",
                              output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["images"] == len(table) and run.data.metrics["usage.Training"] == metrics["usage"]["Training"]
    assert run.data.params["fetch.source"] == str(fer_zip) and run.data.params["seed"] == "42"
    assert run.data.tags["source.sha256"] == sha256_of_file(fer_zip)
    assert run.data.tags["source.path"] == str(fer_zip) and run.data.metrics["seconds"] > 0
    artifacts = [item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert artifacts == ["fetch.json"]


def test_stage_refuses_bad_input_with_one_line_and_keeps_earlier_outputs(project):
    directory, fer_zip, params = project
    params["fetch"]["source_domain"] = ""
    assert run_stage(directory, params).returncode == 0
    with np.load(directory / OUTPUTS[1]) as domain:  # skipped: present, with zero-length arrays
        assert domain["train_images"].shape == (0, 16, 16, 3) and domain["class_names"].size == 0
    before = {name: (directory / name).read_bytes() for name in OUTPUTS}

    truncated = directory / "downloads" / "truncated.zip"
    truncated.write_bytes(fer_zip.read_bytes()[:5000])
    cases = [
        (dict(source=str(truncated)), str(truncated)),
        (dict(source=str(fer_zip), sha256="0" * 64), "fer-sample.zip"),
        (dict(source="auto"), "DLFER_FER2013"),
        (dict(source=str(fer_zip), source_domain="missing-folder"), "missing-folder"),
    ]
    for changes, named in cases:
        result = run_stage(directory, params | {"fetch": params["fetch"] | changes})
        assert result.returncode == 2, (changes, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fetch: ") and named in lines[0], result.stderr
        assert {name: (directory / name).read_bytes() for name in OUTPUTS} == before
    leftovers = [path.name for path in directory.rglob("*.partial")]
    assert leftovers == []

    params["fetch"]["source_domain_sizee"] = 16
    result = run_stage(directory, params)
    assert result.returncode == 2 and "unknown key(s) fetch.source_domain_sizee" in result.stderr


def outputs_state(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {name: ((directory / name).read_bytes(), (directory / name).stat().st_mtime_ns) for name in OUTPUTS}


def with_members(source: Path, target: Path, extra: dict[str, bytes]) -> Path:
    """A copy of a sample zip with extra members."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as copy:
        for name in archive.namelist():
            copy.writestr(name, archive.read(name))
        for name, data in extra.items():
            copy.writestr(name, data)
    return target


def test_stage_refuses_hostile_or_inconsistent_faces_naming_the_file(project):
    """Bad inputs built from the real faces: one line naming the file and the fix, no traceback, outputs kept."""
    import io

    from PIL import Image

    directory, fer_zip, params = project
    params["fetch"]["source_domain"] = ""
    assert run_stage(directory, params).returncode == 0
    before = outputs_state(directory)

    with zipfile.ZipFile(fer_zip) as archive:
        faces = {name: archive.read(name) for name in archive.namelist()}
    angry = next(name for name in faces if name.startswith("train/angry/"))
    colour = io.BytesIO()
    Image.open(io.BytesIO(faces[angry])).convert("RGB").resize((64, 64)).save(colour, format="JPEG")
    downloads = directory / "downloads"
    latin1 = downloads / "latin1"
    for name, data in faces.items():
        (latin1 / name).parent.mkdir(parents=True, exist_ok=True)
        (latin1 / name).write_bytes(data)
    (latin1 / "train" / "angry" / os.fsdecode(b"Training_caf\xe9.jpg")).write_bytes(faces[angry])
    cases = [
        (with_members(fer_zip, downloads / "hostile.zip", {"../../escaped.jpg": faces[angry]}),
         "hostile.zip: ../../escaped.jpg: ", "download it again from a trusted source"),
        (with_members(fer_zip, downloads / "twice.zip", {angry.replace("/angry/", "/happy/"): faces[angry]}),
         f"twice.zip: {angry} and {angry.replace('/angry/', '/happy/')} are the same image",
         "keep it only in the folder of its true emotion"),
        (with_members(fer_zip, downloads / "big.zip", {"train/happy/Training_99999999.jpg": colour.getvalue()}),
         "big.zip: train/happy/Training_99999999.jpg: 64x64 pixels", "remove it"),
        (latin1, "latin1: train/angry/Training_caf\\xe9.jpg: the file name is not valid UTF-8", "rename the file"),
    ]
    for source, named, fix in cases:
        result = run_stage(directory, params | {"fetch": params["fetch"] | {"source": str(source)}})
        assert result.returncode == 2, (source, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fetch: "), result.stderr
        assert named in lines[0] and fix in lines[0], lines[0]
        assert "Traceback" not in result.stderr and " object at 0x" not in result.stderr
        assert outputs_state(directory) == before
    assert not list(directory.parent.glob("escaped.jpg")) and not list(directory.rglob("escaped.jpg"))


def test_a_dead_tracking_server_stops_fetch_before_it_reads_or_writes_anything(project):
    import socket

    directory, _, params = project
    assert run_stage(directory).returncode == 0
    before = outputs_state(directory)
    with socket.socket() as probe:  # a port the OS just handed out, with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = run_stage(directory, tracking_uri=dead)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"MLflow tracking server {dead} (MLFLOW_TRACKING_URI) is unreachable" in lines[0], \
        result.stderr
    assert "unset MLFLOW_TRACKING_URI" in lines[0] and "Traceback" not in result.stderr
    assert outputs_state(directory) == before  # it stopped before any work: nothing was written
