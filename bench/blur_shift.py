"""How much of a trained model's validation accuracy depends on the blur of the evaluation faces.

Scores a finetune model on the validation usage (PublicTest, never the test split) three ways:
the published sharp pixels, the pixels blurred by the sigma preprocess used
(metrics/preprocess.json: eval_blur_sigma, preprocess.match_training_sharpness), and, for scale,
twice that sigma. A model trained on the blurred Training faces of the workplace copy is at
chance on the sharp faces and well above it on the blurred ones; on a sharp copy the sigma is 0
and the first two rows agree.

    python bench/blur_shift.py [--model models/finetune/with_ef_fer1] [--raw data/raw/fer2013.parquet]
"""

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from dlfer import splits
from dlfer.sharpness import gaussian_blur
from dlfer.validation import laplacian_variance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/finetune/with_ef_fer1"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw/fer2013.parquet"))
    parser.add_argument("--preprocess-metrics", type=Path, default=Path("metrics/preprocess.json"))
    arguments = parser.parse_args()
    sigma = json.loads(arguments.preprocess_metrics.read_text()).get("eval_blur_sigma", 0.0)
    table = pd.read_parquet(arguments.raw)
    validation = table[table["usage"] == "PublicTest"]
    images, labels = splits.decode_images(validation), validation["label"].to_numpy()
    model = keras.models.load_model(arguments.model / "model.keras", compile=False)
    print(f"model {arguments.model}, {len(labels)} PublicTest faces, preprocess sigma {sigma:g}")
    print("| evaluation faces | blur sigma (px) | median sharpness | accuracy | seconds |")
    print("|---|---|---|---|---|")
    for name, blur in (("published (sharp)", 0.0), ("matched to Training", sigma), ("twice the match", 2 * sigma)):
        faces = gaussian_blur(images, blur)
        started = time.perf_counter()
        predicted = model.predict(faces[..., None].astype("float32"), batch_size=256, verbose=0).argmax(axis=1)
        accuracy = float((predicted == labels).mean())
        print(f"| {name} | {blur:g} | {np.median(laplacian_variance(faces)):.1f} | {accuracy:.4f} | "
              f"{time.perf_counter() - started:.1f} |")


if __name__ == "__main__":
    main()
