"""Terminal tables of experiments, for people without a browser.

recent_runs: one row per evaluate run in the MLflow store (newest first): the DVC experiment name
and git commit that produced it, the protocol and ablation variant, its test metrics, and the
validation accuracy of the finetune run that trained the evaluated model.

dvc_rows: one row per commit and `dvc exp run` experiment, from `dvc exp show --json`, with the
headline figures under short names: `dvc exp show` itself names each column by its metrics file and
key (`metrics/evaluate_with_ef_fer1.json:test_accuracy`), too wide for a terminal.
"""

from __future__ import annotations

import pandas as pd

COLUMNS = ("started", "experiment", "commit", "protocol", "variant", "val_accuracy", "test_accuracy", "f1_macro")


def recent_runs(client, experiment_id: str, limit: int) -> pd.DataFrame:
    evaluations = client.search_runs([experiment_id], filter_string="tags.stage = 'evaluate'",
                                     order_by=["attributes.start_time DESC"], max_results=limit)
    rows = []
    for run in evaluations:
        tags, metrics = run.data.tags, run.data.metrics
        val_accuracy = None
        if tags.get("finetune_run_id"):
            try:
                val_accuracy = client.get_run(tags["finetune_run_id"]).data.metrics.get("val_accuracy")
            except Exception:  # the finetune run was deleted or lives in another store
                val_accuracy = None
        rows.append({
            "started": pd.Timestamp(run.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M"),
            "experiment": tags.get("dvc_exp_name") or "(workspace)",
            "commit": tags.get("git_commit", "")[:7],
            "protocol": tags.get("protocol", ""),
            "variant": tags.get("variant", ""),
            "val_accuracy": val_accuracy,
            "test_accuracy": metrics.get("test_accuracy"),
            "f1_macro": metrics.get("f1_macro"),
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def format_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "no evaluate runs yet: run `dvc repro` or `dvc exp run` first"
    shown = table.copy()
    for column in ("val_accuracy", "test_accuracy", "f1_macro"):
        shown[column] = shown[column].map(lambda value: "-" if pd.isna(value) else f"{value:.4f}")
    return shown.to_string(index=False)


DVC_COLUMNS = ("experiment", "protocol", "px", "epochs", "val acc", "test acc (95% CI)", "macro-F1",
               "random init", "EF-FER1 adds")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _dvc_row(name: str, data: dict) -> dict:
    params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
    metrics = {path.rsplit("/", 1)[-1].removesuffix(".json"): (values or {}).get("data", {})
               for path, values in (data.get("metrics") or {}).items()}
    tuned, evaluated = params.get("finetune", {}), metrics.get("evaluate_with_ef_fer1", {})
    ablation = metrics.get("evaluate_without_ef_fer1", {})
    test, low, high = (evaluated.get(key) for key in ("test_accuracy", "test_accuracy_ci95_low",
                                                       "test_accuracy_ci95_high"))
    interval = f" ({100 * low:.1f}-{100 * high:.1f})" if low is not None and high is not None else ""
    delta = (test - ablation["test_accuracy"]) if test is not None and "test_accuracy" in ablation else None
    return {"experiment": name, "protocol": params.get("preprocess", {}).get("protocol", "-"),
            # image_size lived in preprocess before issue 16: older commits still show theirs
            "px": tuned.get("image_size", params.get("preprocess", {}).get("image_size", "-")),
            "epochs": tuned.get("epochs", "-"),
            "val acc": _percent(metrics.get("finetune_with_ef_fer1", {}).get("val_accuracy")),
            "test acc (95% CI)": _percent(test) + interval, "macro-F1": _percent(evaluated.get("f1_macro")),
            "random init": _percent(ablation.get("test_accuracy")),
            "EF-FER1 adds": "-" if delta is None else f"{100 * delta:+.2f}"}


def dvc_rows(shown: list[dict]) -> pd.DataFrame:
    """Rows of `dvc exp show --json`: each commit (its short hash or workspace), then its experiments."""
    rows = []
    for commit in shown:
        if commit.get("data"):
            name = commit.get("name") or commit["rev"][:7]
            rows.append(_dvc_row(name if commit["rev"] != "workspace" else "workspace", commit["data"]))
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                if revision.get("data"):
                    rows.append(_dvc_row(f"  {experiment.get('name') or revision['rev'][:7]}", revision["data"]))
    return pd.DataFrame(rows, columns=list(DVC_COLUMNS))


def format_dvc_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "no commit or experiment has metrics yet: run `dvc repro` or `dvc exp run` first"
    width = max(len(name) for name in [*table["experiment"], "experiment"])
    return table.to_string(index=False, formatters={"experiment": lambda name: f"{name:<{width}}"})
