"""Results do not depend on the machine's speed: a budget-free finetune gives the same metrics file on a
quiet CPU and on one that two busy processes keep loaded (issue 10)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from test_pretrain_finetune_stages import finetune_command, start
from test_resume import VARIANT, inputs, run_to_end  # noqa: F401  (inputs is the module fixture)

from dlfer.files import read_json

BUSY_LOOP = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass\n"


def test_a_loaded_machine_trains_the_same_model_as_a_quiet_one(inputs, tmp_path):  # noqa: F811
    quiet, loaded = (shutil.copytree(inputs, tmp_path / name) for name in ("quiet", "loaded"))
    command = {VARIANT: finetune_command(VARIANT)}
    process, log = start(quiet, command)[VARIANT]
    run_to_end(process, log)
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(2)]
    try:
        process, log = start(loaded, command)[VARIANT]
        run_to_end(process, log)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    for path in (f"metrics/finetune_{VARIANT}.json", f"plots/finetune_{VARIANT}.csv"):
        assert (loaded / path).read_bytes() == (quiet / path).read_bytes(), path
    assert read_json(loaded / f"metrics/finetune_{VARIANT}.json")["truncated"] is False
