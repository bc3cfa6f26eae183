"""dlfer.data.validation: the audit's pure functions on tiny arrays, the GX suite on crafted tables, and real FER2013."""

from __future__ import annotations

import hashlib
import io
import zipfile

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import FER2013_ZIP, PROJECT, require
from dlfer.data import validation
from dlfer.fer2013 import EMOTIONS, LABEL_OF_EMOTION, OFFICIAL_COUNTS, USAGES
from dlfer.params import ValidateParams, load_params

LENIENT = ValidateParams(blank_max_std=2.0, near_duplicate_max_distance=2, require_official_counts=False,
                         max_sharpness_ratio=2.0)


def canonical_table(images, usages, labels, sources=None) -> pd.DataFrame:
    """The canonical raw table (CONTEXT.md) of these images, sorted and numbered as fetch does it."""
    sources = sources or [f"made_{index}" for index in range(len(images))]
    rows = []
    for image, usage, label, source in zip(images, usages, labels, sources):
        image = np.asarray(image, dtype=np.uint8)
        pixels = image.tobytes()
        rows.append({"usage": usage, "label": int(label),
                     "emotion": EMOTIONS[label] if 0 <= label < len(EMOTIONS) else "unknown",
                     "height": image.shape[0], "width": image.shape[1],
                     "channels": image.shape[2] if image.ndim == 3 else 1, "pixels": pixels,
                     "sha256": hashlib.sha256(pixels).hexdigest(), "source": source})
    rows.sort(key=lambda row: (USAGES.index(row["usage"]), row["sha256"], row["label"], row["source"]))
    ranks = dict.fromkeys(USAGES, 0)
    for row in rows:
        row["image_id"] = f"{row['usage']}_{ranks[row['usage']]:05d}"
        ranks[row["usage"]] += 1
    columns = ["image_id", "usage", "label", "emotion", "height", "width", "channels", "pixels", "sha256", "source"]
    return pd.DataFrame(rows)[columns]


def blocky_face(rng: np.random.Generator) -> np.ndarray:
    """A 48x48 image of random 8x8 blocks: structured enough for distinct perceptual hashes."""
    return np.kron(rng.integers(0, 256, (6, 6)), np.ones((8, 8))).astype(np.uint8)


def small_table(rng: np.random.Generator) -> pd.DataFrame:
    images = [blocky_face(rng) for _ in range(8)]
    usages = ["Training"] * 5 + ["PublicTest", "PrivateTest", "PrivateTest"]
    return canonical_table(images, usages, [0, 1, 2, 3, 4, 5, 6, 0])


# ---- the audit's pure functions ----

def test_pixel_std_and_blank_detection():
    near_constant = np.zeros((48, 48), np.uint8)
    near_constant[10, 10] = 10
    images = np.stack([np.zeros((48, 48), np.uint8), np.full((48, 48), 200, np.uint8), near_constant,
                       blocky_face(np.random.default_rng(0))])
    std = validation.pixel_std(images)
    assert std.dtype == np.float32
    np.testing.assert_allclose(std, images.reshape(4, -1).std(axis=1), rtol=1e-5)
    audit = validation.audit_images(images, ["Training"] * 4, [0, 1, 2, 3], blank_max_std=2.0,
                                    near_duplicate_max_distance=2)
    assert audit.frame["blank"].tolist() == [True, True, True, False]
    assert audit.counts["blank_images"] == 3


def test_perceptual_hashes_equal_imagehash_phash():
    rng = np.random.default_rng(1)
    images = np.stack([blocky_face(rng) for _ in range(6)] + [rng.integers(0, 256, (48, 48), dtype=np.uint8)
                                                              for _ in range(6)])
    ours = [f"{value:016x}" for value in validation.perceptual_hashes(images).tolist()]
    assert ours == [str(imagehash.phash(Image.fromarray(image))) for image in images]


def test_near_duplicate_pairs_match_brute_force_across_chunks():
    rng = np.random.default_rng(2)
    hashes = rng.integers(0, 2**63, 40, dtype=np.uint64)
    hashes[7] = hashes[3] ^ np.uint64(0b101)        # 2 bits apart
    hashes[30] = hashes[3] ^ np.uint64(1 << 60)     # 1 bit apart, in another chunk
    hashes[12] = hashes[11]                         # identical hashes
    first, second, distance = validation.near_duplicate_pairs(hashes, max_distance=2, chunk_size=6)
    expected = {(i, j, bin(int(hashes[i]) ^ int(hashes[j])).count("1")) for i in range(40) for j in range(i + 1, 40)
                if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 2}
    assert set(zip(first.tolist(), second.tolist(), distance.tolist())) == expected
    pairs = {(i, j) for i, j, _ in expected}
    assert {(3, 7), (3, 30), (11, 12)} <= pairs and (7, 30) not in pairs  # 7 and 30 are 3 bits apart


def test_number_groups_in_order_of_first_appearance():
    keys = np.array([5, 3, 5, 7, 3, 9])
    members = np.array([True, True, True, True, True, False])
    assert validation.number_groups(keys, members).tolist() == [0, 1, 0, 2, 1, -1]
    assert validation.number_groups(keys, np.zeros(6, bool)).tolist() == [-1] * 6


def test_audit_exact_duplicates_cross_usage_and_label_conflicts():
    rng = np.random.default_rng(3)
    a, b, c = blocky_face(rng), blocky_face(rng), blocky_face(rng)
    blank = np.zeros((48, 48), np.uint8)
    images = np.stack([a, a, b, b, c, blank, blank])
    usages = ["Training", "PublicTest", "Training", "Training", "PrivateTest", "Training", "PrivateTest"]
    labels = [3, 3, 1, 2, 0, 6, 6]
    audit = validation.audit_images(images, usages, labels, blank_max_std=2.0, near_duplicate_max_distance=2)
    frame = audit.frame
    assert frame["exact_group"].tolist() == [0, 0, 1, 1, -1, 2, 2]
    assert frame["cross_usage_exact"].tolist() == [True, True, False, False, False, True, True]
    assert frame["duplicate_of_eval"].tolist() == [True, False, False, False, False, True, False]
    assert frame["label_conflict"].tolist() == [False, False, True, True, False, False, False]
    assert frame["near_group"].tolist() == [-1] * 7
    assert frame["blank"].tolist() == [False] * 5 + [True, True]
    assert audit.counts["exact_duplicate_groups"] == 3
    assert audit.counts["exact_duplicate_images"] == 6
    assert audit.counts["exact_duplicate_surplus"] == 3
    assert audit.counts["cross_usage_exact_groups"] == 2
    assert audit.counts["publictest_with_training_exact_duplicate"] == 1
    assert audit.counts["privatetest_with_training_exact_duplicate"] == 1  # the blank one
    assert audit.counts["label_conflict_groups"] == 1
    assert audit.counts["label_conflict_images"] == 2


def test_audit_near_duplicates_leave_out_blanks_and_share_groups_with_exact_copies():
    rng = np.random.default_rng(4)
    face, other = blocky_face(rng), blocky_face(rng)
    touched = face.copy()
    touched[20:23, 20:23] = np.clip(touched[20:23, 20:23].astype(int) + 3, 0, 255)  # new bytes, same look
    almost_blank = np.zeros((48, 48), np.uint8)
    almost_blank[0, 0] = 5
    images = np.stack([face, face, touched, other, np.zeros((48, 48), np.uint8), almost_blank])
    usages = ["Training", "Training", "PrivateTest", "Training", "Training", "PublicTest"]
    labels = [3, 3, 4, 0, 6, 6]
    audit = validation.audit_images(images, usages, labels, blank_max_std=2.0, near_duplicate_max_distance=2)
    frame = audit.frame
    assert frame["near_group"].tolist() == [0, 0, 0, -1, -1, -1]
    assert frame["exact_group"].tolist() == [0, 0, -1, -1, -1, -1]
    assert frame["cross_usage_near"].tolist() == [True, True, True, False, False, False]
    assert frame["cross_usage_exact"].tolist() == [False] * 6
    assert frame["cross_usage_duplicate"].tolist() == [True, True, True, False, False, False]
    assert frame["label_conflict_near"].tolist() == [True, True, True, False, False, False]
    assert frame["label_conflict"].tolist() == [False] * 6
    # One pair of distinct contents (the exact copies count once); the blank pair is no near duplicate.
    assert audit.near_pairs[["first", "second"]].values.tolist() == [[0, 2]]
    assert audit.counts["near_duplicate_groups"] == 1
    assert audit.counts["near_duplicate_images"] == 3
    assert audit.counts["privatetest_with_training_near_duplicate"] == 1
    assert audit.counts["privatetest_with_training_duplicate"] == 1
    assert audit.counts["publictest_with_training_duplicate"] == 0


def test_count_table_and_mismatches_against_official():
    usages, labels = [], []
    for usage, per_class in OFFICIAL_COUNTS.items():
        for emotion, count in per_class.items():
            usages += [usage] * count
            labels += [LABEL_OF_EMOTION[emotion]] * count
    counts = validation.count_table(pd.Series(usages), pd.Series(labels))
    assert counts.loc["disgust", "PublicTest"] == 56
    assert validation.count_mismatches(counts) == []
    labels[0] = LABEL_OF_EMOTION["disgust"]  # one Training angry image relabelled
    lines = validation.count_mismatches(validation.count_table(pd.Series(usages), pd.Series(labels)))
    assert lines == ["count Training/angry: 3994 images, official 3995",
                     "count Training/disgust: 437 images, official 436"]


# ---- the great-expectations suite on crafted tables ----

def test_a_good_table_passes_and_is_audited():
    table = small_table(np.random.default_rng(5))
    outcome = validation.validate_table(table, LENIENT)
    assert outcome.critical_failures == []
    assert outcome.passed and outcome.metrics["passed"] and outcome.metrics["critical_failures"] == 0
    assert outcome.metrics["gx_failed_expectations"] == 0
    assert outcome.validation_result["success"] is True
    assert outcome.audit["image_id"].tolist() == table["image_id"].tolist()
    # Counts are reported but not required here; the tiny table is far from the official ones.
    assert outcome.metrics["count_mismatches"] > 0


def _retype_label(table):
    table["label"] = table["label"].astype(str)


def _relabel_nine(table):
    table.loc[2, "label"] = 9


def _shrink_one_image(table):
    image = np.zeros((47, 48), np.uint8)
    image[::2] = 200
    table.loc[1, ["height", "pixels", "sha256"]] = [47, image.tobytes(), hashlib.sha256(image.tobytes()).hexdigest()]


def _colour_one_image(table):
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    table.loc[3, ["channels", "pixels", "sha256"]] = [3, image.tobytes(), hashlib.sha256(image.tobytes()).hexdigest()]


def _null_usage(table):
    table["usage"] = table["usage"].astype(object)
    table.loc[0, "usage"] = None


def _stale_digest(table):
    table.loc[4, "sha256"] = "0" * 64


@pytest.mark.parametrize("spoil, expected", [
    (_retype_label, ["schema: label has an integer dtype"]),
    (lambda table: table.drop(columns=["emotion"], inplace=True), ["schema: column emotion exists: the column is"]),
    (lambda table: table.drop(columns=["pixels"], inplace=True), ["schema: column pixels exists: the column is"]),
    (_relabel_nine, ["label: label is one of the 7 classes", "label: emotion is the name of label"]),
    (_shrink_one_image, ["shape: height is 48", "shape: pixels hold 48*48*1 = 2304 bytes"]),
    (_colour_one_image, ["shape: channels is 1", "shape: pixels hold 48*48*1 = 2304 bytes"]),
    (_null_usage, ["schema: usage is never null"]),
    (_stale_digest, ["integrity: sha256 is the digest of the pixel bytes"]),
], ids=["label_as_text", "missing_emotion", "missing_pixels", "label_9", "image_47x48", "colour_image", "null_usage",
        "stale_sha256"])
def test_the_suite_catches_each_critical_kind(spoil, expected):
    table = small_table(np.random.default_rng(6))
    spoil(table)
    outcome = validation.validate_table(table, LENIENT)
    assert not outcome.passed and outcome.metrics["passed"] is False
    assert len(outcome.critical_failures) == len(expected) == outcome.metrics["critical_failures"]
    for failure, start in zip(outcome.critical_failures, expected):
        assert failure.startswith(start), outcome.critical_failures
    assert outcome.audit is None and outcome.metrics["audited"] is False


def test_failures_name_the_bad_values():
    table = small_table(np.random.default_rng(7))
    _relabel_nine(table)
    outcome = validation.validate_table(table, LENIENT)
    assert "1 of 8 row(s) fail, e.g. 9" in outcome.critical_failures[0]
    assert outcome.metrics["rows_label_outside_classes"] == 1
    assert outcome.counts.values.sum() == 7  # the label-9 image is not counted in any class


def test_failed_expectations_name_the_files_of_the_first_failing_rows():
    # A 64x64 colour face among the FER2013 ones, as fetch refuses it; validate must still name the file.
    rng = np.random.default_rng(9)
    images = [blocky_face(rng) for _ in range(7)] + [np.repeat(np.kron(blocky_face(rng), np.ones((2, 2)))[:64, :64, None],
                                                                3, axis=2)]
    files = [f"train/{EMOTIONS[index % 7]}/Training_{index}.jpg" for index in range(8)]
    table = canonical_table(images, ["Training"] * 5 + ["PublicTest"] * 3, [0, 1, 2, 3, 4, 5, 6, 0], files)
    failures = validation.validate_table(table, LENIENT).critical_failures
    for statement, value in (("height is 48", 64), ("width is 48", 64), ("channels is 1 (greyscale)", 3),
                             ("pixels hold 48*48*1 = 2304 bytes", 64 * 64 * 3)):
        assert f"shape: {statement}: 1 of 8 row(s) fail, e.g. {value} (train/angry/Training_7.jpg)" in failures, failures

    # Many failures: the count, and the first five named.
    table = canonical_table([blocky_face(rng) for _ in range(8)], ["Training"] * 8, [0] * 8, files)
    table["label"] = 7
    [label_failure] = [failure for failure in validation.validate_table(table, LENIENT).critical_failures
                       if failure.startswith("label: label is one of")]
    named = [file for file in files if f"7 ({file})" in label_failure]
    assert "8 of 8 row(s) fail, e.g. 7 (" in label_failure and len(named) == 5, label_failure

    # Without a source column the rows are named by image_id.
    table = canonical_table(images, ["Training"] * 5 + ["PublicTest"] * 3, [0, 1, 2, 3, 4, 5, 6, 0], files)
    failures = validation.validate_table(table.drop(columns=["source"]), LENIENT).critical_failures
    image_id = table.loc[table["height"] == 64, "image_id"].item()
    assert f"shape: height is 48: 1 of 8 row(s) fail, e.g. 64 ({image_id})" in failures, failures


def test_count_mismatch_is_critical_only_when_required():
    table = small_table(np.random.default_rng(8))
    strict = ValidateParams(blank_max_std=2.0, near_duplicate_max_distance=2, require_official_counts=True,
                            max_sharpness_ratio=2.0)
    outcome = validation.validate_table(table, strict)
    assert not outcome.passed
    assert all(failure.startswith("counts: count ") for failure in outcome.critical_failures)
    # 8 images in 7 cells against thousands per cell: all 21 cells differ.
    assert len(outcome.critical_failures) == outcome.metrics["count_mismatches"] == 21
    # The table itself is fine, so the audit still runs and the report can show it.
    assert outcome.audit is not None


def test_reports_are_written(tmp_path):
    table = small_table(np.random.default_rng(9))
    table = pd.concat([table, table.iloc[[0]].assign(image_id="Training_00099")], ignore_index=True)
    outcome = validation.validate_table(table, LENIENT)
    validation.write_reports(outcome, table, tmp_path, "raw.parquet")
    report = (tmp_path / "report.md").read_text()
    assert "# FER2013 validation: passed" in report
    assert "| exact_duplicate_images | 2 |" in report
    training_angry = int(((table["usage"] == "Training") & (table["label"] == 0)).sum())
    assert f"| angry | **{training_angry} / 3995** |" in report
    assert (tmp_path / "examples.png").read_bytes()[:4] == b"\x89PNG"
    assert '"success": true' in (tmp_path / "gx_validation_result.json").read_text()


# ---- the real FER2013 ----

@pytest.fixture(scope="session")
def real_table() -> pd.DataFrame:
    """All of fer2013.zip decoded as fetch does it: Pillow mode 'L', label from the folder, usage from the name."""
    images, usages, labels, sources = [], [], [], []
    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        for member in archive.namelist():
            if not member.endswith(".jpg"):
                continue
            _, emotion, file_name = member.split("/")
            with Image.open(io.BytesIO(archive.read(member))) as image:
                images.append(np.asarray(image.convert("L")))
            usages.append(file_name.split("_")[0])
            labels.append(LABEL_OF_EMOTION[emotion])
            sources.append(member)
    return canonical_table(images, usages, labels, sources)


@pytest.mark.fer2013
def test_real_fer2013_audit_finds_the_known_defects(real_table):
    params = load_params(PROJECT / "params.yaml").validate
    assert params.require_official_counts
    outcome = validation.validate_table(real_table, params)
    metrics = outcome.metrics
    assert outcome.critical_failures == [], outcome.critical_failures
    assert metrics["rows"] == 35887 and metrics["count_mismatches"] == 0
    assert outcome.counts.equals(validation.official_count_table())
    assert 0 < metrics["exact_duplicate_groups"] < metrics["exact_duplicate_images"]
    assert metrics["cross_usage_exact_images"] > 0 and metrics["cross_usage_near_images"] > 0
    assert metrics["label_conflict_images"] > 0
    assert metrics["blank_images"] > 0
    assert metrics["near_duplicate_pairs"] > 0
    # The shared copy is sharp in every usage (its blurred predecessor gave a ratio of ~340).
    assert 1.0 <= metrics["sharpness_max_ratio"] < 1.2
    assert len(outcome.audit) == len(real_table) and outcome.audit["image_id"].is_unique

    # The vectorised phash is imagehash.phash, bit for bit, on real faces too.
    sample = real_table.sample(200, random_state=0)
    expected = [str(imagehash.phash(Image.frombytes("L", (48, 48), pixels))) for pixels in sample["pixels"]]
    assert outcome.audit.loc[sample.index, "phash"].tolist() == expected


def test_a_usage_blurred_unlike_the_others_fails_with_the_figures_and_the_fix():
    from scipy import ndimage

    from dlfer.data.validation import sharpness_by_usage, sharpness_failure

    rng = np.random.default_rng(0)
    sharp = np.stack([blocky_face(rng) for _ in range(12)])
    blurred = np.stack([ndimage.gaussian_filter(image.astype(float), 3.0) for image in sharp]).astype(np.uint8)
    usages = ["Training"] * 6 + ["PublicTest"] * 3 + ["PrivateTest"] * 3
    for images in (np.concatenate([blurred[:6], sharp[6:]]),   # blurred Training, as the public 48x48 copies
                   np.concatenate([sharp[:9], blurred[9:]])):  # a blurred test usage is as broken
        metrics = sharpness_by_usage(images, usages)
        assert metrics["sharpness_max_ratio"] > 10
        message = sharpness_failure(metrics, 2.0, "data/external/fer2013.zip")
        assert message.startswith("data/external/fer2013.zip: ") and "\n" not in message
        for usage in ("Training", "PublicTest", "PrivateTest"):
            assert f"{usage} {metrics[f'sharpness_median_{usage.lower()}']:.1f}" in message
        assert "validate.max_sharpness_ratio = 2" in message and "fer2013.csv" in message
    same = sharpness_by_usage(np.concatenate([sharp[:6], sharp[:6]]), ["Training"] * 6 + ["PublicTest"] * 6)
    assert same["sharpness_max_ratio"] == 1.0
    assert sharpness_failure(same, 2.0, "any") is None
