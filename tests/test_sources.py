"""Tests for dlfer.data.sources: every accepted FER2013 shape and location, each bad input, the source domain."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dlfer.data import sources
from dlfer.fer2013 import EMOTIONS, LABEL_OF_EMOTION, OFFICIAL_COUNTS, OFFICIAL_TOTAL, USAGES
from dlfer.files import sha256_of_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
FER2013_ZIP = SHARED / "fer2013" / "fer2013.zip"
IMAGENETTE_ZIP = SHARED / "imagenette" / "imagenette-128.zip"


def require(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} absent: this test reads the shared dataset copy")


@pytest.fixture(scope="module")
def fer_sample() -> dict[str, bytes]:
    """Real FER2013 JPEGs: the first two members of every (split, emotion, usage) group of the shared zip."""
    require(FER2013_ZIP)
    chosen: dict[tuple[str, str, str], list[str]] = {}
    with zipfile.ZipFile(FER2013_ZIP) as archive:
        for name in archive.namelist():
            split, emotion, file_name = name.split("/")
            group = chosen.setdefault((split, emotion, file_name.split("_")[0]), [])
            if len(group) < 2:
                group.append(name)
        return {name: archive.read(name) for group in chosen.values() for name in group}


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """No test may see the developer's $DLFER_* settings or real kagglehub cache."""
    monkeypatch.delenv(sources.FER2013_ENV, raising=False)
    monkeypatch.delenv(sources.SOURCE_DOMAIN_ENV, raising=False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "empty-kagglehub-cache"))


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_folder(path: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def fer_csv_rows(members: dict[str, bytes]) -> list[tuple[str, str, str]]:
    """(emotion, pixels, Usage) rows of the Kaggle CSV for image-folder members, by decoding each JPEG; reversed."""
    rows = []
    for name, data in reversed(list(members.items())):
        _, emotion, file_name = name.split("/")
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L")).ravel()
        rows.append((str(LABEL_OF_EMOTION[emotion]), " ".join(map(str, pixels)), file_name.split("_")[0]))
    return rows


def fer_csv(members: dict[str, bytes]) -> str:
    return "".join(f"{','.join(row)}\n" for row in [("emotion", "pixels", "Usage"), *fer_csv_rows(members)])


def read(setting: str, sha256: str = "", root: Path = Path(".")) -> tuple[sources.Source, pd.DataFrame]:
    with sources.open_fer2013_source(setting, sha256, root) as source:
        return source, sources.read_fer2013(source)


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert name in message, message


# ---------------------------------------------------------------- pure functions

def test_parse_fer2013_member_takes_usage_from_prefix_and_label_from_folder():
    assert sources.parse_fer2013_member("test/fear/PrivateTest_88.jpg") == ("PrivateTest", EMOTIONS.index("fear"))
    assert sources.parse_fer2013_member("train/Neutral/Training_1.png") == ("Training", EMOTIONS.index("neutral"))


@pytest.mark.parametrize(("member", "reason"), [
    ("train/contempt/Training_1.jpg", "unknown emotion folder 'contempt'"),
    ("test/angry/Validation_1.jpg", "unknown usage prefix 'Validation'"),
    ("train/angry/notes.txt", "not an image file"),
    ("train/Training_1.jpg", "expected <split>/<emotion>"),
    ("train/angry/PublicTest_1.jpg", "belong in test/"),
])
def test_parse_fer2013_member_rejects(member, reason):
    with pytest.raises(sources.FetchError, match=reason):
        sources.parse_fer2013_member(member)


def test_decode_image_keeps_grey_as_l_and_colour_as_rgb_at_any_size():
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    assert sources.decode_image(buffer.getvalue()) == (grey.tobytes(), 5, 7, 1)
    pixels, height, width, channels = sources.decode_image(jpeg(np.full((3, 4, 3), (200, 30, 30), np.uint8)))
    assert (height, width, channels, len(pixels)) == (3, 4, 3, 36)
    with pytest.raises(sources.FetchError, match="not a decodable image"):
        sources.decode_image(b"plain text, not a JPEG")


def test_parse_csv_row_and_its_errors():
    pixel_text = " ".join(str(value % 256) for value in range(48 * 48))
    image = sources.parse_csv_row("4", pixel_text, "PublicTest", "row 1")
    assert (image.usage, image.label, image.height, image.width, image.channels) == ("PublicTest", 4, 48, 48, 1)
    assert image.pixels == bytes(value % 256 for value in range(48 * 48))
    for emotion, pixels, usage, reason in [
        ("4", "0 1 2", "PublicTest", "3 pixels, expected 48"),
        ("7", pixel_text, "PublicTest", "unknown emotion index '7'"),
        ("-1", pixel_text, "PublicTest", "unknown emotion index"),
        ("4", pixel_text, "Validation", "unknown Usage 'Validation'"),
        ("4", pixel_text.replace("255", "256", 1), "Training", "outside 0..255"),
        ("4", pixel_text.replace("7", "x", 1), "Training", "not a list of integers"),
    ]:
        with pytest.raises(sources.FetchError, match=reason):
            sources.parse_csv_row(emotion, pixels, usage, "row 1")


def test_canonical_table_orders_by_usage_hash_label_and_ignores_input_order():
    images = [sources.RawImage(usage, label, 1, 2, 1, bytes([value, label]), f"item {index}")
              for index, (usage, label, value) in enumerate([("PrivateTest", 3, 9), ("Training", 0, 1),
                                                              ("Training", 5, 2), ("PublicTest", 6, 3),
                                                              ("Training", 0, 1)])]
    table = sources.canonical_table(images)
    assert list(table.columns) == list(sources.CANONICAL_COLUMNS)
    assert list(table["usage"]) == ["Training"] * 3 + ["PublicTest", "PrivateTest"]
    assert list(table["image_id"]) == ["Training_00000", "Training_00001", "Training_00002",
                                       "PublicTest_00000", "PrivateTest_00000"]
    training = table[table["usage"] == "Training"]
    assert list(training["sha256"]) == sorted(training["sha256"])
    assert all(table["sha256"] == [hashlib.sha256(pixels).hexdigest() for pixels in table["pixels"]])
    assert list(table["emotion"]) == [EMOTIONS[label] for label in table["label"]]
    pd.testing.assert_frame_equal(sources.canonical_table(images[::-1]), table)


# ---------------------------------------------------------------- the shapes FER2013 comes in

def test_zip_folder_csv_and_gzipped_csv_give_the_same_table(fer_sample, tmp_path):
    zip_source, from_zip = read(str(write_zip(tmp_path / "sample.zip", fer_sample)))
    folder_source, from_folder = read(str(write_folder(tmp_path / "extracted", fer_sample)))
    csv_text = fer_csv(fer_sample)
    (tmp_path / "fer2013.csv").write_text(csv_text)
    (tmp_path / "fer2013.csv.gz").write_bytes(gzip.compress(csv_text.encode()))
    csv_source, from_csv = read(str(tmp_path / "fer2013.csv"))
    gzip_source, from_gzip = read(str(tmp_path / "fer2013.csv.gz"))

    assert [zip_source.kind, folder_source.kind, csv_source.kind, gzip_source.kind] == ["zip", "folder", "csv", "csv.gz"]
    assert zip_source.sha256 == sha256_of_file(tmp_path / "sample.zip") and folder_source.sha256 == ""
    assert len(from_zip) == len(fer_sample)
    # Folder and zip share member names, so even `source` agrees; the CSV differs only there.
    pd.testing.assert_frame_equal(from_folder, from_zip)
    pd.testing.assert_frame_equal(from_csv.drop(columns="source"), from_zip.drop(columns="source"))
    pd.testing.assert_frame_equal(from_gzip, from_csv)
    assert set(from_csv["source"]) == {f"row {number}" for number in range(1, len(fer_sample) + 1)}
    for row in from_zip.itertuples():
        split, emotion, file_name = row.source.split("/")
        assert (row.emotion, row.usage, row.height, row.width, row.channels) == (
            emotion, file_name.split("_")[0], 48, 48, 1)


def test_archive_of_extracted_folder_with_os_junk_reads_the_same(fer_sample, tmp_path):
    _, plain = read(str(write_zip(tmp_path / "plain.zip", fer_sample)))
    nested = {f"archive/{name}": data for name, data in fer_sample.items()}
    nested |= {"__MACOSX/archive/train/angry/._Training_1.jpg": b"\x00\x05", "archive/train/.DS_Store": b"\x00",
               "archive/test/happy/Thumbs.db": b"\x00", "archive/README.txt": b"FER2013 from Kaggle"}
    _, from_nested = read(str(write_zip(tmp_path / "nested.zip", nested)))
    pd.testing.assert_frame_equal(from_nested, plain)
    # A shared folder (data/external/) may hold other downloads beside train/ and test/; they are not read.
    folder = write_folder(tmp_path / "external", fer_sample | {"train/.DS_Store": b"\x00"})
    (folder / "imagenette-128.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    pd.testing.assert_frame_equal(read(str(folder))[1], plain)


def real_face(fer_sample: dict[str, bytes], mode: str = "L", side: int = 48) -> bytes:
    """A real FER2013 face from the sample, re-encoded in `mode` at side x side."""
    face = Image.open(io.BytesIO(next(iter(fer_sample.values())))).convert(mode).resize((side, side))
    return jpeg(np.asarray(face))


def test_colour_faces_are_kept_as_decoded_and_odd_sizes_refused(fer_sample, tmp_path):
    members = fer_sample | {"train/happy/Training_5.jpg": real_face(fer_sample, "RGB")}
    _, table = read(str(write_zip(tmp_path / "colour.zip", members)))
    colour = table[table["source"] == "train/happy/Training_5.jpg"].iloc[0]
    assert (colour.height, colour.width, colour.channels, len(colour.pixels)) == (48, 48, 3, 48 * 48 * 3)

    # A 64x64 face is no FER2013 image: refused at fetch, naming it, not left for validate to count.
    members = fer_sample | {"train/happy/Training_5.jpg": real_face(fer_sample, "RGB", side=64)}
    for path in (write_zip(tmp_path / "odd.zip", members), write_folder(tmp_path / "odd", members)):
        with pytest.raises(sources.FetchError, match="64x64 pixels, but FER2013 faces are 48x48") as error:
            read(str(path))
        assert_one_line_naming(error, f"{path}: train/happy/Training_5.jpg: ")


def test_path_traversal_entry_is_refused_naming_it(fer_sample, tmp_path):
    for name in ("../../escaped.jpg", "train/angry/../../../escaped.jpg", "/etc/escaped.jpg", "C:/escaped.jpg",
                 "__MACOSX/../../escaped.jpg"):
        path = write_zip(tmp_path / "hostile.zip", fer_sample | {name: next(iter(fer_sample.values()))})
        with pytest.raises(sources.FetchError, match="points outside the archive") as error:
            read(str(path))
        assert_one_line_naming(error, f"{path}: {name}: ")
    assert not (tmp_path.parent / "escaped.jpg").exists() and not list(tmp_path.rglob("escaped.jpg"))


@pytest.mark.parametrize("container", ["zip", "folder"])
def test_one_image_in_two_emotion_folders_is_refused_naming_both(fer_sample, tmp_path, container):
    first = next(name for name in fer_sample if name.startswith("train/angry/"))
    copy = first.replace("/angry/", "/happy/")
    members = fer_sample | {copy: fer_sample[first]}
    path = write_zip(tmp_path / "twice.zip", members) if container == "zip" else write_folder(tmp_path / "twice", members)
    with pytest.raises(sources.FetchError, match="same image \\(same name, same pixels\\) under two emotions") as error:
        read(str(path))
    assert_one_line_naming(error, f"{first} and {copy}")


def test_same_name_with_other_pixels_in_two_folders_is_kept(fer_sample, tmp_path):
    # Real FER2013 has this: train/angry/ and train/surprise/ both hold a Training_8475486.jpg, two faces.
    first = next(name for name in fer_sample if name.startswith("train/angry/"))
    other_face = next(data for name, data in fer_sample.items() if name.startswith("train/sad/"))
    _, table = read(str(write_zip(tmp_path / "names.zip", fer_sample | {first.replace("/angry/", "/happy/"): other_face})))
    assert len(table) == len(fer_sample) + 1


def test_file_name_that_is_not_utf8_is_refused_naming_its_bytes(fer_sample, tmp_path):
    folder = write_folder(tmp_path / "latin1", fer_sample)
    # Bytes that are no UTF-8 (a Latin-1 e-acute), as a copy made on an old system may name a file.
    (folder / "train" / "angry" / os.fsdecode(b"Training_caf\xe9.jpg")).write_bytes(next(iter(fer_sample.values())))
    with pytest.raises(sources.FetchError, match="not valid UTF-8") as error:
        read(str(folder))
    assert_one_line_naming(error, "train/angry/Training_caf\\xe9.jpg: ")
    assert "\\udc" not in str(error.value)

    # A zip entry flagged as UTF-8 whose name bytes are not: the same refusal, naming the entry.
    path = write_zip(tmp_path / "flagged.zip", fer_sample | {"train/angry/Training_café.jpg": b"x"})
    path.write_bytes(path.read_bytes().replace("café".encode(), b"caf\xff\xfe"))
    with pytest.raises(sources.FetchError, match="marked UTF-8 but is not") as error:
        read(str(path))
    assert_one_line_naming(error, "train/angry/Training_caf\\xff\\xfe.jpg: ")


# ---------------------------------------------------------------- bad input

BAD_MEMBERS = [
    ("train/contempt/Training_1.jpg", "unknown emotion folder"),
    ("train/angry/notes.txt", "not an image file"),
    ("test/angry/Validation_1.jpg", "unknown usage prefix"),
    ("train/angry/Training_999.jpg", "not a decodable image"),
]


@pytest.mark.parametrize("container", ["zip", "folder"])
@pytest.mark.parametrize(("member", "reason"), BAD_MEMBERS)
def test_bad_member_stops_with_one_line_naming_it(fer_sample, tmp_path, container, member, reason):
    data = b"this is not an image" if member.endswith("Training_999.jpg") else next(iter(fer_sample.values()))
    members = fer_sample | {member: data}
    path = write_zip(tmp_path / "bad.zip", members) if container == "zip" else write_folder(tmp_path / "bad", members)
    with pytest.raises(sources.FetchError, match=reason) as error:
        read(str(path))
    assert_one_line_naming(error, f"{path}: {member}: ")
    assert str(error.value).count(member) == 1 and " object at 0x" not in str(error.value), error.value


def test_truncated_and_corrupt_archives_are_refused(fer_sample, tmp_path):
    whole = write_zip(tmp_path / "whole.zip", fer_sample).read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(sources.FetchError, match="not a readable zip archive") as error:
        read(str(truncated))
    assert_one_line_naming(error, str(truncated))

    # Flip bytes inside one stored JPEG: the zip's CRC check must catch it before Pillow sees the data.
    name, data = next(iter(fer_sample.items()))
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(whole.replace(data[200:240], bytes(40), 1))
    with pytest.raises(sources.FetchError, match="damaged zip member") as error:
        read(str(corrupt))
    assert_one_line_naming(error, name)

    not_a_zip = tmp_path / "fer2013.zip"
    not_a_zip.write_text("<html>login required</html>")
    with pytest.raises(sources.FetchError, match="not a zip or gzip file") as error:
        read(str(not_a_zip))
    assert_one_line_naming(error, str(not_a_zip))


def test_wrong_checksum_is_refused_and_right_one_accepted(fer_sample, tmp_path):
    path = write_zip(tmp_path / "sample.zip", fer_sample)
    with pytest.raises(sources.FetchError, match="sha256 is") as error:
        read(str(path), "0" * 64)
    assert_one_line_naming(error, "sample.zip")
    assert read(str(path), sha256_of_file(path).upper())[0].sha256 == sha256_of_file(path)
    with pytest.raises(sources.FetchError, match="is a folder"):
        read(str(write_folder(tmp_path / "folder", fer_sample)), sha256_of_file(path))


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda emotion, pixels, usage: (emotion, pixels.rsplit(" ", 1)[0], usage), "row 2 \\(line 3\\): 2303 pixels"),
    (lambda emotion, pixels, usage: ("9", pixels, usage), "row 2 \\(line 3\\): unknown emotion index '9'"),
    (lambda emotion, pixels, usage: (emotion, pixels, "Validation"), "row 2 \\(line 3\\): unknown Usage"),
])
def test_bad_csv_row_is_refused_naming_file_and_row(fer_sample, tmp_path, edit, reason):
    rows = fer_csv_rows(fer_sample)
    rows[1] = edit(*rows[1])
    path = tmp_path / "fer2013.csv"
    path.write_text("".join(f"{','.join(row)}\n" for row in [("emotion", "pixels", "Usage"), *rows]))
    with pytest.raises(sources.FetchError, match=reason) as error:
        read(str(path))
    assert_one_line_naming(error, str(path))


def test_csv_without_the_kaggle_columns_is_refused(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_text("label,pixels\n0,1 2 3\n")
    with pytest.raises(sources.FetchError, match="missing column\\(s\\) emotion, usage") as error:
        read(str(path))
    assert_one_line_naming(error, str(path))


def test_truncated_gzip_csv_is_refused(fer_sample, tmp_path):
    packed = gzip.compress(fer_csv(fer_sample).encode())
    path = tmp_path / "fer2013.csv.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(sources.FetchError, match="not a readable CSV") as error:
        read(str(path))
    assert_one_line_naming(error, str(path))


# ---------------------------------------------------------------- where FER2013 is found

@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *arguments):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_source_needs_and_checks_sha256(fer_sample, tmp_path, http_folder):
    folder, base = http_folder
    archive = write_zip(folder / "fer2013.zip", fer_sample)
    (folder / "export").write_text(fer_csv(fer_sample))  # no extension: read as CSV by content
    source, table = read(f"{base}/fer2013.zip", sha256_of_file(archive))
    assert (source.kind, source.location, source.sha256) == ("zip", f"{base}/fer2013.zip", sha256_of_file(archive))
    pd.testing.assert_frame_equal(table, read(str(archive))[1])
    assert not source.path.exists()  # the download was temporary
    source, from_csv = read(f"{base}/export", sha256_of_file(folder / "export"))
    assert source.kind == "csv" and len(from_csv) == len(fer_sample)

    with pytest.raises(sources.FetchError, match="sha256 is") as error:
        read(f"{base}/fer2013.zip", "ab" * 32)
    assert_one_line_naming(error, "fer2013.zip")
    with pytest.raises(sources.FetchError, match="needs fetch.sha256"):
        read(f"{base}/fer2013.zip")
    with pytest.raises(sources.FetchError, match="download failed") as error:
        read(f"{base}/missing.zip", "ab" * 32)
    assert_one_line_naming(error, f"{base}/missing.zip")
    # A checksum taken from an error page is still no zip: refused by content, naming the URL.
    (folder / "page.zip").write_text("<html>sign in to download</html>")
    with pytest.raises(sources.FetchError, match="not a zip or gzip file") as error:
        read(f"{base}/page.zip", sha256_of_file(folder / "page.zip"))
    assert_one_line_naming(error, f"{base}/page.zip")


def lay_out_kagglehub_cache(cache: Path, version: int, members: dict[str, bytes]) -> Path:
    """The layout kagglehub leaves after dataset_download('msambare/fer2013'): the folder plus a completion marker."""
    dataset = cache / "datasets" / "msambare" / "fer2013"
    write_folder(dataset / "versions" / str(version), members)
    (dataset / f"{version}.complete").touch()
    return dataset / "versions" / str(version)


def test_kaggle_source_reads_a_cached_download_offline(fer_sample, tmp_path, monkeypatch):
    # A pinned version is answered from the cache without any network call; the bare handle would ask
    # Kaggle for the latest version first, which this offline test cannot do.
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    folder = lay_out_kagglehub_cache(tmp_path / "cache", 2, fer_sample)
    source, table = read("kaggle:msambare/fer2013/versions/2")
    assert (source.kind, source.path, source.location) == ("folder", folder, "kaggle:msambare/fer2013/versions/2")
    pd.testing.assert_frame_equal(table, read(str(write_zip(tmp_path / "sample.zip", fer_sample)))[1])
    with pytest.raises(sources.FetchError, match="kagglehub could not provide") as error:
        read("kaggle:msambare/fer2013/versions/not-a-number")
    assert_one_line_naming(error, "kaggle:msambare/fer2013")


def test_auto_looks_in_env_then_data_external_then_kagglehub_cache(fer_sample, tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(sources.FetchError) as error:
        sources.find_fer2013(root)
    for way in ("fetch.source", "DLFER_FER2013", str(root / "data" / "external"), "fer2013.csv.gz",
                "kagglehub.dataset_download", str(tmp_path / "cache")):
        assert way in str(error.value)

    few = {name: data for name, data in fer_sample.items() if "/angry/" in name}  # has train/ and test/
    lay_out_kagglehub_cache(tmp_path / "cache", 2, few)
    newest = lay_out_kagglehub_cache(tmp_path / "cache", 10, few)
    assert sources.find_fer2013(root) == (str(newest), "kagglehub cache")

    external = root / "data" / "external"
    write_folder(external / "fer2013", few)
    assert sources.find_fer2013(root) == (str(external / "fer2013"), "data/external")
    (external / "fer2013.csv").write_text(fer_csv(few))
    assert sources.find_fer2013(root) == (str(external / "fer2013.csv"), "data/external")
    write_zip(external / "archive.zip", few)
    assert sources.find_fer2013(root) == (str(external / "archive.zip"), "data/external")
    write_zip(external / "fer2013.zip", few)
    source, table = read("auto", root=root)
    assert (source.kind, source.origin, source.path) == ("zip", "data/external", external / "fer2013.zip")

    elsewhere = write_zip(tmp_path / "elsewhere.zip", fer_sample)
    monkeypatch.setenv(sources.FER2013_ENV, str(elsewhere))
    source, from_env = read("auto", root=root)
    assert (source.origin, source.path, len(from_env)) == ("$DLFER_FER2013", elsewhere, len(fer_sample))
    monkeypatch.setenv(sources.FER2013_ENV, str(tmp_path / "nowhere.zip"))
    with pytest.raises(sources.FetchError, match="not found \\(\\$DLFER_FER2013\\)"):
        read("auto", root=root)


def test_relative_source_is_taken_from_the_root(fer_sample, tmp_path):
    write_zip(tmp_path / "data" / "mine.zip", fer_sample)
    source, _ = read("data/mine.zip", root=tmp_path)
    assert source.location == str(tmp_path / "data" / "mine.zip")


# ---------------------------------------------------------------- the source domain

@pytest.fixture(scope="module")
def imagenette_sample() -> dict[str, bytes]:
    """Real Imagenette JPEGs: 4 train and 2 val images of the first three classes."""
    require(IMAGENETTE_ZIP)
    chosen: dict[tuple[str, str], list[str]] = {}
    with zipfile.ZipFile(IMAGENETTE_ZIP) as archive:
        names = archive.namelist()
        classes = sorted({name.split("/")[1] for name in names})[:3]
        for name in names:
            split, class_name, _ = name.split("/")
            group = chosen.setdefault((split, class_name), [])
            if class_name in classes and len(group) < (4 if split == "train" else 2):
                group.append(name)
        return {name: archive.read(name) for group in chosen.values() for name in group}


def test_select_per_class_is_seeded_and_bounded():
    members = {"b": [f"train/b/{i}.jpg" for i in range(5)], "a": [f"train/a/{i}.jpg" for i in range(3)]}
    assert sources.select_per_class(members, 0, None) == sorted(members["a"]) + sorted(members["b"])
    chosen = sources.select_per_class(members, 2, np.random.default_rng(7))
    assert len(chosen) == 4 and sum(name.startswith("train/a/") for name in chosen) == 2
    assert chosen == sources.select_per_class(members, 2, np.random.default_rng(7))
    assert len(sources.select_per_class(members, 4, np.random.default_rng(7))) == 3 + 4


def test_square_rgb_centre_crops_then_resizes():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = (0, 255, 0)  # only the centre square is green
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    square = sources.square_rgb(buffer.getvalue(), 10)
    assert square.shape == (10, 10, 3) and square.dtype == np.uint8
    assert (square[..., 1] == 255).all() and (square[..., 0] == 0).all()


def test_read_source_domain_from_real_imagenette_sample(imagenette_sample, tmp_path):
    path = write_zip(tmp_path / "imagenette-sample.zip", {f"imagenette2/{n}": d for n, d in imagenette_sample.items()}
                     | {"imagenette2/noisy_imagenette.csv": b"path,label\n"})
    arrays = sources.read_source_domain(path, 16, 3, seed=1)
    classes = sorted({name.split("/")[1] for name in imagenette_sample})
    assert list(arrays["class_names"]) == classes and len(classes) == 3
    assert arrays["train_images"].shape == (9, 16, 16, 3) and arrays["train_images"].dtype == np.uint8
    assert arrays["val_images"].shape == (6, 16, 16, 3)
    assert list(np.bincount(arrays["train_labels"])) == [3, 3, 3]
    assert list(np.bincount(arrays["val_labels"])) == [2, 2, 2]
    again = sources.read_source_domain(write_folder(tmp_path / "folder", imagenette_sample), 16, 3, seed=1)
    for key in arrays:
        np.testing.assert_array_equal(again[key], arrays[key])

    sources.write_source_domain(arrays, tmp_path / "out" / "source_domain.npz")
    with np.load(tmp_path / "out" / "source_domain.npz") as loaded:  # no pickles: loads without allow_pickle
        assert sorted(loaded.files) == sorted(arrays) and loaded["class_names"].tolist() == classes


def test_bad_source_domain_is_refused(imagenette_sample, tmp_path):
    with pytest.raises(sources.FetchError, match="not an image file") as error:
        sources.read_source_domain(write_zip(tmp_path / "a.zip", imagenette_sample | {"train/x/list.txt": b""}),
                                   16, 0, 0)
    assert_one_line_naming(error, "train/x/list.txt")
    val_only = imagenette_sample | {"val/n99999999/a.JPEG": next(iter(imagenette_sample.values()))}
    with pytest.raises(sources.FetchError, match="n99999999 have no train/ folder"):
        sources.read_source_domain(write_zip(tmp_path / "b.zip", val_only), 16, 0, 0)
    with pytest.raises(sources.FetchError, match="no train/ or val/ folder"):
        sources.read_source_domain(write_folder(tmp_path / "empty", {"readme.txt": b""}), 16, 0, 0)


def test_resolve_source_domain_and_empty_arrays(tmp_path, monkeypatch):
    assert sources.resolve_source_domain("", tmp_path)[0] is None
    assert sources.resolve_source_domain("auto", tmp_path)[0] is None
    external = tmp_path / "data" / "external"
    write_zip(external / "imagenette-128.zip", {})
    assert sources.resolve_source_domain("auto", tmp_path) == (external / "imagenette-128.zip", "data/external")
    write_zip(external / "imagenette-320.zip", {})
    with pytest.raises(sources.FetchError, match="several imagenette"):
        sources.resolve_source_domain("auto", tmp_path)
    monkeypatch.setenv(sources.SOURCE_DOMAIN_ENV, str(external / "imagenette-320.zip"))
    assert sources.resolve_source_domain("auto", tmp_path)[0] == external / "imagenette-320.zip"
    with pytest.raises(sources.FetchError, match="not found"):
        sources.resolve_source_domain("data/missing", tmp_path)

    empty = sources.empty_source_domain(8)
    sources.write_source_domain(empty, tmp_path / "empty.npz")
    with np.load(tmp_path / "empty.npz") as loaded:
        assert loaded["train_images"].shape == (0, 8, 8, 3) and loaded["val_labels"].shape == (0,)
        assert loaded["class_names"].size == 0


# ---------------------------------------------------------------- the real data

@pytest.mark.fer2013
def test_full_fer2013_zip_has_the_official_counts():
    require(FER2013_ZIP)
    source, table = read(str(FER2013_ZIP), "f3c78f41f4254042ce839b92a2db0b45afc0cbad136e7bb7feba3d10289a9a44")
    assert len(table) == OFFICIAL_TOTAL == 35_887
    counts = table.groupby(["usage", "emotion"]).size()
    for usage in USAGES:
        assert (table["usage"] == usage).sum() == sum(OFFICIAL_COUNTS[usage].values())
        for emotion, expected in OFFICIAL_COUNTS[usage].items():
            assert counts[(usage, emotion)] == expected, (usage, emotion)
    assert table["image_id"].is_unique and set(table["channels"]) == {1}
