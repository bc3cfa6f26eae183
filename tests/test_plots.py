"""`dlfer plots`: the project's DVC plots on a page that renders in Chromium with no network."""

import json
import re
import shutil
import subprocess
import sys

import browser
import numpy as np
from typer.testing import CliRunner

from conftest import PROJECT
from dlfer.cli.app import app
from dlfer.fer2013 import EMOTIONS
from dlfer.params import VARIANTS


def plots_project(root):
    """A DVC project with this project's dvc.yaml and small plot data of the shape the stages write."""
    rng = np.random.default_rng(0)
    shutil.copy2(PROJECT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy2(PROJECT / "params.yaml", root / "params.yaml")
    (root / "plots").mkdir()
    for variant in VARIANTS:
        lines = ["epoch,accuracy,val_accuracy,loss,val_loss,learning_rate,images,seconds"]
        lines += [f"{epoch},{0.2 + 0.1 * epoch},{0.18 + 0.09 * epoch},{2.0 - 0.2 * epoch},{2.1 - 0.15 * epoch},"
                  f"0.001,7000,{60 + epoch}" for epoch in range(1, 5)]
        (root / "plots" / f"finetune_{variant}.csv").write_text("\n".join(lines) + "\n")
        reports = root / "reports" / "evaluate" / variant
        reports.mkdir(parents=True)
        actual = rng.integers(0, len(EMOTIONS), 200)
        predicted = np.where(rng.random(200) < 0.6, actual, rng.integers(0, len(EMOTIONS), 200))
        rows = [f"PrivateTest_{index:05d},{EMOTIONS[a]},{EMOTIONS[p]}" for index, (a, p) in
                enumerate(zip(actual, predicted))]
        (reports / "predictions.csv").write_text("id,actual,predicted\n" + "\n".join(rows) + "\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


def embedded_specs(page: str) -> dict[str, dict]:
    """Each plot's Vega-Lite spec, by plot id, as DVC writes them into the page."""
    found = re.finditer(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (.*?);\s*vegaEmbed',
                        page, re.S)
    return {match.group(1): json.loads(match.group(2)) for match in found}


def test_plots_render_offline_in_chromium_without_seconds_and_with_actual_on_y(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    project = plots_project(tmp_path / "project")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["plots", "--out", "dvc_plots"])
    assert result.exit_code == 0, result.output
    page_file = project / "dvc_plots" / "index.html"
    page = page_file.read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in page and '<meta charset="utf-8">' in page

    specs = embedded_specs(page)
    # dvc.yaml's plots only: the stage no longer plots every CSV column (seconds, images) against the step.
    assert sorted(specs) == ["accuracy", "confusion_with_ef_fer1", "confusion_without_ef_fer1", "loss"]
    for name, fields in (("accuracy", {"accuracy", "val_accuracy"}), ("loss", {"loss", "val_loss"})):
        curves = specs[name]["encoding"]["strokeDash"]["scale"]["domain"]  # "<file>::<column>", one per line drawn
        assert {curve.split("::")[1] for curve in curves} == fields and len(curves) == 4
    for variant in VARIANTS:
        encoding = specs[f"confusion_{variant}"]["spec"]["encoding"]
        assert (encoding["y"]["field"], encoding["x"]["field"]) == ("actual", "predicted")  # as scikit-learn

    dom = browser.rendered_dom(page_file.as_uri())
    # vega-embed draws each plot as an SVG only when its libraries loaded; offline the divs would stay empty.
    assert dom.count('class="marks"') == 4, dom[-2000:]
    assert dom.count('class="mark-line role-mark') >= 8 and 'class="mark-rect role-mark' in dom
    y_titles = re.findall(r"aria-label=\"Y-axis titled '([^']*)'", dom)
    assert sorted(y_titles) == ["accuracy", "actual", "actual", "loss"], y_titles
    # Long legend labels end in an ellipsis, which a page without a charset showed as "â€¦".
    legends = re.findall(r'class="mark-text role-legend-label".*?>([^<]*)</text>', dom)
    assert "finetune_with_ef_fer1.csv::accuracy" in legends and any(label.endswith("\u2026") for label in legends)
    assert "\u00e2\u20ac" not in dom
    pixels = browser.screenshot(page_file.as_uri(), tmp_path / "plots.png")
    assert browser.non_background_share(pixels) > 0.03

