import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlfer.evaluation import gate

PARAMS = "seed: 42\nfetch: {source: auto}\nfinetune: {epochs: 2}\n"
POLICY = """
metrics:
  evaluate.test_accuracy: {direction: higher, abs_tol: 0.02}
  evaluate.loss: {direction: lower, rel_tol: 0.1}
"""


def write_run(folder, accuracy, loss):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluate.json").write_text(json.dumps({"test_accuracy": accuracy, "loss": loss}))


def test_judge_respects_direction_and_tolerances():
    rules = {"a": gate.Rule("higher", abs_tol=0.02), "b": gate.Rule("lower", rel_tol=0.1)}
    assert [v.status for v in gate.judge(rules, {"a": 0.5, "b": 1.0}, {"a": 0.481, "b": 1.09})] == ["ok", "ok"]
    assert [v.status for v in gate.judge(rules, {"a": 0.5, "b": 1.0}, {"a": 0.47, "b": 1.2})] == ["regressed"] * 2
    assert [v.status for v in gate.judge(rules, {"a": 0.5}, {"b": 1.0})] == ["missing", "new"]


def test_policy_errors_name_the_file(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("metrics:\n  x: {direction: up}\n")
    with pytest.raises(ValueError, match="policy.yaml: x needs direction"):
        gate.load_policy(bad)


def dlfer(*arguments, cwd):
    return subprocess.run([sys.executable, "-m", "dlfer.cli", *arguments], cwd=cwd, capture_output=True, text=True)


def test_check_command_fails_a_worse_run_and_passes_an_equal_one(tmp_path):
    (tmp_path / "metrics_policy.yaml").write_text(POLICY)
    (tmp_path / "params.yaml").write_text(PARAMS)
    write_run(tmp_path / "metrics", accuracy=0.60, loss=1.0)
    pinned = dlfer("baseline", cwd=tmp_path)
    assert pinned.returncode == 0, pinned.stderr
    written = json.loads((tmp_path / "baselines" / "ci.json").read_text())
    assert written["metrics"]["evaluate.test_accuracy"] == 0.60
    assert written["params"] == {"seed": 42, "finetune.epochs": 2}  # fetch.source says where, not what

    equal = dlfer("check", cwd=tmp_path)
    assert equal.returncode == 0, equal.stdout + equal.stderr
    assert "| evaluate.test_accuracy | 0.6000 | 0.6000 |" in equal.stdout

    write_run(tmp_path / "metrics", accuracy=0.55, loss=1.0)
    worse = dlfer("check", cwd=tmp_path)
    assert worse.returncode == 1
    assert "regressed" in worse.stdout and "evaluate.test_accuracy" in worse.stderr


def test_check_without_baseline_says_how_to_make_one(tmp_path):
    (tmp_path / "metrics_policy.yaml").write_text(POLICY)
    (tmp_path / "params.yaml").write_text(PARAMS)
    result = dlfer("check", cwd=tmp_path)
    assert result.returncode == 2 and "dlfer baseline" in result.stderr


def test_check_never_holds_a_run_against_another_profiles_baseline(tmp_path):
    (tmp_path / "metrics_policy.yaml").write_text(POLICY)
    (tmp_path / "params.yaml").write_text(PARAMS)
    write_run(tmp_path / "metrics", accuracy=0.60, loss=1.0)
    assert dlfer("baseline", cwd=tmp_path).returncode == 0
    # A run of another profile (more epochs) with worse metrics: refused, not judged.
    (tmp_path / "params.yaml").write_text(PARAMS.replace("epochs: 2", "epochs: 6"))
    write_run(tmp_path / "metrics", accuracy=0.40, loss=2.0)
    result = dlfer("check", cwd=tmp_path)
    assert result.returncode == 2 and "regressed" not in result.stdout
    assert "baselines/ci.json differs in finetune.epochs (baseline 2, now 6)" in result.stderr
    # Its own baseline is found among several, whatever the file's name.
    assert dlfer("baseline", "--out", "baselines/long.json", cwd=tmp_path).returncode == 0
    found = dlfer("check", cwd=tmp_path)
    assert found.returncode == 0 and "against baselines/long.json" in found.stdout


def test_the_committed_ci_baseline_was_made_with_the_ci_profile_on_todays_params():
    """A renamed or added param must reach baselines/ci.json too, or CI's gate refuses its own run."""
    from dlfer.cli.app import apply_overrides, load_profile

    project = Path(__file__).resolve().parents[1]
    params = apply_overrides(yaml.safe_load((project / "params.yaml").read_text()),
                             load_profile(str(project / "profiles" / "ci.yaml")))
    baseline = json.loads((project / "baselines" / "ci.json").read_text())
    assert gate.params_differences(baseline["params"], gate.flat_params(params)) == []
