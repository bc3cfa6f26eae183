"""dlfer.files.atomic_directory: a folder is replaced whole or not at all."""

import pytest

from dlfer.files import atomic_directory


def test_a_failed_block_keeps_the_old_folder_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as temporary:
            (temporary / "new.txt").write_text("new")
            raise RuntimeError("stage failed")
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in target.iterdir()] == ["old.txt"]


def test_a_finished_block_replaces_the_folder_and_removes_the_old_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as temporary:
        (temporary / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # the old folder is whole until the block ends
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in target.iterdir()] == ["new.txt"]


def test_atomic_path_follows_the_umask_without_changing_it(tmp_path):
    import os

    from dlfer.files import atomic_path

    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "out.txt") as temporary:
            temporary.write_text("x")
        assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o640
        assert os.umask(0o027) == 0o027  # reading it left it as it was
    finally:
        os.umask(previous)
