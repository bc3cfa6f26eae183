"""Where a CPU training step of EF-FER2 spends its time, and which runtime settings make it faster.

    python bench/train_speed.py [--size 64] [--batch-size 64] [--backbone efficientnet_lite0]
                                [--settings today no_determinism ...] [--rounds 3] [--steps 6] [--profile]

Each setting trains in its own process (oneDNN and thread pools are fixed when TensorFlow starts), as
the finetune stage trains on CPU: model.fit on in-memory batches of real FER2013 faces, Lite0 at
(size, size, 1), Adam with a cosine schedule, label smoothing. The processes alternate over --rounds
rounds and the table gives each one's median images/s and its ratio to "today" (finetune's CPU
settings before issue 15), measured in this one run, so a noisy machine shifts all rows alike.

--profile traces a few steps of "today" with TensorFlow's profiler and prints where the time goes:
forward vs backward (gradient) ops, and the op types with the largest self time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dlfer.evaluation.results import processor_name

# name -> (environment, in-process options); "today" is what finetune did on CPU before issue 15.
SETTINGS = {
    "today": ({}, {}),
    "no_determinism": ({}, {"determinism": False}),
    "inter_op_1": ({}, {"inter_op": 1}),
    "onednn_off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, {}),
    "bfloat16": ({}, {"precision": "mixed_bfloat16"}),
    "xla": ({}, {"jit_compile": True}),
}


def measure(options: dict, size: int, batch_size: int, steps: int, backbone: str, trace: str | None) -> float:
    """Images/s of model.fit over `steps` steps after two untimed ones, in this process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dlfer.model import backbones, train

    if options.get("inter_op"):
        tf.config.threading.set_inter_op_parallelism_threads(options["inter_op"])
    if options.get("intra_op"):
        tf.config.threading.set_intra_op_parallelism_threads(options["intra_op"])
    if options.get("determinism", True):
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(options.get("precision", "float32"))
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, 48, 48, 1)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 7, batch_size), 7)
    model = backbones.build_classifier(backbone, size, 1, 0.2)
    settings = train.TrainingSettings(epochs=1, batch_size=batch_size, learning_rate=2e-3, seed=0,
                                      lr_schedule="cosine", label_smoothing=0.1)
    train.compile_model(model, settings, steps_per_epoch=1000, jit_compile=options.get("jit_compile", False))
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # tracing and warm-up
    if trace:
        tf.profiler.experimental.start(trace)
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - started
    if trace:
        tf.profiler.experimental.stop()
    return steps * batch_size / seconds


def run_setting(name: str, arguments: argparse.Namespace, trace: str | None = None) -> float:
    environment, _ = SETTINGS[name]
    command = [sys.executable, __file__, "--measure", name, "--size", str(arguments.size), "--batch-size",
               str(arguments.batch_size), "--steps", str(arguments.steps), "--backbone", arguments.backbone]
    if trace:
        command += ["--trace", trace]
    result = subprocess.run(command, env={**os.environ, **environment}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"]


def profile_summary(trace: str, top: int = 12) -> list[str]:
    """Self time by op type from the profiler's framework_op_stats, split into forward and backward."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    spaces = sorted(str(path) for path in Path(trace).rglob("*.xplane.pb"))
    raw, _ = _pywrap_profiler_plugin.xspace_to_tools_data(spaces, "framework_op_stats", {})
    table = json.loads(raw)
    table = table[0] if isinstance(table, list) else table
    columns = [column["id"] for column in table["cols"]]
    rows = [dict(zip(columns, (cell.get("v") if cell else None for cell in row["c"]))) for row in table["rows"]]
    rows = [row for row in rows if row.get("host_or_device") == "Host" or "host_or_device" not in row]
    idle = sum(row["total_self_time"] for row in rows if row["type"] == "IDLE")
    rows = [row for row in rows if row["type"] != "IDLE"]
    busy = sum(row["total_self_time"] for row in rows) or 1.0
    by_type: dict[str, float] = {}
    backward = 0.0
    for row in rows:
        by_type[row["type"]] = by_type.get(row["type"], 0.0) + row["total_self_time"]
        if "gradient" in row["operation"].lower() or "Backprop" in row["type"] or "Grad" in row["type"]:
            backward += row["total_self_time"]
    lines = [f"profile of 'today' (TensorFlow profiler, op self time): idle {100 * idle / (idle + busy):.0f}% of the "
             f"traced thread time; of the busy time, backward (gradient) ops {100 * backward / busy:.0f}%, forward "
             f"and optimizer {100 * (1 - backward / busy):.0f}%", f"{'op type':<48} {'busy time':>9}"]
    for name, seconds in sorted(by_type.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{name:<48} {100 * seconds / busy:>8.1f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--settings", nargs="+", default=[name for name in SETTINGS if name != "xla"],
                        choices=list(SETTINGS), help="xla is left out unless named: it takes minutes")
    parser.add_argument("--profile", action="store_true", help="trace 'today' and print where the time goes")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        rate = measure(SETTINGS[arguments.measure][1], arguments.size, arguments.batch_size, arguments.steps,
                       arguments.backbone, arguments.trace)
        print(json.dumps({"images_per_second": rate}))
        return
    names = ["today", *[name for name in arguments.settings if name != "today"]]
    print(f"processor: {processor_name()}, {len(os.sched_getaffinity(0))} cores; {arguments.backbone} at {arguments.size} px, batch {arguments.batch_size}, "
          f"{arguments.rounds} rounds of {arguments.steps} timed steps, one process per setting")
    rates = {name: [] for name in names}
    for _ in range(arguments.rounds):
        for name in names:
            rates[name].append(run_setting(name, arguments))
    base = statistics.median(rates["today"])
    print(f"{'setting':<16} {'img/s':>8} {'vs today':>9}")
    for name in names:
        rate = statistics.median(rates[name])
        print(f"{name:<16} {rate:>8.1f} {rate / base:>8.2f}x", flush=True)
    if arguments.profile:
        with tempfile.TemporaryDirectory() as trace:
            run_setting("today", arguments, trace=trace)
            print("\n".join(profile_summary(trace)))


if __name__ == "__main__":
    main()
