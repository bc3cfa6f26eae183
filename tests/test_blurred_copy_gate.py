"""A FER2013 copy whose Training faces are blurred stops `dvc repro` in validate, before any training.

The copies are built from real faces of the shared FER2013 zip: a small subset in the same
image-folder layout, once as it is (sharp in every usage) and once with every Training face
Gaussian-blurred by 3 px, which is what the 48x48 copies circulating publicly look like.
"""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from conftest import FER2013_ZIP, copy_project, require, stage_environment

pytestmark = pytest.mark.fer2013

PER_CLASS = {"Training": 8, "PublicTest": 3, "PrivateTest": 3}
BLUR_SIGMA = 3.0


def subset_zip(destination: Path, blur_training: bool) -> Path:
    """A few real faces per class and usage, re-encoded as the shared copy is (JPEG quality 95)."""
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(require(FER2013_ZIP)) as source, zipfile.ZipFile(destination, "w") as target:
        for name in sorted(source.namelist()):
            if not name.endswith(".jpg"):
                continue
            usage, emotion = Path(name).name.split("_")[0], name.split("/")[1]
            if taken.get((usage, emotion), 0) >= PER_CLASS[usage]:
                continue
            taken[(usage, emotion)] = taken.get((usage, emotion), 0) + 1
            face = np.asarray(Image.open(io.BytesIO(source.read(name))).convert("L"), dtype=np.float32)
            if blur_training and usage == "Training":
                face = ndimage.gaussian_filter(face, BLUR_SIGMA)
            encoded = io.BytesIO()
            Image.fromarray(np.clip(np.rint(face), 0, 255).astype(np.uint8)).save(encoded, "JPEG", quality=95)
            target.writestr(name, encoded.getvalue())
    return destination


def project_reading(tmp_path: Path, copy: Path) -> tuple[Path, dict]:
    (tmp_path / "project").mkdir()
    project = copy_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["fetch"].update(source=str(copy), source_domain="")
    params["validate"]["require_official_counts"] = False  # a subset cannot have the official counts
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "data" / "external").mkdir(parents=True)
    environment = stage_environment(project)
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "subset"]):
        subprocess.run(command, cwd=project, env=environment, check=True, capture_output=True)
    return project, environment


def dvc_repro(project: Path, environment: dict, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", "repro", *targets], cwd=project, env=environment, capture_output=True, text=True,
                          timeout=900)


def test_a_copy_with_blurred_training_faces_stops_dvc_repro_in_validate(tmp_path):
    copy = subset_zip(tmp_path / "blurred.zip", blur_training=True)
    project, environment = project_reading(tmp_path, copy)
    result = dvc_repro(project, environment)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Running stage 'validate'" in output and "Running stage 'preprocess'" not in output
    assert "Running stage 'pretrain'" not in output and "Running stage 'finetune" not in output
    message = next(line for line in result.stderr.splitlines() if line.startswith("validate: "))
    assert f"sharpness: {copy}: the Training faces are" in message and "x less sharp than the other" in message
    for usage in ("Training", "PublicTest", "PrivateTest"):
        assert f" {usage} " in message
    assert "validate.max_sharpness_ratio = 2" in message and "fer2013.csv" in message
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "validated" / "audit.parquet").exists()
    assert not (project / "data" / "prepared").exists() and not (project / "models").exists()
    report = (project / "reports" / "validate" / "report.md").read_text()
    assert report.startswith("# FER2013 validation: FAILED") and "## Sharpness by usage" in report


def test_the_same_faces_unblurred_pass_validate(tmp_path):
    copy = subset_zip(tmp_path / "sharp.zip", blur_training=False)
    project, environment = project_reading(tmp_path, copy)
    result = dvc_repro(project, environment, "validate")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = yaml.safe_load((project / "metrics" / "validate.json").read_text())
    assert metrics["passed"] is True and metrics["sharpness_max_ratio"] < 2.0
    assert (project / "data" / "validated" / "audit.parquet").is_file()
