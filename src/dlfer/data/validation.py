"""Checks on the canonical FER2013 table before anything trains on it.

Findings come in two kinds, treated differently:

- critical: the table is not what later stages assume. Missing columns, wrong dtypes, nulls,
  labels outside the 7 classes, images that are not 48x48 greyscale and, when params ask for
  it, per-usage x class counts that differ from the official release. A great-expectations
  suite finds all but the counts; any of them stops the pipeline.
- audit: the table is usable, but FER2013 carries known defects worth removing from training:
  blank images, exact and near duplicates, duplicates that cross the official usages (test
  images leaking into training) and duplicates whose labels disagree. They are counted and
  handed on per image in audit.parquet; preprocess decides what to drop.

The suite sees the pixels through two derived columns, their byte length and whether sha256
is their digest; the 80 MB of bytes themselves stay out of the frame GX hashes and copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from dlfer.fer2013 import CANONICAL_COLUMNS, EMOTIONS, IMAGE_SIDE, OFFICIAL_COUNTS, USAGES
from dlfer.params import ValidateParams

PIXEL_LENGTH = IMAGE_SIDE * IMAGE_SIDE
TEXT_COLUMNS = ("image_id", "usage", "emotion", "sha256", "source")
INTEGER_COLUMNS = ("label", "height", "width", "channels")
INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
FAILURE_KINDS = ("schema", "integrity", "label", "shape")
# The column that names a failing row in the suite's messages (the first present), and how many are named.
NAMING_COLUMNS = ("source", "image_id")
EXAMPLES = 5
TRAINING_BIT = 1 << USAGES.index("Training")
EVALUATION_BITS = (1 << USAGES.index("PublicTest")) | (1 << USAGES.index("PrivateTest"))
# phash as imagehash.phash computes it: 32x32 Lanczos thumbnail, 2-D DCT-II, top-left 8x8.
IMAGE_CHUNK = 4096
# The columns expectation_frame derives, and the table columns each one is made of.
DERIVED_FROM = {"pixel_length": {"pixels"}, "sha256_matches_pixels": {"pixels", "sha256"},
                "label_emotion": {"label", "emotion"}}


class RawTableError(ValueError):
    """The raw table cannot be read; the message names the file and the fix."""


def read_raw_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RawTableError(f"{path}: not found; run the fetch stage first (dvc repro fetch) or pass --raw")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RawTableError(f"{path}: not a readable parquet table ({first_line}); rerun the fetch stage") from None


def table_source(path: str | Path) -> str:
    """The FER2013 copy fetch read the table from (parquet metadata), or the table's own path when unrecorded."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return metadata.get(b"dlfer.source", b"").decode() or str(path)


# ---- the great-expectations suite (critical findings) ----

def expectation_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the suite sees it: pixel bytes replaced by their length and a sha256 check.

    Derived columns (pixel_length, sha256_matches_pixels, label_emotion) exist only when the
    columns they come from do, so a missing column is reported once, as missing.
    """
    frame = table.drop(columns=["pixels"], errors="ignore").copy()
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.StringDtype):
            # pandas 3 reads text as the `str` dtype, which GX 1.24's type check cannot name;
            # as object, GX checks the Python type of every value instead, which is stricter.
            frame[column] = frame[column].astype(object)
    if {"label", "emotion"} <= set(table.columns):
        # GX's column-pair expectation walks rows with iterrows (9 s here); a joined key is one isin.
        frame["label_emotion"] = (table["label"].astype(str) + ":" + table["emotion"].astype(str)).astype(object)
    if "pixels" in table.columns:
        pixels = table["pixels"].tolist()
        # NaN where a value is not bytes, so the not-null expectation catches nulls and wrong types alike.
        frame["pixel_length"] = np.array([len(value) if isinstance(value, bytes) else np.nan for value in pixels])
        if "sha256" in table.columns:
            frame["sha256_matches_pixels"] = pd.Series(
                [hashlib.sha256(value).hexdigest() == digest if isinstance(value, bytes) else None
                 for value, digest in zip(pixels, table["sha256"].tolist())], dtype=object, index=frame.index)
    return frame


def expectations() -> list:
    """The GX expectations over `expectation_frame`; each one's meta names its failure kind."""
    import great_expectations as gx

    expect = gx.expectations
    chosen = []

    def add(kind: str, expectation_class, description: str, **kwargs) -> None:
        chosen.append(expectation_class(**kwargs, description=description, meta={"kind": kind}))

    for column in CANONICAL_COLUMNS:
        # The suite never sees `pixels` itself; `pixel_length` exists exactly when it does.
        checked = "pixel_length" if column == "pixels" else column
        add("schema", expect.ExpectColumnToExist, f"column {column} exists", column=checked)
        add("schema", expect.ExpectColumnValuesToNotBeNull,
            f"{column} is never null" + (" and always bytes" if column == "pixels" else ""), column=checked)
    for column in TEXT_COLUMNS:
        add("schema", expect.ExpectColumnValuesToBeInTypeList, f"{column} holds strings",
            column=column, type_list=["str"])
    for column in INTEGER_COLUMNS:
        add("schema", expect.ExpectColumnValuesToBeInTypeList, f"{column} has an integer dtype",
            column=column, type_list=INTEGER_DTYPES)
    add("schema", expect.ExpectColumnValuesToBeInSet, f"usage is one of {', '.join(USAGES)}",
        column="usage", value_set=list(USAGES))

    add("integrity", expect.ExpectColumnValuesToBeUnique, "image_id is unique", column="image_id")
    add("integrity", expect.ExpectColumnValuesToMatchRegex, "sha256 is 64 lower-case hex digits",
        column="sha256", regex=r"^[0-9a-f]{64}$")
    add("integrity", expect.ExpectColumnValuesToBeInSet, "sha256 is the digest of the pixel bytes",
        column="sha256_matches_pixels", value_set=[True])

    add("label", expect.ExpectColumnValuesToBeInSet, "label is one of the 7 classes 0..6",
        column="label", value_set=list(range(len(EMOTIONS))))
    add("label", expect.ExpectColumnValuesToBeInSet, f"emotion is one of {', '.join(EMOTIONS)}",
        column="emotion", value_set=list(EMOTIONS))
    add("label", expect.ExpectColumnValuesToBeInSet, "emotion is the name of label (Kaggle order)",
        column="label_emotion", value_set=[f"{label}:{emotion}" for label, emotion in enumerate(EMOTIONS)])

    add("shape", expect.ExpectColumnValuesToBeInSet, f"height is {IMAGE_SIDE}", column="height", value_set=[IMAGE_SIDE])
    add("shape", expect.ExpectColumnValuesToBeInSet, f"width is {IMAGE_SIDE}", column="width", value_set=[IMAGE_SIDE])
    add("shape", expect.ExpectColumnValuesToBeInSet, "channels is 1 (greyscale)", column="channels", value_set=[1])
    add("shape", expect.ExpectColumnValuesToBeInSet, f"pixels hold {IMAGE_SIDE}*{IMAGE_SIDE}*1 = {PIXEL_LENGTH} bytes",
        column="pixel_length", value_set=[PIXEL_LENGTH])
    return chosen


def run_expectation_suite(frame: pd.DataFrame) -> tuple[dict, dict]:
    """Validate `frame` with an ephemeral GX context; returns (validation result, suite) as JSON dicts."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In-memory stores and no progress bars: the stage's outputs are its reports, not a GX project.
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
                               progress_bars=ProgressBarsConfig(globally=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    batch_definition = (context.data_sources.add_pandas(name="fer2013")
                        .add_dataframe_asset(name="raw_table")
                        .add_batch_definition_whole_dataframe("whole_table"))
    suite = context.suites.add(gx.ExpectationSuite(name="fer2013_raw", expectations=expectations()))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate_raw_table", data=batch_definition, suite=suite))
    # Each failing row is named by the file it came from (`source`: the member path in the zip or folder,
    # or "row <n>" of the CSV; image_id without it): GX then lists the first failures with that column.
    named_by = [column for column in NAMING_COLUMNS if column in frame.columns][:1]
    result_format = {"result_format": "SUMMARY", "unexpected_index_column_names": named_by} if named_by else "SUMMARY"
    result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
    return result.to_json_dict(), suite.to_json_dict()


def expectation_failures(validation_result: dict, frame_columns) -> list[tuple[str, str]]:
    """(kind, one-line message) per failed expectation, schema first.

    A missing column is reported once, as missing, and a column of the wrong type as wrongly
    typed (and null, if so): the other expectations on it fail too, but only repeat the news.
    """
    present = set(frame_columns)
    failed = [result for result in validation_result["results"] if not result["success"]]
    wrongly_typed = {result["expectation_config"]["kwargs"]["column"] for result in failed
                     if result["expectation_config"]["type"] == "expect_column_values_to_be_in_type_list"}
    failures = []
    for result in failed:
        config = result["expectation_config"]
        kwargs = config["kwargs"]
        columns = {kwargs[key] for key in ("column", "column_A", "column_B") if key in kwargs}
        sources = columns.union(*(DERIVED_FROM.get(column, set()) for column in columns))
        if config["type"] != "expect_column_to_exist":
            if not columns <= present:
                continue
            if sources & wrongly_typed and config["type"] not in ("expect_column_values_to_be_in_type_list",
                                                                  "expect_column_values_to_not_be_null"):
                continue
        failures.append((config.get("meta", {}).get("kind", "schema"), _failure_message(config, result)))
    order = {kind: index for index, kind in enumerate(FAILURE_KINDS)}
    return sorted(failures, key=lambda failure: order.get(failure[0], len(order)))


def _failure_message(config: dict, result: dict) -> str:
    statement = config.get("description") or f"{config['type']}({config['kwargs'].get('column', '')})"
    outcome = result.get("result") or {}
    if config["type"] == "expect_column_to_exist":
        return f"{statement}: the column is missing"
    if "unexpected_count" in outcome:
        examples = ", ".join(_failed_examples(config["kwargs"].get("column"), outcome))
        return f"{statement}: {outcome['unexpected_count']} of {outcome['element_count']} row(s) fail, e.g. {examples}"
    if "observed_value" in outcome:
        return f"{statement}: observed dtype {outcome['observed_value']}"
    messages = [info.get("exception_message") for info in _exception_infos(result.get("exception_info"))]
    return f"{statement}: " + ("; ".join(message for message in messages if message) or "failed")


def _failed_examples(column: str | None, outcome: dict) -> list[str]:
    """The first failing values, each with the file it came from: `64 (train/happy/Training_1.jpg)`."""
    named = outcome.get("partial_unexpected_index_list") or []
    names = outcome.get("unexpected_index_column_names") or []
    if not named or not names or column not in named[0]:
        return [repr(_plain(value)) for value in (outcome.get("partial_unexpected_list") or [])[:EXAMPLES]]
    examples = []
    for row in named[:EXAMPLES]:
        value = repr(_plain(row[column]))
        examples.append(value if column == names[0] else f"{value} ({row.get(names[0])})")
    return examples


def _plain(value):
    # GX hands back NumPy scalars in the index lists; np.float64(64.0) should read 64.0, and 64.0 read 64.
    value = value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _exception_infos(exception_info) -> list[dict]:
    # GX gives one info dict, or a dict of them keyed by metric, depending on where it failed.
    if not exception_info:
        return []
    if "raised_exception" in exception_info:
        return [exception_info]
    return [info for info in exception_info.values() if isinstance(info, dict)]


# ---- counts against the official release ----

def count_table(usages: pd.Series, labels: pd.Series) -> pd.DataFrame:
    """Images per class (rows, Kaggle order) and usage (columns); labels outside the classes are not counted."""
    known = labels.isin(range(len(EMOTIONS))) & usages.isin(USAGES)
    emotions = pd.Categorical([EMOTIONS[label] for label in labels[known]], categories=EMOTIONS)
    found_usages = pd.Categorical(usages[known], categories=USAGES)
    counts = pd.crosstab(emotions, found_usages, dropna=False)
    return counts.reindex(index=list(EMOTIONS), columns=list(USAGES), fill_value=0)


def official_count_table() -> pd.DataFrame:
    return pd.DataFrame(OFFICIAL_COUNTS).reindex(index=list(EMOTIONS), columns=list(USAGES))


def count_mismatches(counts: pd.DataFrame) -> list[str]:
    """One line per (usage, class) cell that differs from the official FER2013 release."""
    official = official_count_table()
    return [f"count {usage}/{emotion}: {counts.loc[emotion, usage]} images, official {official.loc[emotion, usage]}"
            for usage in USAGES for emotion in EMOTIONS if counts.loc[emotion, usage] != official.loc[emotion, usage]]


# ---- the audit (non-critical findings), pure functions on arrays ----

def pixel_std(images: np.ndarray) -> np.ndarray:
    """Per-image standard deviation of the pixel values (0-255 scale), as float32."""
    flat = images.reshape(len(images), -1)
    # In chunks: a float copy of all 35,887 images at once would take 330 MB.
    return np.concatenate([flat[start:start + IMAGE_CHUNK].std(axis=1, dtype=np.float64).astype(np.float32)
                           for start in range(0, len(flat), IMAGE_CHUNK)] or [np.zeros(0, np.float32)])


def laplacian_variance(images: np.ndarray) -> np.ndarray:
    """Per-image variance of the 4-neighbour Laplacian: a standard sharpness score (blur drives it to ~0)."""
    scores = []
    for start in range(0, len(images), IMAGE_CHUNK):
        chunk = images[start:start + IMAGE_CHUNK].astype(np.float32)
        laplacian = (chunk[:, :-2, 1:-1] + chunk[:, 2:, 1:-1] + chunk[:, 1:-1, :-2] + chunk[:, 1:-1, 2:]
                     - 4 * chunk[:, 1:-1, 1:-1])
        scores.append(laplacian.reshape(len(chunk), -1).var(axis=1))
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def sharpness_by_usage(images: np.ndarray, usages: list[str]) -> dict[str, float]:
    """Median sharpness (variance of the Laplacian) per usage, and the largest ratio between usages.

    `sharpness_max_ratio` compares each usage with the pooled images of the others, taking the
    ratio the larger way round, so a blurred Training split and a blurred test split both show.
    The copies of FER2013 that circulate as 48x48 image folders have every Training face
    Gaussian-blurred (ratio ~340); the sharp copies give ~1.0.
    """
    scores, usages = laplacian_variance(images), np.asarray(usages)
    present = [usage for usage in USAGES if (usages == usage).any()]
    metrics = {f"sharpness_median_{usage.lower()}": float(np.median(scores[usages == usage])) for usage in present}
    if len(present) > 1:
        ratios = []
        for usage in present:
            own, others = np.median(scores[usages == usage]), np.median(scores[usages != usage])
            ratios.append(max(own, others) / max(min(own, others), 1e-6))
        metrics["sharpness_max_ratio"] = float(max(ratios))
    return metrics


def sharpness_failure(metrics: dict, max_ratio: float, source: str) -> str | None:
    """One line naming the source, each usage's median sharpness and the fix, when a usage stands out; else None."""
    ratio = metrics.get("sharpness_max_ratio")
    if ratio is None or ratio <= max_ratio:
        return None
    medians = {usage: metrics[f"sharpness_median_{usage.lower()}"] for usage in USAGES
               if f"sharpness_median_{usage.lower()}" in metrics}
    figures = ", ".join(f"{usage} {value:.1f}" for usage, value in medians.items())

    def others(usage: str) -> float:
        return float(np.median([value for name, value in medians.items() if name != usage]))

    odd = max(medians, key=lambda usage: abs(np.log(max(medians[usage], 1e-6) / max(others(usage), 1e-6))))
    direction = "less" if medians[odd] < others(odd) else "more"
    return (f"{source}: the {odd} faces are {ratio:.0f}x {direction} sharp than the other usages' (median variance "
            f"of the Laplacian: {figures}; allowed factor validate.max_sharpness_ratio = {max_ratio:g}); this copy's "
            "faces were blurred or altered (the 48x48 image-folder copies that circulate publicly have every "
            "Training face blurred): use a sharp copy, e.g. Kaggle's original fer2013.csv, via fetch.source")


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """imagehash.phash of each (N, H, W) uint8 image, as a uint64 (first DCT bit most significant).

    The library itself, one image at a time: a vectorised copy of it (one Lanczos resize of a mosaic
    of all images, the DCT as a matrix product) was 2.6x faster, measured on 3,000 FER2013 faces,
    which is about 8 of validate's seconds on the full set: not worth 40 lines that must track
    imagehash's.
    """
    import imagehash
    from PIL import Image

    return np.array([int(str(imagehash.phash(Image.fromarray(image))), 16) for image in images], dtype=np.uint64)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int, chunk_size: int = 256):
    """All pairs i < j whose 64-bit hashes differ in at most `max_distance` bits: (first, second, distance).

    Each block of rows is compared with every hash from the block's start on (the upper
    triangle) by XOR and popcount: 35,887 hashes make 644 million pairs, a few seconds in
    numpy. The buffers are allocated once because fresh 10-70 MB temporaries per block cost
    more than the arithmetic; small blocks are faster for the same reason.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    count = len(hashes)
    size = min(chunk_size, count) * count
    xor, bit_counts, close = np.empty(size, np.uint64), np.empty(size, np.uint8), np.empty(size, bool)
    firsts, seconds, distances = [], [], []
    for start in range(0, count, chunk_size):
        rows, columns = min(chunk_size, count - start), count - start
        block = bit_counts[:rows * columns].reshape(rows, columns)
        differences = xor[:rows * columns].reshape(rows, columns)
        np.bitwise_xor(hashes[start:start + rows, None], hashes[None, start:], out=differences)
        np.bitwise_count(differences, out=block)
        row, column = np.nonzero(np.less_equal(block, max_distance, out=close[:rows * columns].reshape(rows, columns)))
        after = column > row  # both count from `start`: keep j > i only
        firsts.append(row[after] + start)
        seconds.append(column[after] + start)
        distances.append(block[row[after], column[after]])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64), np.concatenate(distances)


def number_groups(keys: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Group ids 0, 1, ... by first appearance for rows in `members`, one id per key; -1 elsewhere."""
    ids = np.full(len(keys), -1, dtype=np.int64)
    if members.any():
        _, first_rows, inverse = np.unique(keys[members], return_index=True, return_inverse=True)
        rank_by_first_row = np.argsort(np.argsort(first_rows))
        ids[members] = rank_by_first_row[inverse.ravel()]
    return ids


def connected_components(node_count: int, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component label per node of the undirected graph with edges (first, second), and whether a node has an edge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(node_count, node_count))
    _, labels = scipy_components(graph, directed=False)
    has_edge = np.zeros(node_count, dtype=bool)
    has_edge[first] = True
    has_edge[second] = True
    return labels, has_edge


@dataclasses.dataclass
class ImageAudit:
    frame: pd.DataFrame       # one row per image, in input order (no image_id: the caller adds it)
    near_pairs: pd.DataFrame  # first, second (image rows, one per distinct content), distance
    counts: dict


@dataclasses.dataclass(frozen=True)
class _Contents:
    """Distinct pixel contents: a code per image (numbered by first appearance) and, per content,
    its number of copies, the first image holding it, and bitmasks of the usages and labels of its copies."""
    of_image: np.ndarray
    copies: np.ndarray
    first_image: np.ndarray
    usages: np.ndarray
    labels: np.ndarray


def _distinct_contents(images: np.ndarray, usage_bit: np.ndarray, label_bit: np.ndarray) -> _Contents:
    count = len(images)
    content, _ = pd.factorize(pd.Series([row.tobytes() for row in images.reshape(count, -1)], dtype=object))
    content_count = int(content.max()) + 1 if count else 0
    usages = np.zeros(content_count, np.int64)
    labels = np.zeros(content_count, np.int64)
    np.bitwise_or.at(usages, content, usage_bit)
    np.bitwise_or.at(labels, content, label_bit)
    first_image = np.full(content_count, count, np.int64)
    np.minimum.at(first_image, content, np.arange(count))
    return _Contents(content, np.bincount(content, minlength=content_count), first_image, usages, labels)


@dataclasses.dataclass(frozen=True)
class _NearDuplicates:
    """Pairs of distinct contents with close perceptual hashes, and per content the usages and labels of
    its partners (bitmasks) and its near group (-1: none)."""
    first: np.ndarray
    second: np.ndarray
    distance: np.ndarray
    partner_usages: np.ndarray
    partner_labels: np.ndarray
    group_of_content: np.ndarray
    has_partner: np.ndarray


def _near_duplicates(contents: _Contents, hashes: np.ndarray, blank: np.ndarray, max_distance: int) -> _NearDuplicates:
    """Blank contents are left out: every near-constant image hashes alike."""
    content_count = len(contents.copies)
    candidates = np.flatnonzero(~blank[contents.first_image])
    first, second, distance = near_duplicate_pairs(hashes[contents.first_image[candidates]], max_distance)
    first, second = candidates[first], candidates[second]
    partner_usages = np.zeros(content_count, np.int64)
    partner_labels = np.zeros(content_count, np.int64)
    for one, other in ((first, second), (second, first)):
        np.bitwise_or.at(partner_usages, one, contents.usages[other])
        np.bitwise_or.at(partner_labels, one, contents.labels[other])
    component, has_partner = connected_components(content_count, first, second)
    return _NearDuplicates(first, second, distance, partner_usages, partner_labels, component, has_partner)


def audit_images(images: np.ndarray, usages, labels, blank_max_std: float,
                 near_duplicate_max_distance: int) -> ImageAudit:
    """Blank images, exact and near duplicates, and which of them cross usages or disagree on labels.

    images: (N, H, W) uint8; usages: N names from USAGES; labels: N class indices.
    Exact duplicates are images with identical pixel bytes (hence identical sha256). Near
    duplicates are pairs of distinct contents whose perceptual hashes differ in at most
    `near_duplicate_max_distance` bits; blank images are left out there, since every
    near-constant image hashes alike. Copies of one content share its near group.
    """
    usage_index = np.array([USAGES.index(usage) for usage in usages], dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    usage_bit, label_bit = np.left_shift(1, usage_index), np.left_shift(1, labels)
    std = pixel_std(images)
    blank = std < blank_max_std
    hashes = perceptual_hashes(images)
    contents = _distinct_contents(images, usage_bit, label_bit)
    near = _near_duplicates(contents, hashes, blank, near_duplicate_max_distance)

    content = contents.of_image
    exact_group = number_groups(content, contents.copies[content] > 1)
    near_group = number_groups(near.group_of_content[content], near.has_partner[content])
    # Per image: whether its copies (exact) or its near partners sit in another usage, in Training, or
    # carry another label; the bitmasks of its content against its own usage's and label's bit.
    copies_usages, partners_usages = contents.usages[content], near.partner_usages[content]
    is_training = usage_index == USAGES.index("Training")
    frame = pd.DataFrame({
        "blank": blank,
        "pixel_std": std,
        "phash": [f"{value:016x}" for value in hashes.tolist()],
        "exact_group": exact_group,
        "near_group": near_group,
        "cross_usage_exact": (copies_usages & ~usage_bit) != 0,
        "cross_usage_near": (partners_usages & ~usage_bit) != 0,
        "duplicate_of_eval": is_training & ((copies_usages & EVALUATION_BITS) != 0),
        "label_conflict": (contents.labels[content] & ~label_bit) != 0,
        "label_conflict_near": (near.partner_labels[content] & ~label_bit) != 0,
    })
    frame.insert(7, "cross_usage_duplicate", frame["cross_usage_exact"] | frame["cross_usage_near"])
    near_pairs = pd.DataFrame({"first": contents.first_image[near.first], "second": contents.first_image[near.second],
                               "distance": near.distance.astype(np.int64)})
    counts = _audit_counts(frame, contents, near_pairs, usage_index,
                           training_exact=(copies_usages & TRAINING_BIT) != 0,
                           training_near=(partners_usages & TRAINING_BIT) != 0)
    return ImageAudit(frame=frame, near_pairs=near_pairs, counts=counts)


def _audit_counts(frame: pd.DataFrame, contents: _Contents, near_pairs: pd.DataFrame, usage_index: np.ndarray,
                  training_exact: np.ndarray, training_near: np.ndarray) -> dict:
    copies = contents.copies
    duplicated = copies > 1
    counts = {
        "blank_images": int(frame["blank"].sum()),
        "exact_duplicate_groups": int(duplicated.sum()),
        "exact_duplicate_images": int((frame["exact_group"] >= 0).sum()),
        # Images one could drop and keep every content once.
        "exact_duplicate_surplus": int((copies[duplicated] - 1).sum()),
        "near_duplicate_pairs": len(near_pairs),
        "near_duplicate_groups": int(frame["near_group"].max() + 1) if len(frame) else 0,
        "near_duplicate_images": int((frame["near_group"] >= 0).sum()),
        "cross_usage_exact_groups": int((duplicated & (np.bitwise_count(contents.usages) > 1)).sum()),
        "cross_usage_exact_images": int(frame["cross_usage_exact"].sum()),
        "cross_usage_near_images": int(frame["cross_usage_near"].sum()),
        "cross_usage_duplicate_images": int(frame["cross_usage_duplicate"].sum()),
        "training_duplicates_of_eval": int(frame["duplicate_of_eval"].sum()),
        "label_conflict_groups": int((duplicated & (np.bitwise_count(contents.labels) > 1)).sum()),
        "label_conflict_images": int(frame["label_conflict"].sum()),
        "label_conflict_near_images": int(frame["label_conflict_near"].sum()),
    }
    for usage in ("PublicTest", "PrivateTest"):
        in_usage = usage_index == USAGES.index(usage)
        name = usage.lower()
        counts[f"{name}_with_training_exact_duplicate"] = int((in_usage & training_exact).sum())
        counts[f"{name}_with_training_near_duplicate"] = int((in_usage & training_near).sum())
        counts[f"{name}_with_training_duplicate"] = int((in_usage & (training_exact | training_near)).sum())
    return counts


# ---- the whole check ----

@dataclasses.dataclass
class ValidationOutcome:
    validation_result: dict            # GX validation result as JSON
    suite: dict                        # GX expectation suite as JSON
    critical_failures: list[str]
    metrics: dict
    counts: pd.DataFrame | None = None  # usage x class counts found, when the schema allows counting
    audit: pd.DataFrame | None = None   # audit.parquet's rows, when the table passed the suite
    near_pairs: pd.DataFrame | None = None

    @property
    def passed(self) -> bool:
        return not self.critical_failures


def validate_table(table: pd.DataFrame, params: ValidateParams, source: str = "the FER2013 table") -> ValidationOutcome:
    """Run the suite, the count check, the audit and the sharpness check; never raises on bad data, it reports it.

    `source` names the data copy in the messages (the file fetch read).
    """
    frame = expectation_frame(table)
    validation_result, suite = run_expectation_suite(frame)
    failures = expectation_failures(validation_result, frame.columns)
    statistics = validation_result["statistics"]
    metrics = {
        "rows": len(table),
        "gx_expectations": int(statistics["evaluated_expectations"]),
        "gx_failed_expectations": int(statistics["unsuccessful_expectations"]),
    }
    for kind in FAILURE_KINDS:
        metrics[f"{kind}_failures"] = sum(1 for failure_kind, _ in failures if failure_kind == kind)
    critical = [f"{kind}: {message}" for kind, message in failures]

    outcome = ValidationOutcome(validation_result=validation_result, suite=suite, critical_failures=critical,
                                metrics=metrics)
    schema_ok = metrics["schema_failures"] == 0
    if schema_ok:
        labels = table["label"]
        metrics["rows_label_outside_classes"] = int((~labels.isin(range(len(EMOTIONS)))).sum())
        metrics["rows_wrong_shape"] = int(((table["height"] != IMAGE_SIDE) | (table["width"] != IMAGE_SIDE)
                                           | (table["channels"] != 1) | (frame["pixel_length"] != PIXEL_LENGTH)).sum())
        outcome.counts = count_table(table["usage"], labels)
        mismatches = count_mismatches(outcome.counts)
        metrics["count_mismatches"] = len(mismatches)
        if params.require_official_counts:
            critical.extend(f"counts: {line}" for line in mismatches)
    metrics["audited"] = not failures
    if not failures:
        images = np.frombuffer(b"".join(table["pixels"].tolist()), dtype=np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        audit = audit_images(images, table["usage"].tolist(), table["label"].to_numpy(),
                             params.blank_max_std, params.near_duplicate_max_distance)
        audit.frame.insert(0, "image_id", table["image_id"].astype(str).to_numpy())
        outcome.audit, outcome.near_pairs = audit.frame, audit.near_pairs
        metrics.update(audit.counts)
        metrics.update(sharpness_by_usage(images, table["usage"].tolist()))
        shifted = sharpness_failure(metrics, params.max_sharpness_ratio, source)
        if shifted:
            critical.insert(0, f"sharpness: {shifted}")
    metrics["critical_failures"] = len(critical)
    metrics["passed"] = not critical
    return outcome


# ---- reports ----

def write_reports(outcome: ValidationOutcome, table: pd.DataFrame, directory: Path, raw_path: str | Path) -> None:
    """Fill `directory` with the GX result and suite (JSON), report.md and examples.png."""
    directory = Path(directory)
    gx_files = {"gx_validation_result.json": outcome.validation_result, "gx_expectation_suite.json": outcome.suite}
    for name, content in gx_files.items():
        (directory / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    if outcome.audit is not None:
        _plot_examples(outcome, table, directory / "examples.png")
    (directory / "report.md").write_text(_report_markdown(outcome, raw_path))


def _report_markdown(outcome: ValidationOutcome, raw_path) -> str:
    metrics = outcome.metrics
    lines = [f"# FER2013 validation: {'passed' if outcome.passed else 'FAILED'}", "",
             f"Input: `{raw_path}`, {metrics['rows']} rows. Great-expectations suite: "
             f"{metrics['gx_expectations'] - metrics['gx_failed_expectations']} of {metrics['gx_expectations']} "
             "expectations met (details in gx_validation_result.json).", "",
             f"## Critical failures ({len(outcome.critical_failures)})", ""]
    lines += [f"- {failure}" for failure in outcome.critical_failures] or ["None."]
    lines += ["", "## Images per class and usage (found / official)", ""]
    if outcome.counts is None:
        lines.append("Not counted: the table's schema is broken (see the critical failures).")
    else:
        official = official_count_table()
        lines += ["| class | " + " | ".join(USAGES) + " | total |", "|---" * (len(USAGES) + 2) + "|"]
        for emotion in EMOTIONS:
            cells = [_count_cell(outcome.counts.loc[emotion, usage], official.loc[emotion, usage]) for usage in USAGES]
            lines.append(f"| {emotion} | " + " | ".join(cells) + " | "
                         + _count_cell(outcome.counts.loc[emotion].sum(), official.loc[emotion].sum()) + " |")
        totals = [_count_cell(outcome.counts[usage].sum(), official[usage].sum()) for usage in USAGES]
        lines.append("| **total** | " + " | ".join(totals) + " | "
                     + _count_cell(outcome.counts.values.sum(), official.values.sum()) + " |")
        lines += ["", "Cells in bold differ from the official release."]
    lines += ["", "## Audit (non-critical, handed on in audit.parquet)", ""]
    if outcome.audit is None:
        lines.append("Not run: fix the critical failures first. audit.parquet was not written.")
    else:
        if not outcome.passed:
            lines += ["audit.parquet was not written because of the critical failures; the counts below "
                      "are for information.", ""]
        lines += ["| finding | count |", "|---|---|"]
        lines += [f"| {key} | {metrics[key]} |" for key in _AUDIT_KEYS_IN_REPORT]
        lines += ["", "Exact duplicates have identical pixel bytes; near duplicates are distinct images whose "
                  "perceptual hashes differ in few bits (blank images left out). `duplicate_of_eval` marks "
                  "Training images with an exact copy in PublicTest or PrivateTest; `label_conflict` marks "
                  "exact copies that carry different labels.", "", "![examples](examples.png)"]
        lines += _sharpness_section(metrics)
    return "\n".join(lines) + "\n"


def _sharpness_section(metrics: dict) -> list[str]:
    if "sharpness_max_ratio" not in metrics:
        return []
    lines = ["", "## Sharpness by usage (variance of the Laplacian, median)", "",
             "| usage | median sharpness |", "|---|---|"]
    lines += [f"| {usage} | {metrics[f'sharpness_median_{usage.lower()}']:.1f} |" for usage in USAGES
              if f"sharpness_median_{usage.lower()}" in metrics]
    lines += ["", f"Largest ratio between one usage and the others: {metrics['sharpness_max_ratio']:.2f} "
              "(above validate.max_sharpness_ratio the copy fails validation: a model trained on faces blurred "
              "unlike its test faces measures the blur, not the emotions)."]
    return lines


_AUDIT_KEYS_IN_REPORT = (
    "blank_images", "exact_duplicate_groups", "exact_duplicate_images", "exact_duplicate_surplus",
    "near_duplicate_pairs", "near_duplicate_groups", "near_duplicate_images",
    "cross_usage_exact_groups", "cross_usage_exact_images", "cross_usage_near_images",
    "publictest_with_training_exact_duplicate", "publictest_with_training_duplicate",
    "privatetest_with_training_exact_duplicate", "privatetest_with_training_duplicate",
    "training_duplicates_of_eval", "label_conflict_groups", "label_conflict_images", "label_conflict_near_images",
)


def _count_cell(found, official) -> str:
    return f"{found} / {official}" if found == official else f"**{found} / {official}**"


def _example_pairs(audit: pd.DataFrame, near_pairs: pd.DataFrame, differ: np.ndarray, flag: str, limit: int) -> list:
    """Up to `limit` (row, row, note) pairs whose `differ` values disagree: half exact copies, half near duplicates."""
    exact = []
    groups = audit["exact_group"].to_numpy()
    flagged = np.flatnonzero(audit[flag].to_numpy() & (groups >= 0))
    for group in pd.unique(groups[flagged]):
        rows = flagged[groups[flagged] == group]
        other = rows[differ[rows] != differ[rows[0]]]
        if len(other):
            exact.append((rows[0], other[0], "exact"))
        if len(exact) >= limit:
            break
    near_rows = near_pairs[differ[near_pairs["first"].to_numpy()] != differ[near_pairs["second"].to_numpy()]]
    near = [(first, second, f"distance {distance}") for first, second, distance
            in near_rows[["first", "second", "distance"]].head(limit).itertuples(index=False)]
    take_exact = max(limit // 2, limit - len(near))
    return (exact[:take_exact] + near)[:limit]


def _plot_examples(outcome: ValidationOutcome, table: pd.DataFrame, path: Path, per_row: int = 8) -> None:
    # The Figure API draws with Agg without touching pyplot's global state.
    from matplotlib.figure import Figure

    audit, near_pairs = outcome.audit, outcome.near_pairs
    usages = table["usage"].astype(str).to_numpy()
    labels = table["label"].to_numpy()
    blank_rows = [(row, None, "") for row in np.flatnonzero(audit["blank"].to_numpy())[:per_row]]
    pairs = per_row // 2
    sections = [
        ("Blank or near-constant images", blank_rows),
        ("Duplicates across usages", _example_pairs(audit, near_pairs, usages, "cross_usage_duplicate", pairs)),
        ("Duplicates with conflicting labels", _example_pairs(audit, near_pairs, labels, "label_conflict", pairs)),
    ]
    figure = Figure(figsize=(per_row * 1.3, 3 * 1.9))
    for subfigure, (title, items) in zip(figure.subfigures(len(sections), 1), sections):
        subfigure.suptitle(title, fontsize=9)
        axes = subfigure.subplots(1, per_row)
        shown = [(row, note) for first, second, note in items for row in (first, second) if row is not None]
        for axis in axes:
            axis.axis("off")
        if not shown:
            axes[0].text(0, 0.5, "none found", fontsize=8, transform=axes[0].transAxes)
        for axis, (row, note) in zip(axes, shown):
            image = np.frombuffer(table["pixels"].iat[row], dtype=np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)
            axis.imshow(image, cmap="gray", vmin=0, vmax=255)
            axis.set_title(f"{table['image_id'].iat[row]}\n{EMOTIONS[labels[row]]} {note}".strip(), fontsize=6)
    figure.savefig(path, dpi=100)
