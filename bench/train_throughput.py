"""Training images/s of EF-FER2 fed by the real input pipeline vs. by in-memory synthetic batches.

The real pipeline is the finetune stage's: uint8 arrays from an npz, through dlfer.model.train.make_dataset
(shuffle, batch, parallel cast and one-hot, prefetch). The synthetic feed repeats one batch that
is already a float tensor, so it costs nothing per step. Their ratio is what the input pipeline
costs (goal: under 5%, i.e. a ratio above 0.95). The first steps (tracing) are not timed, and the
two feeds alternate over several rounds (medians reported) so that load from other processes on
a shared machine does not favour one of them.

    python bench/train_throughput.py [--train data/balanced/train.npz] [--sizes 48 96 224]
                                     [--steps 4] [--rounds 3] [--batch-size 16] [--backbone efficientnet_b3]

Without --train and without data/balanced/train.npz, the images come from the shared FER2013 zip.
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from dlfer.fer2013 import EMOTIONS
from dlfer.model import backbones, train

FER2013_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fer2013" / "fer2013.zip"
WARMUP_STEPS = 2


def load_images(path: Path | None, count: int) -> tuple[np.ndarray, np.ndarray, str]:
    if path is not None:
        with np.load(path, allow_pickle=False) as archive:
            return archive["images"], archive["labels"], str(path)
    if not FER2013_ZIP.is_file():
        raise SystemExit(f"no --train npz and {FER2013_ZIP} is absent; pass --train data/balanced/train.npz")
    with zipfile.ZipFile(FER2013_ZIP) as archive:
        names = sorted(name for name in archive.namelist() if name.startswith("train/") and name.endswith(".jpg"))
        names = names[:: max(len(names) // count, 1)][:count]
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in names])
    labels = np.array([EMOTIONS.index(name.split("/")[1]) for name in names], dtype=np.int64)
    return images, labels, f"{len(names)} images of {FER2013_ZIP.name}"


class _StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.started = None
        self.finished = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == WARMUP_STEPS - 1:
            self.started = time.perf_counter()
        self.finished = time.perf_counter()


def images_per_second(model: keras.Model, dataset: tf.data.Dataset, steps: int, batch_size: int) -> float:
    """Timed inside one fit, as the finetune stage trains: from the end of the warm-up steps to the last step."""
    timer = _StepTimer()
    model.fit(dataset, epochs=1, steps_per_epoch=WARMUP_STEPS + steps, callbacks=[timer], verbose=0, shuffle=False)
    return steps * batch_size / (timer.finished - timer.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=None, help="npz with images (N,48,48) uint8 and labels")
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96, 224])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of each feed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="efficientnet_b3", choices=backbones.BACKBONES)
    arguments = parser.parse_args()
    default_train = Path("data/balanced/train.npz")
    path = arguments.train or (default_train if default_train.is_file() else None)
    needed = (arguments.steps + WARMUP_STEPS) * arguments.batch_size * arguments.rounds
    images, labels, origin = load_images(path, needed)
    print(f"images: {origin}; backbone {arguments.backbone}; batch {arguments.batch_size}; "
          f"{arguments.rounds} rounds of {arguments.steps} timed steps; devices: {[d.device_type for d in tf.config.list_physical_devices()]}")
    settings = train.TrainingSettings(epochs=1, batch_size=arguments.batch_size, learning_rate=1e-3, seed=0)
    print(f"{'size':>5} {'pipeline img/s':>15} {'synthetic img/s':>16} {'ratio':>6}")
    for size in arguments.sizes:
        keras.utils.set_random_seed(0)
        model = backbones.build_classifier(arguments.backbone, size, 3, 0.2)
        train.compile_model(model, settings, steps_per_epoch=1)
        real = train.make_dataset(images, labels, arguments.batch_size, len(EMOTIONS), shuffle_seed=0).repeat()
        batch = next(iter(real))
        synthetic = tf.data.Dataset.from_tensors(batch).repeat()
        rates = {"real": [], "synthetic": []}
        for _ in range(arguments.rounds):
            rates["synthetic"].append(images_per_second(model, synthetic, arguments.steps, arguments.batch_size))
            rates["real"].append(images_per_second(model, real, arguments.steps, arguments.batch_size))
        real_rate, synthetic_rate = np.median(rates["real"]), np.median(rates["synthetic"])
        print(f"{size:>5} {real_rate:>15.1f} {synthetic_rate:>16.1f} {real_rate / synthetic_rate:>6.3f}", flush=True)


if __name__ == "__main__":
    main()
