"""dlfer's user commands (typer). The pipeline itself runs through `dvc repro` / `dvc exp run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer
import yaml

from dlfer.cli.model import register

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


def load_profile(name_or_path: str) -> dict[str, object]:
    """A profile: a flat YAML mapping of dotted params.yaml keys to values (profiles/<name>.yaml)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path("profiles") / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Path("profiles").glob("*.yaml")))
        raise typer.BadParameter(f"{path}: no such profile; known profiles: {known}")
    overrides = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overrides, dict):
        raise typer.BadParameter(f"{path}: must map dotted keys (finetune.epochs) to values")
    return overrides


def apply_overrides(params: dict, overrides: dict[str, object]) -> dict:
    """params with the dotted-key overrides set; an unknown key is an error, as in `dvc exp run -S`."""
    for dotted, value in overrides.items():
        section = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if not isinstance(section, dict) or leaf not in section:
            raise typer.BadParameter(f"profile key {dotted!r} is not in params.yaml")
        section[leaf] = value
    return params


@app.command()
def profile(name: str = typer.Argument(..., help="profile name in profiles/ (ci, paper_gpu, official_gpu) or a path"),
            apply: bool = typer.Option(False, "--apply", help="write the values into params.yaml instead of printing -S flags"),
            params_file: Path = typer.Option(Path("params.yaml"), "--params")) -> None:
    """Print a profile as `dvc exp run -S` flags, or write it into params.yaml with --apply.

    Example: dvc exp run -n paper-gpu $(dlfer profile paper_gpu)
    """
    overrides = load_profile(name)
    if apply:
        from ruamel.yaml import YAML  # keeps the comments of params.yaml (a dependency of dvc)

        editor = YAML()
        params = editor.load(params_file.read_text())
        apply_overrides(params, overrides)
        with params_file.open("w") as handle:
            editor.dump(params, handle)
        typer.echo(f"profile: wrote {len(overrides)} values of {name} into {params_file}", err=True)
        return
    apply_overrides(yaml.safe_load(params_file.read_text()), overrides)  # validate keys before printing
    typer.echo(" ".join(f"-S {key}={_yaml_scalar(value)}" for key, value in overrides.items()))


@app.command()
def check(metrics_dir: Path = typer.Option(Path("metrics"), help="folder of the current run's metrics JSON files"),
          params: Path = typer.Option(Path("params.yaml"), help="the params the current run used"),
          baseline: Path = typer.Option(None, help="a baseline file; default: the one in baselines/ made with "
                                                   "the same params"),
          baselines: Path = typer.Option(Path("baselines"), help="folder of committed baselines"),
          policy: Path = typer.Option(Path("metrics_policy.yaml"), help="per-metric direction and tolerances")) -> None:
    """Compare the current metrics with the baseline of the same profile; exit 1 on a regression."""
    from dlfer.evaluation import gate

    try:
        rules = gate.load_policy(policy)
        if not params.is_file():
            raise ValueError(f"{params}: not found; pass --params with the params.yaml of the run to check")
        candidates = [baseline] if baseline else sorted(baselines.glob("*.json"))
        for candidate in candidates:
            if not candidate.is_file():
                raise ValueError(f"{candidate}: baseline not found; create it with "
                                 f"`dlfer baseline --params {params} --out {candidate}`")
        chosen, reference = gate.matching_baseline(candidates, yaml.safe_load(params.read_text()) or {})
    except ValueError as error:
        typer.echo(f"check: {error}", err=True)
        raise typer.Exit(2)
    verdicts = gate.judge(rules, reference, gate.collect_metrics(metrics_dir, list(rules)))
    typer.echo(f"check: against {chosen} (made with the same params)")
    typer.echo(gate.markdown_table(verdicts))
    if gate.failed(verdicts):
        bad = [verdict.metric for verdict in verdicts if verdict.status in ("regressed", "missing")]
        typer.echo(f"check: regression in {', '.join(bad)}", err=True)
        raise typer.Exit(1)
    typer.echo("check: no regression")


@app.command()
def baseline(metrics_dir: Path = typer.Option(Path("metrics"), help="folder of the metrics JSON files to pin"),
             params: Path = typer.Option(Path("params.yaml"), help="the params the run used (the baseline's profile)"),
             out: Path = typer.Option(Path("baselines/ci.json"), help="baseline file to (over)write"),
             policy: Path = typer.Option(Path("metrics_policy.yaml"))) -> None:
    """Pin the current metrics, with the params that made them, as a baseline. Commit the file it writes."""
    from dlfer.evaluation import gate
    from dlfer.files import write_json

    rules = gate.load_policy(policy)
    values = gate.collect_metrics(metrics_dir, list(rules))
    missing = sorted(set(rules) - set(values))
    if missing:
        typer.echo(f"baseline: {metrics_dir} lacks {', '.join(missing)}; run the pipeline first", err=True)
        raise typer.Exit(2)
    if not params.is_file():
        typer.echo(f"baseline: {params}: not found; pass --params with the run's params.yaml", err=True)
        raise typer.Exit(2)
    write_json(out, {"params": gate.flat_params(yaml.safe_load(params.read_text()) or {}), "metrics": values})
    typer.echo(f"baseline: wrote {len(values)} metrics and the run's params to {out}; review and commit it")


@app.command()
def runs(limit: int = typer.Option(20, help="how many evaluate runs to show, newest first")) -> None:
    """Print the comparison table of recent experiments from the MLflow store (MLFLOW_TRACKING_URI or mlflow.db)."""
    import mlflow

    from dlfer import tracking
    from dlfer.evaluation import experiments

    tracking.configure()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    typer.echo(experiments.format_table(experiments.recent_runs(client, experiment.experiment_id, limit)))


@app.command()
def exps(all_commits: bool = typer.Option(False, "--all-commits", "-A", help="every commit, not only HEAD"),
         count: int = typer.Option(1, "-n", help="commits to show, newest first")) -> None:
    """The `dvc exp run` experiments with their headline figures, in a table that fits a terminal."""
    from dlfer.evaluation import experiments

    command = ["dvc", "exp", "show", "--json", *(["-A"] if all_commits else ["-n", str(count)])]
    # The dvc installed beside this dlfer, whether or not its environment is on PATH.
    shown = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
    if shown.returncode != 0:
        typer.echo(f"exps: `{' '.join(command)}` failed: {shown.stderr.strip()[-300:]}", err=True)
        raise typer.Exit(1)
    typer.echo(experiments.format_dvc_table(experiments.dvc_rows(json.loads(shown.stdout or "[]"))))


@app.command()
def plots(targets: list[str] = typer.Argument(None, help="plot names or files (default: all of dvc.yaml's plots)"),
          out: Path = typer.Option(Path("dvc_plots"), "--out", "-o", help="folder for index.html"),
          revisions: list[str] = typer.Option(None, "--rev", help="compare git revisions or experiments, as "
                                              "`dvc plots diff` (repeat the option)")) -> None:
    """Draw the DVC plots (training curves, confusion matrices) on a page that needs no network.

    The same plots as `dvc plots show`, whose page loads its chart library from a CDN and stays
    blank offline; this page carries the library inline.
    """
    from dlfer.evaluation import plots as plotting

    try:
        page = plotting.render(out, targets or None, revisions or None)
    except RuntimeError as error:
        typer.echo(f"plots: {error}", err=True)
        raise typer.Exit(1)
    typer.echo(f"plots: open {page.resolve().as_uri()}")


@app.command()
def summary(metrics_dir: Path = typer.Option(Path("metrics"), help="folder of the run's metrics JSON files"),
            params: Path = typer.Option(Path("params.yaml"), help="the params the run used"),
            references: Path = typer.Option(Path("references/paper.yaml"), help="the paper's figures")) -> None:
    """The run's headline in a few lines: both variants with 95% intervals, the ablation, the paper beside them."""
    from dlfer.evaluation.summary import SummaryError, render_summary

    try:
        typer.echo(render_summary(metrics_dir, references, params))
    except SummaryError as error:
        typer.echo(f"summary: {error}", err=True)
        raise typer.Exit(1)


results_app = typer.Typer(no_args_is_help=True, help="Keep finished runs in docs/results/ and compare them.")
app.add_typer(results_app, name="results")


@results_app.command("save")
def results_save(name: str = typer.Argument(..., help="folder name under docs/results, e.g. lite0_cpu"),
                 workspace: Path = typer.Option(Path("."), help="the finished run's checkout"),
                 out: Path = typer.Option(Path("docs/results"), help="where saved runs live"),
                 variant: list[str] = typer.Option(None, help="the variants the run trained (default: both); "
                                                              "e.g. --variant with_ef_fer1 after `dvc exp run "
                                                              "... evaluate@with_ef_fer1`")) -> None:
    """Save a finished run: its metrics, the params that differ from git HEAD's, training time and speed."""
    from dlfer.evaluation.results import VARIANTS, ResultsError, save

    if not name.replace("_", "").replace("-", "").isalnum():
        typer.echo(f"results save: {name!r}: use letters, digits, - and _", err=True)
        raise typer.Exit(1)
    try:
        typer.echo(f"results save: wrote {save(name, workspace, out, tuple(variant) if variant else VARIANTS)}")
    except ResultsError as error:
        typer.echo(f"results save: {error}", err=True)
        raise typer.Exit(1)


@results_app.command("report")
def results_report(root: Path = typer.Option(Path("docs/results"), help="where saved runs live"),
                   references: Path = typer.Option(Path("references/paper.yaml"), help="the paper's figures")) -> None:
    """Write docs/results/README.md from the saved runs' files: no typed figure, so none can drift."""
    from dlfer.evaluation.results import ResultsError, write_report

    try:
        typer.echo(f"results report: wrote {write_report(root, references)}")
    except (ResultsError, OSError) as error:
        typer.echo(f"results report: {error}", err=True)
        raise typer.Exit(1)


def _yaml_scalar(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


register(app)  # predict, export and serve: dlfer.cli.model

if __name__ == "__main__":
    app()
