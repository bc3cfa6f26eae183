"""User commands that use a trained model: `dlfer predict`, `dlfer export` and `dlfer serve`.

dlfer.cli.app adds them to the dlfer app with register(app).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

OUTPUT_FORMATS = ("table", "jsonl", "csv")
MODEL_HELP = ("model: a .keras file or its folder (default models/finetune/with_ef_fer1/model.keras), "
              "models:/<name>@<alias> or runs:/<id>/<path> from the MLflow store, or an export (.tflite, .onnx, "
              "SavedModel folder)")
MIRROR_HELP = ("a Keras model answers the mean of each face and its mirror (default: what evaluate's headline "
               "measures), or with --no-mirror the face alone at half the work")


def predict(
    paths: list[Path] = typer.Argument(..., help="image files, folders (searched recursively) and video files"),
    model: str = typer.Option("", "--model", "-m", help=MODEL_HELP),
    output_format: str = typer.Option("table", "--format", "-f", help="table, jsonl or csv"),
    out: Path = typer.Option(None, "--out", "-o", help="write the results to this file instead of the terminal"),
    annotate: Path = typer.Option(None, "--annotate", help="folder for copies of the images and videos with "
                                  "boxes and emotions drawn on them"),
    detect: bool = typer.Option(True, "--detect/--no-detect", help="--no-detect: every input is one face crop "
                                "(like FER2013's 48x48 images), no face detection"),
    margin: float = typer.Option(None, "--margin", help="extra border around each detected face, as a fraction of "
                                 "its box side (default matches FER2013's crops)"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="faces classified together"),
    frame_step: int = typer.Option(1, "--frame-step", min=1, help="classify every n-th video frame"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
    summary: Path = typer.Option(None, "--summary", help="folder for each video's summary: <video>.csv (the share "
                                 "of each emotion per second) and <video>.png (its plot)"),
    mirror: bool = typer.Option(None, "--mirror/--no-mirror", help=MIRROR_HELP + "; an export answers as it was "
                                "exported"),
) -> None:
    """Find the faces in photos and videos and print each face's emotion and 7 probabilities.

    Faces are numbered from 1 in reading order (left to right, top to bottom), as the annotated
    copies show them; video rows carry the frame and its time in seconds.

    Problems with single inputs (unreadable, not an image, no face found) are reported on stderr
    and the run goes on; the exit code is 1 if any input had a problem, 2 if nothing could run.
    """
    from dlfer.deploy import faces
    from dlfer.deploy import predict as prediction
    from dlfer.files import atomic_path

    if output_format not in OUTPUT_FORMATS:
        raise typer.BadParameter(f"{output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}", param_hint="--format")
    inputs, problems = prediction.collect_inputs(paths)
    try:
        classifier, description = prediction.load_classifier(model or None, mirror) if inputs else (None, "")
    except ValueError as error:
        typer.echo(f"predict: {error}", err=True)
        raise typer.Exit(2)
    if inputs:
        typer.echo(f"predict: {len(inputs)} input file(s), model {description}", err=True)
        outcome = prediction.predict_inputs(
            inputs, classifier, detect=detect, margin=faces.DEFAULT_MARGIN if margin is None else margin,
            batch_size=batch_size, frame_step=frame_step, annotate_dir=annotate, progress=progress)
        records, problems = outcome.records, problems + outcome.problems
        if summary is not None:
            _summarise_videos(inputs, records, summary)
    else:
        records = []
    if out is not None:
        with atomic_path(out) as temporary, temporary.open("w", newline="") as handle:
            prediction.write_records(records, output_format, handle)
    elif records:
        prediction.write_records(records, output_format, sys.stdout)
    for problem in problems:
        typer.echo(f"predict: {problem.path}: {problem.reason}", err=True)
    files_with_faces = len({record["file"] for record in records})
    typer.echo(f"predict: {len(records)} face(s) in {files_with_faces} file(s); {len(problems)} problem(s)"
               + (f"; results in {out}" if out is not None else "")
               + (f"; annotated copies in {annotate}" if annotate is not None else ""), err=True)
    if not inputs:
        raise typer.Exit(2)
    if problems:
        raise typer.Exit(1)


def _summarise_videos(inputs, records: list[dict], folder: Path) -> None:
    """Per video with faces: its timeline CSV and plot in folder, and its overall shares on stderr."""
    from dlfer.deploy import predict as prediction

    for item in inputs:
        faces_of_video = [record for record in records if record["file"] == str(item.path) and record["time"] is not None]
        if not faces_of_video:
            continue
        stem = folder / item.relative.with_suffix("")
        shares = prediction.write_video_summary(faces_of_video, stem.with_suffix(".csv"), stem.with_suffix(".png"),
                                                title=str(item.relative))
        ranked = sorted(shares.items(), key=lambda pair: -pair[1])
        typer.echo(f"predict: {item.relative}: {len(faces_of_video)} face(s) up to "
                   f"{max(record['time'] for record in faces_of_video):.1f} s: "
                   + ", ".join(f"{emotion} {share:.0%}" for emotion, share in ranked if share > 0)
                   + f"; timeline {stem.with_suffix('.csv')}, plot {stem.with_suffix('.png')}", err=True)


def export(
    model: str = typer.Option("", "--model", "-m", help=MODEL_HELP.split(", or an export")[0]),
    out: Path = typer.Option(Path("exports/with_ef_fer1"), "--out", "-o", help="folder to (over)write"),
    formats: str = typer.Option(",".join(("saved_model", "tflite_float16", "tflite_int8", "onnx", "mlflow")),
                                "--formats", help="comma-separated: saved_model, tflite_float16, tflite_int8, "
                                "onnx, mlflow"),
    calibration: Path = typer.Option(Path("data/balanced/train.npz"), "--calibration",
                                     help="real FER2013 images (.npz with 'images') for the int8 calibration"),
    calibration_images: int = typer.Option(300, "--calibration-images", min=1),
    check: str = typer.Option("data/balanced/val.npz", "--check",
                              help="labelled validation images (.npz) each export is compared on with the Keras "
                              "model (not the test split: evaluate alone reads it); '' skips"),
    check_images: int = typer.Option(0, "--check-images", min=0, help="use only the first n check images (0 = all)"),
    seed: int = typer.Option(42, "--seed", help="draws the calibration images"),
    mirror: bool = typer.Option(None, "--mirror/--no-mirror",
                                help="answer the mean of each face and its mirror (as evaluate's headline), or the "
                                "face alone at half the work (default: export.mirror_average)"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params",
                                     help="export.min_top1_agreement: the least top-1 agreement each format must "
                                     "reach; export.mirror_average"),
) -> None:
    """Write SavedModel, TFLite float16 and int8, ONNX and an MLflow pyfunc, and check each against Keras.

    With export.mirror_average (or --mirror) every format answers the mean of each face and its mirror.
    The parity report (top-1 agreement with the Keras model, accuracy) goes to <out>/parity.json.
    A format below export.min_top1_agreement (params.yaml) on the check faces fails the export
    (exit 1) and nothing is written.
    Serve the pyfunc with: mlflow models serve -m <out>/mlflow_model --env-manager local
    """
    import numpy as np

    from dlfer.deploy import export as exporting
    from dlfer.params import load_params

    chosen = tuple(name.strip() for name in formats.split(",") if name.strip())
    try:
        calibration_set = None
        if "tflite_int8" in chosen:
            images, _ = exporting.load_split(calibration)
            calibration_set = exporting.representative_images(images, calibration_images, np.random.default_rng(seed))
        check_set, check_labels, min_agreement = None, None, 0.0
        if check or mirror is None:
            export_params = load_params(params_file).export
            mirror = export_params.mirror_average if mirror is None else mirror
        if check:
            min_agreement = export_params.min_top1_agreement
            check_set, check_labels = exporting.load_split(Path(check))
            if check_images:
                check_set = check_set[:check_images]
                check_labels = None if check_labels is None else check_labels[:check_images]
        report = exporting.export_model(model or None, out, chosen, calibration_set, check_set, check_labels,
                                        min_agreement, mirror_average=mirror)
    except exporting.ParityError as error:
        typer.echo(f"export: {error}", err=True)
        raise typer.Exit(1)
    except ValueError as error:
        typer.echo(f"export: {error}", err=True)
        raise typer.Exit(2)
    typer.echo("export: every format answers " + ("the mean of each face and its mirror (twice the work per face)"
               if report["mirror_average"] else "the face alone"), err=True)
    if "keras_accuracy" in report:
        typer.echo(f"keras          accuracy {report['keras_accuracy']:.4f}")
    for kind, entry in report["formats"].items():
        line = f"{kind:<14} {entry['path']}  {entry['bytes'] / 1e6:.1f} MB"
        if "top1_agreement" in entry:
            line += f"  agreement {entry['top1_agreement']:.4f}"
        if "accuracy" in entry:
            line += f"  accuracy {entry['accuracy']:.4f}"
        typer.echo(line)
    typer.echo(f"export: wrote {out}/ (parity report {out / 'parity.json'})", err=True)


def serve(
    model: str = typer.Option("", "--model", "-m", help=MODEL_HELP.split(", or an export")[0]),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; 0.0.0.0 lets other machines in"),
    port: int = typer.Option(5001, "--port", "-p", min=0, help="0 picks a free port"),
    mirror: bool = typer.Option(True, "--mirror/--no-mirror", help=MIRROR_HELP),
) -> None:
    """Serve the model over HTTP: MLflow's POST /invocations, and a web page at / to try photos and the webcam.

    The model is loaded and warmed up before the server says it is ready.
    """
    import contextlib
    import io

    # MLflow advises type hints on the pyfunc's predict when the class is defined (they would change
    # how MLflow parses requests, so it has none), under its own "once" filter that no warnings
    # filter of ours overrides: the advice is dropped with whatever else the import writes to stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        from dlfer.deploy import serving

    try:
        loaded = serving.load_served_model(model or None, mirror)
    except ValueError as error:
        typer.echo(f"serve: {error}", err=True)
        raise typer.Exit(2)
    serving.warm_up(loaded)

    def announce(url: str) -> None:
        photo = (f"{{ printf '{{\"dataframe_split\": {{\"columns\": [\"image\"], \"data\": [[\"'; "
                 f"base64 -w0 photo.jpg; printf '\"]]}}}}'; }} | curl -s {url}/invocations "
                 "-H 'Content-Type: application/json' --data-binary @-")
        views = "the mean of each face and its mirror" if mirror else "each face alone"
        typer.echo(f"serve: model {model or 'models/finetune/with_ef_fer1'} ({views}) loaded and warmed up; "
                   f"ready at {url}\n"
                   f"  web page   {url}/  (upload a photo or use the webcam)\n"
                   f"  a photo    {photo}\n"
                   f"  face crops {{\"instances\": [<48x48 pixels 0-255>, ...]}} or a crop file as a photo with "
                   f"columns [\"image\", \"detect\"] and detect false\n"
                   "  answer     one row per face: input, face (1, 2, ... in reading order), x, y, width, height, "
                   "emotion, probability_<emotion> x 7, error\n"
                   "  Ctrl+C stops the server")

    serving.run(loaded, host, port, announce)


def register(app: typer.Typer) -> None:
    """Add `predict`, `export` and `serve` to the dlfer command."""
    app.command("predict")(predict)
    app.command("export")(export)
    app.command("serve")(serve)
