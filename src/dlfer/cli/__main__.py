"""`python -m dlfer.cli`: the same app as the `dlfer` command."""

from dlfer.cli.app import app

app()
