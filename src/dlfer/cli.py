"""dlfer's user commands (typer). The pipeline itself runs through `dvc repro` / `dvc exp run`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

# Where setup-data looks for each raw input, after the environment variable: the workplace's
# shared copy sits beside the checkout. Users with Kaggle access can instead set fetch.source.
RAW_INPUTS = {
    "fer2013.zip": ("DLFER_FER2013", Path("../shared/datasets/fer2013/fer2013.zip")),
    "imagenette-128.zip": ("DLFER_SOURCE_DOMAIN", Path("../shared/datasets/imagenette/imagenette-128.zip")),
}


@app.callback()
def main() -> None:
    """dlfer: reproduce, audit and use the DLFER facial-emotion model."""


def _has_dvc_remote() -> bool:
    listed = subprocess.run(["dvc", "remote", "list"], capture_output=True, text=True)
    return listed.returncode == 0 and bool(listed.stdout.strip())


@app.command("setup-data")
def setup_data(external: Path = typer.Option(Path("data/external"), help="folder data.dvc tracks")) -> None:
    """Put the raw inputs pinned by data.dvc in data/external/: `dvc pull` from a remote, else copy a local copy."""
    missing = [name for name in RAW_INPUTS if not (external / name).exists()]
    if not missing:
        typer.echo(f"setup-data: {external}/ already holds {', '.join(RAW_INPUTS)}")
        return
    if _has_dvc_remote() and subprocess.run(["dvc", "pull", "data.dvc"]).returncode == 0:
        typer.echo("setup-data: pulled data.dvc from the DVC remote")
        return
    external.mkdir(parents=True, exist_ok=True)
    for name in missing:
        variable, fallback = RAW_INPUTS[name]
        candidate = Path(os.environ.get(variable, fallback))
        if candidate.is_file():
            shutil.copyfile(candidate, external / name)
            typer.echo(f"setup-data: copied {candidate} -> {external / name}")
        else:
            typer.echo(f"setup-data: {name} not found: set {variable}=/path/to/{name}, put it in {external}/, "
                       f"configure a DVC remote and `dvc pull data.dvc`, or set fetch.source in params.yaml "
                       "(a Kaggle CSV, a URL with sha256, or kaggle:msambare/fer2013)", err=True)
    status = subprocess.run(["dvc", "status", "data.dvc"], capture_output=True, text=True)
    if "modified" in status.stdout:
        typer.echo("setup-data: data/external differs from the data pinned in data.dvc; "
                   "`dvc commit data.dvc` pins yours (and `dvc push` shares it)", err=True)


if __name__ == "__main__":
    app()
