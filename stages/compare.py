"""compare: this run beside the paper's claims, its literature table, honest anchors and the saved runs.

Reads   <metrics-dir>/finetune_<variant>.json, evaluate_<variant>.json for both variants (required);
        validate.json, augment_balance.json, pretrain.json (context; the report says so if one is absent)
        <references>/paper.yaml, literature.csv
        <saved-runs>/*/  runs kept by `dlfer results save` (git-tracked): the official and paper protocols
                         side by side, for saved runs whose params differ in the protocol alone
Writes  <report>        reports/compare.md
        <chart>         reports/compare.png
        <out-metrics>   metrics/compare.json (the same numbers go to MLflow, booleans as 0/1)
Params  preprocess.protocol and the run's setup (pretrain.source / backbone, finetune.backbone, image size)
Reads only files DVC tracks, never the MLflow store, and never recomputes a metric: run twice on the
same inputs it writes the same bytes. Registering the model is the register stage's work.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from dlfer.evaluation import compare, results
from dlfer.files import atomic_path, write_json
from dlfer.params import VARIANTS, load_params
from dlfer.tracking import configure, log_numeric_metrics, stage_run


def draw_chart(path: Path, references: compare.References, stage_metrics: dict, saved_runs: dict,
               protocol: str) -> None:
    """Horizontal bars of test accuracy: paper's claims, this run (95% CI), saved protocol pairs, anchors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, value in %, (minus, plus) error or None, colour)
    for variant in VARIANTS:
        bars.append((f"paper's claim (augmented random split): {compare.VARIANT_LABELS[variant]}",
                     references.claims["ablation"][variant]["test_accuracy"], None, "tab:red"))
    measured = [(f"this run ({protocol})", stage_metrics["evaluate"][variant], variant, "tab:blue")
                for variant in VARIANTS]
    # Saved runs that differ in the protocol alone: the protocol's effect, as measured.
    for pair in results.protocol_pairs(saved_runs):
        for name, colour in zip(pair, ("tab:orange", "tab:green")):
            evaluated = saved_runs[name]["metrics"].get("evaluate_with_ef_fer1")
            if evaluated:
                measured.append((f"saved {name} ({results.protocol_of(saved_runs[name])})", evaluated,
                                 "with_ef_fer1", colour))
    for label, values, variant, colour in measured:
        if "test_accuracy" not in values:
            continue
        value = 100 * values["test_accuracy"]
        error = None
        if "test_accuracy_ci95_low" in values and "test_accuracy_ci95_high" in values:
            error = (value - 100 * values["test_accuracy_ci95_low"], 100 * values["test_accuracy_ci95_high"] - value)
        bars.append((f"{label}: {compare.VARIANT_LABELS[variant]}", value, error, colour))
    for anchor in references.anchors:
        uncertainty = float(anchor.get("uncertainty") or 0)
        bars.append((anchor["name"], float(anchor["accuracy"]), (uncertainty, uncertainty) if uncertainty else None,
                     "tab:gray"))

    figure, axis = plt.subplots(figsize=(10, 0.5 * len(bars) + 1.5))
    positions = list(range(len(bars)))[::-1]
    for position, (label, value, error, colour) in zip(positions, bars):
        axis.barh(position, value, color=colour, xerr=None if error is None else [[error[0]], [error[1]]], capsize=4)
        axis.text(value + (error[1] if error else 0) + 0.5, position, f"{value:.2f}", va="center", fontsize=8)
    axis.set_yticks(positions, [label for label, *_ in bars], fontsize=8)
    axis.set_xlim(0, 100)
    axis.set_xlabel("test accuracy (%); error bars: 95% bootstrap interval, or the anchor's stated uncertainty")
    axis.set_title("FER2013 test accuracy: the paper's claims, this run, honest anchors")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params"),
    metrics_dir: Path = typer.Option(Path("metrics"), "--metrics-dir"),
    references_dir: Path = typer.Option(Path("references"), "--references"),
    saved_runs_dir: Path = typer.Option(Path("docs/results"), "--saved-runs"),
    report_path: Path = typer.Option(Path("reports/compare.md"), "--report"),
    chart_path: Path = typer.Option(Path("reports/compare.png"), "--chart"),
    out_metrics_path: Path = typer.Option(Path("metrics/compare.json"), "--out-metrics"),
) -> None:
    params = load_params(params_path)
    configure()  # fail fast on an unreachable tracking store, before any work
    references = compare.load_references(references_dir)
    stage_metrics = compare.read_stage_metrics(metrics_dir)
    saved_runs = results.load_runs(saved_runs_dir) if results.has_runs(saved_runs_dir) else {}
    protocol = params.preprocess.protocol

    with stage_run("compare", {"preprocess": {"protocol": protocol}}, tags={"protocol": protocol}):
        import mlflow

        summary = compare.summarise(stage_metrics, references)
        report = compare.render_report(
            protocol=protocol, stage_metrics=stage_metrics, references=references, saved_runs=saved_runs,
            saved_dir=str(saved_runs_dir), summary=summary,
            chart_name=os.path.relpath(chart_path, report_path.parent), metrics_dir=str(metrics_dir),
            run_setup={"pretrain_source": params.pretrain.source, "pretrain_backbone": params.pretrain.backbone,
                       "finetune_backbone": params.finetune.backbone, "image_size": params.finetune.image_size})

        with atomic_path(chart_path) as temporary:
            draw_chart(temporary, references, stage_metrics, saved_runs, protocol)
        with atomic_path(report_path) as temporary:
            temporary.write_text(report)
        write_json(out_metrics_path, summary)
        log_numeric_metrics(summary)
        # log_numeric_metrics leaves booleans out; MLflow gets them as 0/1.
        mlflow.log_metrics({key: float(value) for key, value in summary.items() if isinstance(value, bool)})
        for path in (report_path, chart_path, out_metrics_path):
            mlflow.log_artifact(str(path))
    typer.echo(f"compare: test accuracy {summary['test_accuracy_with_ef_fer1']:.4f} with EF-FER1, "
               f"{summary['test_accuracy_without_ef_fer1']:.4f} without; the paper claims "
               f"{references.claims['test_accuracy']:.2f}%; {len(results.protocol_pairs(saved_runs))} saved "
               f"protocol pair(s) in {saved_runs_dir}")


if __name__ == "__main__":
    try:
        typer.run(main)
    except ValueError as error:  # bad inputs and params: one line naming the file and the fix, no traceback
        raise SystemExit(f"compare: {error}") from None
