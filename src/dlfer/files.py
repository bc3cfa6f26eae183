"""Writing outputs so that a failure never leaves a half-written file behind.

Every stage writes through these helpers: the content goes to a temporary file in the same
directory and is renamed into place only when complete (rename is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc; elsewhere 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_path(final_path: str | Path):
    """Yield a temporary path beside `final_path`; move it into place only if the block succeeds."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".partial", dir=final_path.parent)
    os.close(handle)
    temporary = Path(temporary)
    os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs should be readable like any file
    try:
        yield temporary
        os.replace(temporary, final_path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(final_dir: str | Path):
    """Yield a temporary directory beside `final_dir`; it replaces `final_dir` only if the block succeeds."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".partial", dir=final_dir.parent))
    aside = None
    try:
        yield temporary
        # The old folder steps aside before the new one moves in, and goes only after: at every
        # moment either the old or the new folder is complete on disk.
        if final_dir.exists():
            aside = final_dir.with_name(f".{final_dir.name}.{temporary.name}.old")
            os.replace(final_dir, aside)
        os.replace(temporary, final_dir)
    except BaseException:
        if aside is not None and not final_dir.exists():
            os.replace(aside, final_dir)
            aside = None
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def _json_default(value):
    # numpy scalars and arrays appear in metrics; JSON wants plain Python numbers.
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def sha256_of_file(path: str | Path) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
