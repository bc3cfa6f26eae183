"""`dvc plots show`, rendered so the page works with no network.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline it stays blank.
`dvc plots show --html-template` accepts a page of our own: this one inlines the three
libraries from the vl-convert-python wheel (`vl_convert.javascript_bundle`, the same libraries
it renders with), and leaves out DVC's `{scripts}` placeholder, where the CDN tags would go.
The plots are DVC's own: dvc.yaml's `plots:` and the stages' plot outputs, drawn with DVC's
templates, so `dvc plots show` and `dlfer plots` never disagree about what is plotted.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

# DVC's templates declare Vega-Lite 5 ("$schema": .../vega-lite/v5.json); the bundle must match.
VEGA_LITE_VERSION = "5.21"

# DVC fills {plot_divs} (and {refresh_tag}); the charset line keeps non-ASCII titles and legends
# readable, which DVC's default page, having none, shows as mojibake.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>dlfer plots</title>
    <script>BUNDLE</script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """An HTML template for `dvc plots show --html-template` with vega, vega-lite and vega-embed inlined."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # A literal "</script>" inside the bundle would end the inline script early.
    if "</script" in bundle.lower():
        raise RuntimeError("vl_convert's JavaScript bundle contains '</script>'; it cannot be inlined")
    return PAGE.replace("BUNDLE", bundle)


def render(out: Path, targets: list[str] | None = None, revisions: list[str] | None = None,
           repository: Path | None = None) -> Path:
    """Run `dvc plots show` (or `dvc plots diff` for revisions) with the offline template; the page's path.

    targets: plot names or files (default: every plot of the project); repository: the DVC project
    folder (default: the current one).
    """
    with tempfile.TemporaryDirectory() as scratch:
        template = Path(scratch) / "offline.html"
        template.write_text(offline_template(), encoding="utf-8")
        command = ["plots", "diff", *revisions] if revisions else ["plots", "show"]
        if revisions and targets:
            command += ["--targets", *targets]
        elif targets:
            command += targets
        finished = subprocess.run([sys.executable, "-m", "dvc", *command, "--html-template", str(template),
                                   "--out", str(Path(out).resolve())],
                                  cwd=repository, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(command)} failed: {(finished.stderr or finished.stdout).strip()}")
    return Path(out) / "index.html"
