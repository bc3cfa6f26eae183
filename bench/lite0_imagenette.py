"""Top-1/top-5 of the converted EfficientNet-Lite0 on all Imagenette validation images, and its speed.

Each 128x128 image is resized to 224 (bilinear) and scored by the 1000-way ImageNet head; a
prediction is right when it names the image's ImageNet class. Most Imagenette validation images
come from ImageNet's *training* split, which these weights were trained on; the ILSVRC2012_val_*
files are ImageNet validation images, so their accuracy is reported apart as the held-out figure.

    python bench/lite0_imagenette.py [--zip ../shared/datasets/imagenette/imagenette-128.zip]
"""

import argparse
import io
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from dlfer.model.lite0 import IMAGENETTE_IMAGENET_INDEX, build_efficientnet_lite0, load_imagenet_weights

DEFAULT_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "imagenette" / "imagenette-128.zip"


def read_validation(zip_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 128, 128, 3) uint8, ImageNet labels (N,), and whether each is an ImageNet validation image."""
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(name for name in archive.namelist() if name.startswith("val/") and name.endswith(".JPEG"))
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB")) for name in names])
    labels = np.array([IMAGENETTE_IMAGENET_INDEX[name.split("/")[1]] for name in names])
    held_out = np.array(["ILSVRC2012_val_" in name for name in names])
    return images, labels, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="imagenette-128.zip")
    parser.add_argument("--batch-size", type=int, default=64)
    arguments = parser.parse_args()
    if not arguments.zip.is_file():
        raise SystemExit(f"{arguments.zip} not found; pass --zip with the path of imagenette-128.zip")

    images, labels, held_out = read_validation(arguments.zip)
    started = time.perf_counter()
    model = build_efficientnet_lite0(classifier_activation=None)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    provenance = load_imagenet_weights(model)
    conversion_seconds = time.perf_counter() - started

    top5 = []
    started = time.perf_counter()
    for start in range(0, len(images), arguments.batch_size):
        batch = images[start : start + arguments.batch_size].astype(np.float32)
        resized = keras.ops.image.resize(batch, (224, 224), interpolation="bilinear")
        logits = model.predict_on_batch(resized)
        top5.append(np.argsort(logits, axis=1)[:, ::-1][:, :5])
    inference_seconds = time.perf_counter() - started
    top5 = np.concatenate(top5)
    top1_hits = top5[:, 0] == labels
    top5_hits = (top5 == labels[:, None]).any(axis=1)

    print(f"weights: {provenance['source']} sha256 {provenance['sha256'][:16]}")
    print(f"build {build_seconds:.1f} s, weight conversion {conversion_seconds:.2f} s")
    subsets = (("all", np.ones_like(held_out)), ("ImageNet val (held out)", held_out), ("ImageNet train", ~held_out))
    for title, mask in subsets:
        print(f"{title:<24} n={mask.sum():5d}  top-1 {top1_hits[mask].mean():.4f}  top-5 {top5_hits[mask].mean():.4f}")
    rate = len(images) / inference_seconds
    print(f"throughput {rate:.1f} images/s (resize + forward, batch {arguments.batch_size}, {len(images)} images)")


if __name__ == "__main__":
    main()
