"""The `dlfer` command (typer): pipeline, results and gate commands (app) and the commands that use a
trained model, predict / export / serve (model). The pipeline itself runs through `dvc repro`."""
