"""validate: check the canonical FER2013 table and audit its known defects before anything trains on it.

Reads:   --raw      data/raw/fer2013.parquet (fetch's canonical table)
         --params   params.yaml `validate`: blank_max_std, near_duplicate_max_distance,
                    require_official_counts, max_sharpness_ratio
Writes:  --reports  reports/validate/: report.md (critical failures, class x usage counts against
                    the official release, audit counts), examples.png (blank images, cross-usage
                    and label-conflict duplicate pairs), gx_validation_result.json and
                    gx_expectation_suite.json (the great-expectations run)
         --audit    data/validated/audit.parquet, one row per image_id: blank, pixel_std, phash,
                    exact_group, near_group, cross_usage_exact/near/duplicate, duplicate_of_eval,
                    label_conflict, label_conflict_near (see dlfer.data.validation.audit_images)
         --metrics  metrics/validate.json: the counts, `critical_failures` and `passed`
MLflow:  run "validate" with params validate.*, the numeric metrics and reports/validate/ as artifacts.
Exit:    0 when the table passed. 1 on critical failures (schema or type errors, labels outside
         the 7 classes, images that are not 48x48 greyscale, counts unlike the official ones when
         required, one usage far more or less sharp than the others: a blurred copy): the
         reports, metrics and MLflow run are written first so `report.md` says why, and the audit
         is not written, so preprocess never reads an audit of a broken table.
         2 when params.yaml or the raw table is missing or unreadable, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dlfer.data import validation
from dlfer.files import atomic_directory, atomic_path, write_json
from dlfer.params import ParamsError, load_params
from dlfer.tracking import configure, log_numeric_metrics, stage_run


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default="data/raw/fer2013.parquet")
    parser.add_argument("--audit", default="data/validated/audit.parquet")
    parser.add_argument("--reports", default="reports/validate")
    parser.add_argument("--metrics", default="metrics/validate.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    started = time.perf_counter()
    try:
        params = load_params(arguments.params)
        configure()  # fail fast on an unreachable tracking store, before any work
        table = validation.read_raw_table(arguments.raw)
    except (ParamsError, validation.RawTableError) as error:
        print(f"validate: {error}", file=sys.stderr)
        return 2

    outcome = validation.validate_table(table, params.validate, source=validation.table_source(arguments.raw))
    with atomic_directory(arguments.reports) as directory:
        validation.write_reports(outcome, table, directory, arguments.raw)
    if outcome.passed:
        with atomic_path(arguments.audit) as temporary:
            outcome.audit.to_parquet(temporary, index=False)
    write_json(arguments.metrics, outcome.metrics)

    with stage_run("validate", params.section("validate"), tags={"passed": str(outcome.passed).lower()}):
        import mlflow

        log_numeric_metrics(outcome.metrics)
        mlflow.log_metric("passed", float(outcome.passed))
        mlflow.log_metric("seconds", round(time.perf_counter() - started, 2))  # varies: MLflow only
        mlflow.log_artifacts(str(arguments.reports), artifact_path="reports")

    report = Path(arguments.reports) / "report.md"
    if not outcome.passed:
        failures = outcome.critical_failures
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        print(f"validate: {len(failures)} critical failure(s): {failures[0]}{more}; see {report}", file=sys.stderr)
        return 1
    metrics = outcome.metrics
    print(f"validate: passed, {metrics['rows']} images; {metrics['blank_images']} blank, "
          f"{metrics['exact_duplicate_images']} in exact duplicate groups, {metrics['near_duplicate_images']} "
          f"in near duplicate groups, {metrics['cross_usage_duplicate_images']} duplicated across usages, "
          f"{metrics['label_conflict_images']} with conflicting labels; see {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
