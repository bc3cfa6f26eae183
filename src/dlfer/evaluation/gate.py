"""The CI metric-regression gate: `dvc metrics diff` with thresholds.

A policy file names, per metric, the direction that is better and how much worse it may get:

    metrics:
      evaluate_with_ef_fer1.test_accuracy: {direction: higher, abs_tol: 0.02, rel_tol: 0.0}

The key is `<metrics file stem>.<key path>`. A metric regresses when it moves the wrong way by
more than max(abs_tol, rel_tol * |baseline|). A metric missing from the current run is a
regression too; one missing from the baseline is reported as new and passes.

A baseline belongs to the params (the profile) of the run that made it: the file holds
{"params": {dotted key: value}, "metrics": {...}}, and the gate only compares a run with a
baseline made with the same params (keys that only say where inputs live, or how the registry is
named, aside). It never compares across profiles.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml


@dataclasses.dataclass(frozen=True)
class Rule:
    direction: str  # "higher" or "lower" is better
    abs_tol: float = 0.0
    rel_tol: float = 0.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    metric: str
    baseline: float | None
    current: float | None
    allowed: float
    status: str  # ok | regressed | missing | new

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline


def load_policy(path: str | Path) -> dict[str, Rule]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: policy file not found; see metrics_policy.yaml in the repository root")
    raw = yaml.safe_load(path.read_text()) or {}
    rules = {}
    for metric, rule in (raw.get("metrics") or {}).items():
        if not isinstance(rule, dict) or rule.get("direction") not in ("higher", "lower"):
            raise ValueError(f"{path}: {metric} needs direction: higher or lower")
        unknown = set(rule) - {"direction", "abs_tol", "rel_tol"}
        if unknown:
            raise ValueError(f"{path}: {metric} has unknown field(s) {sorted(unknown)}; use direction, abs_tol, rel_tol")
        rules[metric] = Rule(rule["direction"], float(rule.get("abs_tol", 0.0)), float(rule.get("rel_tol", 0.0)))
    if not rules:
        raise ValueError(f"{path}: no metrics listed under `metrics:`")
    return rules


def collect_metrics(metrics_dir: str | Path, names: list[str]) -> dict[str, float]:
    """The named metrics (`<file stem>.<key path>`) read from the JSON files in metrics_dir."""
    values = {}
    for name in names:
        stem, _, key_path = name.partition(".")
        path = Path(metrics_dir) / f"{stem}.json"
        if not path.is_file():
            continue
        value = json.loads(path.read_text())
        for key in key_path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = float(value)
    return values


# Keys that say where the inputs are or how the result is filed, not what is learned.
PARAMS_THAT_DO_NOT_CHANGE_METRICS = ("fetch.source", "fetch.sha256", "fetch.source_domain",
                                     "register.registered_model", "register.alias")


class BaselineMismatch(ValueError):
    """No baseline was made with the current run's params; the message names the files and the differences."""


def flat_params(params: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a params.yaml dict, without the keys that do not change metrics."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in PARAMS_THAT_DO_NOT_CHANGE_METRICS:
            flat[f"{prefix}{key}"] = value
    return flat


def params_differences(baseline: dict, current: dict) -> list[str]:
    keys = sorted(set(baseline) | set(current))
    return [f"{key} (baseline {baseline.get(key, 'absent')}, now {current.get(key, 'absent')})"
            for key in keys if baseline.get(key, "absent") != current.get(key, "absent")]


def read_baseline(path: Path) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable baseline ({error}); pin it again with `dlfer baseline`") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not isinstance(raw.get("metrics"), dict):
        raise ValueError(f"{path}: not a baseline with params and metrics (an older format?); pin it again with "
                         f"`dlfer baseline --params <the run's params.yaml> --out {path}`")
    return raw


def matching_baseline(candidates: list[Path], current_params: dict) -> tuple[Path, dict]:
    """The baseline among candidates made with current_params, else BaselineMismatch naming each one's differences."""
    current = flat_params(current_params)
    reasons = []
    for path in candidates:
        baseline = read_baseline(path)
        differences = params_differences(baseline["params"], current)
        if not differences:
            return path, baseline["metrics"]
        shown = ", ".join(differences[:3]) + (f" and {len(differences) - 3} more" if len(differences) > 3 else "")
        reasons.append(f"{path} differs in {shown}")
    if not candidates:
        reasons.append("there is no baseline file")
    raise BaselineMismatch("no baseline was made with this run's params, and runs of different params are never "
                           f"compared: {'; '.join(reasons)}. Check a run of a profile that has a baseline, or pin one "
                           "for this profile: `dlfer baseline --params params.yaml --out baselines/<profile>.json`")


def judge(rules: dict[str, Rule], baseline: dict[str, float], current: dict[str, float]) -> list[Verdict]:
    verdicts = []
    for metric, rule in rules.items():
        before, now = baseline.get(metric), current.get(metric)
        if now is None:
            verdicts.append(Verdict(metric, before, None, 0.0, "missing"))
            continue
        if before is None:
            verdicts.append(Verdict(metric, None, now, 0.0, "new"))
            continue
        allowed = max(rule.abs_tol, rule.rel_tol * abs(before))
        worse_by = before - now if rule.direction == "higher" else now - before
        verdicts.append(Verdict(metric, before, now, allowed, "regressed" if worse_by > allowed + 1e-12 else "ok"))
    return verdicts


def markdown_table(verdicts: list[Verdict]) -> str:
    def number(value):
        return "-" if value is None else f"{value:.4f}"

    lines = ["| Metric | Baseline | Current | Change | Allowed drop | Status |", "|---|---|---|---|---|---|"]
    for verdict in verdicts:
        change = "-" if verdict.change is None else f"{verdict.change:+.4f}"
        lines.append(f"| {verdict.metric} | {number(verdict.baseline)} | {number(verdict.current)} | {change} | "
                     f"{verdict.allowed:.4f} | {verdict.status} |")
    return "\n".join(lines)


def failed(verdicts: list[Verdict]) -> bool:
    return any(verdict.status in ("regressed", "missing") for verdict in verdicts)
