"""Training images/s of EF-FER2 on this machine: Keras' kernels (before issue 15), dlfer's CPU kernels, other options.

    python bench/train_throughput.py [--size 64] [--batch-size 64] [--backbone efficientnet_lite0]
                                     [--settings keras cpu_kernels cpu_bf16 pipeline ...] [--rounds 3] [--steps 8]
                                     [--no-profile] [--xla-ops] [--ceiling] [--train data/balanced/train.npz]

Each setting trains in its own process (oneDNN and TensorFlow's thread pools are fixed when it starts), as
the finetune stage trains on CPU: model.fit on real FER2013 faces (48x48 grey, resized inside the model),
Adam with a cosine schedule, label smoothing, determinism on. Steps are timed inside one fit from the end
of two warm-up steps to the last step's end (fit's own start and end are not training). The processes
alternate over --rounds rounds; the table gives each one's median images/s and its ratio to "keras", the
CPU path before issue 15, measured in this one run, so a noisy machine shifts all rows alike; "per round" is
the median of each round's ratio (runs seconds apart), steadier where the machine's speed drifts.

- keras: Keras' layers as they are (finetune.cpu_kernels: off).
- cpu_kernels: dlfer.model.cpu_kernels (finetune.cpu_kernels: auto on a CPU) with float32 products
  (finetune.cpu_math: fp32).
- cpu_bf16: the same with bfloat16 products where oneDNN computes them (finetune.cpu_math: bf16, the default):
  faster only on CPUs with AMX; elsewhere (AMD Zen 4's AVX512-BF16 too) oneDNN keeps the float32 kernels.
- pipeline: cpu_kernels fed by the finetune stage's input pipeline (dlfer.model.train.make_dataset) instead
  of one batch held in memory; its ratio to cpu_kernels is what feeding costs.
- no_determinism, inter_op_1, intra_op_1, inter_op_4, onednn_off, bfloat16: cpu_kernels with one runtime
  option changed (TensorFlow's defaults on 2 cores are 2 intra-op and 2 inter-op threads).
- xla: Keras' layers under jit_compile (slow: minutes; --xla-ops says why).

The profile (on unless --no-profile) traces a few steps of keras and of cpu_kernels with TensorFlow's
profiler and prints where the time goes: forward vs backward (gradient) ops, and milliseconds per step by op
type.
--xla-ops times single layers' forward and backward with and without XLA.
--ceiling times the 1x1 convolutions' matrix products of one step alone and a large square product, so the
table shows what the rest of a step (depthwise, batch norm, activations, optimizer) costs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

FER2013_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fer2013" / "fer2013.zip"
WARMUP_STEPS = 2
# name -> (environment, options); options: kernels (keras | dlfer), feed (memory | pipeline), determinism,
# inter_op, precision, jit_compile.
SETTINGS = {
    "keras": ({}, {"kernels": "keras"}),
    "cpu_kernels": ({}, {}),
    "cpu_bf16": ({}, {"math": "bf16"}),
    "pipeline": ({}, {"feed": "pipeline"}),
    "no_determinism": ({}, {"determinism": False}),
    "inter_op_1": ({}, {"inter_op": 1}),
    "intra_op_1": ({}, {"intra_op": 1}),
    "inter_op_4": ({}, {"inter_op": 4}),
    "onednn_off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, {}),
    "bfloat16": ({}, {"precision": "mixed_bfloat16"}),
    "xla": ({}, {"kernels": "keras", "jit_compile": True}),
}


def load_faces(path: Path | None, count: int):
    """(images (N,48,48,1) float32, labels (N,) int64, where they came from): an npz, else the shared FER2013 zip."""
    import numpy as np
    from PIL import Image

    from dlfer.fer2013 import EMOTIONS

    if path is not None:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["images"][:count], archive["labels"][:count]
        return images[..., None].astype("float32"), labels.astype("int64"), str(path)
    if not FER2013_ZIP.is_file():
        raise SystemExit(f"no --train npz and {FER2013_ZIP} is absent; pass --train data/balanced/train.npz")
    with zipfile.ZipFile(FER2013_ZIP) as archive:
        names = sorted(name for name in archive.namelist() if name.startswith("train/") and name.endswith(".jpg"))
        names = names[:: max(len(names) // count, 1)][:count]
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in names])
    labels = np.array([EMOTIONS.index(name.split("/")[1]) for name in names], dtype=np.int64)
    return images[..., None].astype("float32"), labels, f"{len(names)} faces of {FER2013_ZIP.name}"


def measure(options: dict, arguments: argparse.Namespace, trace: str | None) -> float:
    """Images/s of model.fit in this process, timed from the end of the warm-up steps to the last step's end."""
    import keras
    import tensorflow as tf

    from dlfer.fer2013 import EMOTIONS
    from dlfer.model import backbones, cpu_kernels, train

    bf16_products = options.get("math") == "bf16"
    if bf16_products:
        cpu_kernels.allow_bf16_products()  # before TensorFlow's first op
    if options.get("inter_op"):
        tf.config.threading.set_inter_op_parallelism_threads(options["inter_op"])
    if options.get("intra_op"):
        tf.config.threading.set_intra_op_parallelism_threads(options["intra_op"])
    if options.get("determinism", True):
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(options.get("precision", "float32"))
    keras.utils.set_random_seed(0)
    steps, batch_size = arguments.steps, arguments.batch_size
    images, labels, _ = load_faces(arguments.train, (steps + WARMUP_STEPS) * batch_size)
    model = backbones.build_classifier(arguments.backbone, arguments.size, 1, 0.2)
    if options.get("kernels", "dlfer") == "dlfer":
        cpu_kernels.install(model, bf16_products=bf16_products)
    settings = train.TrainingSettings(epochs=1, batch_size=batch_size, learning_rate=2e-3, seed=0,
                                      lr_schedule="cosine", label_smoothing=0.1)
    train.compile_model(model, settings, steps_per_epoch=1000, jit_compile=options.get("jit_compile", False))
    if options.get("feed") == "pipeline":
        dataset = train.make_dataset(images[..., 0].astype("uint8"), labels, batch_size, len(EMOTIONS),
                                     shuffle_seed=0).repeat()
    else:
        batch = (images[:batch_size], keras.utils.to_categorical(labels[:batch_size], len(EMOTIONS)))
        dataset = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=WARMUP_STEPS, verbose=0)  # tracing
    ends = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    if trace:
        tf.profiler.experimental.start(trace)
    model.fit(dataset, epochs=1, steps_per_epoch=WARMUP_STEPS + steps, callbacks=[timer], verbose=0)
    if trace:
        tf.profiler.experimental.stop()
    return steps * batch_size / (ends[-1] - ends[WARMUP_STEPS - 1])


def run_setting(name: str, arguments: argparse.Namespace, trace: str | None = None) -> float:
    environment, _ = SETTINGS[name]
    command = [sys.executable, __file__, "--measure", name, "--size", str(arguments.size), "--batch-size",
               str(arguments.batch_size), "--steps", str(arguments.steps), "--backbone", arguments.backbone]
    if arguments.train:
        command += ["--train", str(arguments.train)]
    if trace:
        command += ["--trace", trace]
    result = subprocess.run(command, env={**os.environ, **environment}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"]


def op_times(trace: str, steps: int) -> tuple[dict[str, float], float, float]:
    """Milliseconds per step by op type (self time, all threads), the backward share, and the idle share."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    spaces = sorted(str(path) for path in Path(trace).rglob("*.xplane.pb"))
    raw, _ = _pywrap_profiler_plugin.xspace_to_tools_data(spaces, "framework_op_stats", {})
    table = json.loads(raw)
    table = table[0] if isinstance(table, list) else table
    columns = [column["id"] for column in table["cols"]]
    rows = [dict(zip(columns, (cell.get("v") if cell else None for cell in row["c"]))) for row in table["rows"]]
    idle = sum(row["total_self_time"] for row in rows if row["type"] == "IDLE")
    rows = [row for row in rows if row["type"] != "IDLE"]
    busy = sum(row["total_self_time"] for row in rows) or 1.0
    by_type: dict[str, float] = {}
    backward = 0.0
    for row in rows:
        # oneDNN's kernels are named _MklNative<Op> or _Mkl<Op>: one row per TensorFlow op.
        name = row["type"].removeprefix("_MklNative").removeprefix("_Mkl")
        by_type[name] = by_type.get(name, 0.0) + row["total_self_time"] / 1000 / (steps + WARMUP_STEPS)
        if "gradient" in row["operation"].lower() or "Backprop" in row["type"] or "Grad" in row["type"]:
            backward += row["total_self_time"]
    return by_type, backward / busy, idle / (idle + busy)


def profile_table(arguments: argparse.Namespace, names: list[str], top: int = 14) -> list[str]:
    profiles = {}
    for name in names:
        with tempfile.TemporaryDirectory() as trace:
            run_setting(name, arguments, trace=trace)
            profiles[name] = op_times(trace, arguments.steps)
    lines = ["profile (TensorFlow profiler, op self time summed over threads, ms per step):"]
    for name, (_, backward, idle) in profiles.items():
        lines.append(f"  {name}: backward (gradient) ops {100 * backward:.0f}% of the busy time, forward and "
                     f"optimizer {100 * (1 - backward):.0f}%; idle {100 * idle:.0f}% of the traced thread time")
    ops = {op for times, _, _ in profiles.values() for op in times}
    totals = {op: sum(times.get(op, 0.0) for times, _, _ in profiles.values()) for op in ops}
    lines.append(f"  {'op type':<44}" + "".join(f"{name:>13}" for name in names))
    for op in sorted(totals, key=lambda op: -totals[op])[:top]:
        lines.append(f"  {op:<44}" + "".join(f"{profiles[name][0].get(op, 0.0):>13.1f}" for name in names))
    lines.append(f"  {'all ops':<44}" + "".join(f"{sum(profiles[name][0].values()):>13.1f}" for name in names))
    return lines


def xla_ops_table() -> list[str]:
    """One layer's forward and backward at a Lite0 shape, as a graph and under XLA, in this process."""
    import numpy as np
    import tensorflow as tf

    inputs = tf.constant(np.random.default_rng(0).random((64, 16, 16, 144), dtype=np.float32))
    cases = {
        "depthwise 5x5": ((5, 5, 144, 1), lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME")),
        "depthwise 3x3": ((3, 3, 144, 1), lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME")),
        "convolution 1x1": ((1, 1, 144, 24), lambda x, w: tf.nn.conv2d(x, w, 1, "SAME")),
        "convolution 3x3": ((3, 3, 144, 24), lambda x, w: tf.nn.conv2d(x, w, 1, "SAME")),
        "batch norm + relu6": ((144,), lambda x, w: tf.nn.relu6(
            tf.nn.batch_normalization(x, *tf.nn.moments(x, [0, 1, 2]), w, w, 1e-3))),
    }
    lines = [f"XLA on this CPU, one layer's forward and backward at (64, 16, 16, 144):",
             f"  {'layer':<20} {'graph ms':>9} {'XLA ms':>9} {'XLA / graph':>12}"]
    for name, (shape, layer) in cases.items():
        weights = tf.Variable(np.random.default_rng(1).random(shape, dtype=np.float32))

        def step(layer=layer, weights=weights):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = tf.reduce_sum(layer(inputs, weights) ** 2)
            return tape.gradient(loss, [inputs, weights])

        times = []
        for function in (tf.function(step), tf.function(step, jit_compile=True)):
            function()
            started = time.perf_counter()
            for _ in range(5):
                results = function()
            [result.numpy() for result in results]
            times.append((time.perf_counter() - started) / 5 * 1000)
        lines.append(f"  {name:<20} {times[0]:>9.2f} {times[1]:>9.2f} {times[1] / times[0]:>11.1f}x")
    return lines


def matmul_ceiling_lines(arguments: argparse.Namespace, step_ms: dict[str, float]) -> list[str]:
    """How much of a cpu_kernels step the 1x1 convolutions' matrix products take, against this CPU's matmul rate."""
    import numpy as np
    import tensorflow as tf

    from dlfer.model import backbones, cpu_kernels

    model = backbones.build_classifier(arguments.backbone, arguments.size, 1, 0.2)
    shapes = [(arguments.batch_size * layer.input.shape[1] * layer.input.shape[2], layer.input.shape[3], layer.filters)
              for layer in model._flatten_layers(include_self=False) if cpu_kernels.pointwise(layer)]
    generator = np.random.default_rng(0)
    operands = [(tf.constant(generator.random((rows, inner), dtype=np.float32)),
                 tf.constant(generator.random((inner, outer), dtype=np.float32)),
                 tf.constant(generator.random((rows, outer), dtype=np.float32))) for rows, inner, outer in shapes]

    @tf.function
    def products():  # forward, input gradient, kernel gradient of every 1x1 convolution
        return [tf.reduce_sum(tf.matmul(x, w)) + tf.reduce_sum(tf.matmul(dy, w, transpose_b=True))
                + tf.reduce_sum(tf.matmul(x, dy, transpose_a=True)) for x, w, dy in operands]

    square = tf.constant(generator.random((2048, 2048), dtype=np.float32))
    big = tf.function(lambda: tf.reduce_sum(tf.matmul(square, square)))

    def milliseconds(function, repeats: int = 5) -> float:
        function()
        started = time.perf_counter()
        for _ in range(repeats):
            np.asarray(function())
        return (time.perf_counter() - started) / repeats * 1000

    flops = sum(3 * 2 * rows * inner * outer for rows, inner, outer in shapes)
    products_ms, square_ms = milliseconds(products), milliseconds(big)
    kernels_ms, keras_ms = step_ms["cpu_kernels"], step_ms["keras"]
    return [f"1x1 convolutions as matrix products: {len(shapes)} layers, {flops / 1e9:.1f} GFLOP per step "
            f"(forward, input and kernel gradients), {products_ms:.1f} ms alone = {flops / products_ms / 1e6:.0f} "
            f"GFLOP/s; one 2048x2048 product runs at {2 * 2048 ** 3 / square_ms / 1e6:.0f} GFLOP/s on this CPU",
            f"  a cpu_kernels step takes {kernels_ms:.1f} ms: {products_ms:.1f} in these products, "
            f"{kernels_ms - products_ms:.1f} in the rest (depthwise, batch norm, activations, optimizer, idle); "
            f"2x keras ({keras_ms:.1f} ms) is a step of {keras_ms / 2:.1f} ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--train", type=Path, default=None, help="npz with images (N,48,48) uint8 and labels")
    parser.add_argument("--settings", nargs="+", default=["keras", "cpu_kernels", "cpu_bf16", "pipeline"],
                        choices=list(SETTINGS), help="xla takes minutes")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="trace keras and cpu_kernels: where the time goes (on unless --no-profile)")
    parser.add_argument("--xla-ops", action="store_true", help="single layers with and without XLA")
    parser.add_argument("--ceiling", action="store_true",
                        help="the 1x1 convolutions' matrix products alone, against this CPU's matmul rate")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        rate = measure(SETTINGS[arguments.measure][1], arguments, arguments.trace)
        print(json.dumps({"images_per_second": rate}))
        return
    from dlfer.machine import processor_name

    names = ["keras", *[name for name in arguments.settings if name != "keras"]]
    print(f"processor: {processor_name()}, {len(os.sched_getaffinity(0))} cores; {arguments.backbone} at "
          f"{arguments.size} px, batch {arguments.batch_size}, {arguments.rounds} rounds of {arguments.steps} "
          f"timed steps, one process per setting", flush=True)
    rates = {name: [] for name in names}
    for _ in range(arguments.rounds):
        for name in names:
            rates[name].append(run_setting(name, arguments))
    base = statistics.median(rates["keras"])
    # A machine whose speed drifts slows whole rounds: each round's ratio to keras, from runs seconds apart, is
    # steadier than the ratio of medians; both are printed.
    print(f"{'setting':<16} {'img/s':>8} {'vs keras':>9} {'per round':>10}   img/s by round")
    for name in names:
        rate = statistics.median(rates[name])
        paired = statistics.median(mine / keras for mine, keras in zip(rates[name], rates["keras"]))
        print(f"{name:<16} {rate:>8.1f} {rate / base:>8.2f}x {paired:>9.2f}x   "
              f"{' '.join(f'{value:.0f}' for value in rates[name])}", flush=True)
    if arguments.profile:
        traced = [name for name in ("keras", "cpu_kernels", "cpu_bf16") if name in names]
        print("\n".join(profile_table(arguments, traced)), flush=True)
    if arguments.ceiling and {"keras", "cpu_kernels"} <= set(names):
        step_ms = {name: arguments.batch_size / statistics.median(rates[name]) * 1000 for name in names}
        print("\n".join(matmul_ceiling_lines(arguments, step_ms)), flush=True)
    if arguments.xla_ops:
        print("\n".join(xla_ops_table()))


if __name__ == "__main__":
    main()
