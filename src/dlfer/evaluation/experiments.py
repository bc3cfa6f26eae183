"""A terminal table of recent experiments from the MLflow store, for people without a browser.

One row per evaluate run (newest first): the DVC experiment name and git commit that produced
it, the protocol and ablation variant, its test metrics, and the validation accuracy of the
finetune run that trained the evaluated model.
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
