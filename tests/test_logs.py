"""What a stage prints about TensorFlow: one device line, none of TensorFlow's harmless error-level noise."""

import os
import subprocess
import sys

# As a stage starts: dlfer first, then TensorFlow, then training's runtime set-up, then a tf.data
# pipeline and a tiny fit (where TensorFlow logs cuInit failures and graph warnings on a CPU).
SCRIPT = """
from dlfer.model import train
import numpy as np
import keras
settings = train.TrainingSettings(epochs=1, batch_size=4, learning_rate=0.01, seed=0)
strategy, runtime = train.configure_runtime(settings)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
model.compile("adam", "categorical_crossentropy")
model.fit(np.zeros((8, 3)), np.eye(2)[[0, 1] * 4], epochs=1, verbose=0)
"""


def test_a_stage_prints_its_device_once_and_no_tensorflow_log_lines():
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    finished = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environment,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    device_lines = [line for line in finished.stdout.splitlines() if line.startswith("training on ")]
    assert len(device_lines) == 1, finished.stdout
    assert ("GPU" in device_lines[0]) or ("the CPU" in device_lines[0])
    # TensorFlow's C++ log lines look like "2026-12-02 11:09:23.379633: E external/...cc:51] ...".
    native = [line for line in finished.stderr.splitlines() if ".cc:" in line and "] " in line]
    assert native == [] and "cuInit" not in finished.stderr, finished.stderr[-3000:]
