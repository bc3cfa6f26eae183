"""Finding and reading FER2013 (and the optional source-domain image set) wherever the user keeps it.

FER2013 comes in two shapes: the image-folder archive most people download today (Kaggle
`msambare/fer2013`: `train/<emotion>/Training_<id>.jpg`, `test/<emotion>/PublicTest_<id>.jpg`,
`test/<emotion>/PrivateTest_<id>.jpg`) and the original Kaggle CSV (`emotion,pixels,Usage`).
Both become the same canonical table (CONTEXT.md), so nothing downstream depends on the shape.

fetch.source names where the data is: a path to a zip, a folder or a csv / csv.gz (read by
content, not by name); an http(s) URL, which needs fetch.sha256; `kaggle:<owner>/<dataset>`
(optionally `/versions/<n>`) through kagglehub; or `auto`, which takes the first hit of:
  1. $DLFER_FER2013 (anything fetch.source accepts except `auto`);
  2. <repo>/data/external/: fer2013.zip, archive.zip, fer2013.csv, fer2013.csv.gz, then a folder
     holding train/ and test/: data/external/fer2013/, data/external/archive/, data/external/;
  3. the kagglehub cache, $KAGGLEHUB_CACHE or ~/.cache/kagglehub, at
     datasets/msambare/fer2013/versions/<n>/ with train/ and test/ (newest version first).
Relative paths are taken from the repository root. fetch.sha256, when set, is checked against
any zip or csv file (it cannot apply to a folder).

Image trees (FER2013 and the source domain alike, zip or folder): only files under the split
folders are read (train/ and test/, or train/ and val/), found at the top or under one single
top-level folder (an archive of the extracted folder). Everything else beside the split folders
(a README, imagenette's noisy_imagenette.csv, other downloads in data/external/) is ignored.
Inside the split folders each file must be `<split>/<class>/<image>.jpg|jpeg|png`; anything
else stops the fetch, except operating-system junk, which is skipped: `__MACOSX/` folders,
hidden names starting with '.' (.DS_Store, AppleDouble `._*` files), Thumbs.db, desktop.ini.
Also refused, naming the file: an archive entry whose name climbs out of the archive (`../x`,
`/etc/x`: a broken or hostile archive; nothing is ever extracted, members are read in memory),
a file name that is not valid UTF-8, a FER2013 image that is not 48x48, and one image (same name,
same pixels) in two emotion folders, which would enter the table twice with two labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import re
import tempfile
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dlfer.fer2013 import CANONICAL_COLUMNS, EMOTIONS, IMAGE_SIDE, LABEL_OF_EMOTION, USAGES
from dlfer.files import atomic_path, sha256_of_file

FER2013_ENV = "DLFER_FER2013"
SOURCE_DOMAIN_ENV = "DLFER_SOURCE_DOMAIN"
KAGGLE_DATASET = "msambare/fer2013"
EXTERNAL_FILES = ("fer2013.zip", "archive.zip", "fer2013.csv", "fer2013.csv.gz")
EXTERNAL_FOLDERS = ("fer2013", "archive", ".")
FER2013_SPLITS = ("train", "test")
SOURCE_DOMAIN_SPLITS = ("train", "val")
# The Kaggle image-folder layout: which top folder (train/ or test/) holds each official usage. Not the
# pipeline's splits (dlfer.data.splits.SPLIT_OF_USAGE puts PublicTest in val).
FOLDER_OF_USAGE = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
JUNK_NAMES = ("__MACOSX", "Thumbs.db", "desktop.ini")
# Pillow modes that hold one grey band; they become 8-bit 'L'. Every other mode becomes RGB.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# Pillow raises these for files that are not images or are cut short.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# zipfile raises these for a damaged member (bad CRC, broken deflate stream, cut-off data).
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)

CANONICAL_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("usage", pa.string()), ("label", pa.int64()), ("emotion", pa.string()),
    ("height", pa.int64()), ("width", pa.int64()), ("channels", pa.int64()), ("pixels", pa.binary()),
    ("sha256", pa.string()), ("source", pa.string()),
])
if tuple(CANONICAL_SCHEMA.names) != CANONICAL_COLUMNS:
    raise ValueError("CANONICAL_SCHEMA has drifted from dlfer.fer2013.CANONICAL_COLUMNS")


class FetchError(ValueError):
    """A data source is missing or malformed; the one-line message names the file and the fix."""


class Source(NamedTuple):
    """A FER2013 source resolved to something on local disk."""
    kind: str       # how it is read: zip | folder | csv | csv.gz
    path: Path      # the local file or folder that is read (a temporary file for a URL)
    location: str   # what names it for a rerun: absolute path, URL or kaggle:<handle>
    origin: str     # how it was found: fetch.source, $DLFER_FER2013, data/external, kagglehub cache
    sha256: str     # of the zip or csv file; "" for a folder


class RawImage(NamedTuple):
    """One decoded image before it gets its canonical place and id."""
    usage: str
    label: int
    height: int
    width: int
    channels: int
    pixels: bytes   # row-major uint8, height * width * channels long
    source: str     # member path in the zip or folder, or "row <n>" of the CSV (n = 1 after the header)


@contextlib.contextmanager
def _located(where: str):
    """Prefix the message of a FetchError raised inside the block with the file it concerns."""
    try:
        yield
    except FetchError as error:
        raise FetchError(f"{where}: {error}") from None


# ---------------------------------------------------------------- finding the source

@contextlib.contextmanager
def open_fer2013_source(setting: str, expected_sha256: str = "", root: str | Path = "."):
    """Resolve fetch.source to a local Source; a URL download lives in a temporary folder until the block ends."""
    root = Path(root).resolve()
    if setting == "auto":
        location, origin = find_fer2013(root)
    else:
        location, origin = setting, "fetch.source"
    if location == "auto":
        raise FetchError(f"{origin} is 'auto'; give it a path, URL or kaggle:<owner>/<dataset>")
    expected_sha256 = expected_sha256.strip().lower()
    if location.startswith(("http://", "https://")):
        if not expected_sha256:
            raise FetchError(f"{location}: a URL source needs fetch.sha256 (the file's sha256) so a changed or "
                             "damaged download cannot slip in; set it in params.yaml")
        with tempfile.TemporaryDirectory(prefix="dlfer-fetch-") as download_folder:
            path = _download(location, Path(download_folder))
            yield _local_source(path, location, origin, expected_sha256, where=location)
    elif location.startswith("kaggle:"):
        folder = _kaggle_download(location.removeprefix("kaggle:"))
        yield _local_source(folder, location, origin, expected_sha256)
    else:
        path = (root / Path(location).expanduser()).resolve()  # an absolute location ignores root
        if not path.exists():
            raise FetchError(f"{path}: not found ({origin}); fix the path or use fetch.source: auto")
        yield _local_source(path, str(path), origin, expected_sha256)


def find_fer2013(root: Path) -> tuple[str, str]:
    """The `auto` search: (location, origin) of the first of $DLFER_FER2013, data/external/, the kagglehub cache."""
    if os.environ.get(FER2013_ENV):
        return os.environ[FER2013_ENV], f"${FER2013_ENV}"
    external = root / "data" / "external"
    for name in EXTERNAL_FILES:
        if (external / name).is_file():
            return str(external / name), "data/external"
    for name in EXTERNAL_FOLDERS:
        if all((external / name / split).is_dir() for split in FER2013_SPLITS):
            return str((external / name).resolve()), "data/external"
    versions = kagglehub_cache() / "datasets" / KAGGLE_DATASET / "versions"
    numbered = [path for path in versions.glob("*") if path.name.isdigit()] if versions.is_dir() else []
    for folder in sorted(numbered, key=lambda path: int(path.name), reverse=True):
        if all((folder / split).is_dir() for split in FER2013_SPLITS):
            return str(folder), "kagglehub cache"
    raise FetchError(
        f"FER2013 not found: set fetch.source in params.yaml to a zip, folder, fer2013.csv(.gz), an https URL "
        f"(with fetch.sha256) or kaggle:{KAGGLE_DATASET}; or set ${FER2013_ENV} to one of those; or put "
        f"{', '.join(EXTERNAL_FILES)} or an extracted train/+test/ folder in {external}; or download it once "
        f"with kagglehub.dataset_download('{KAGGLE_DATASET}') into {versions.parent}")


def kagglehub_cache() -> Path:
    """kagglehub's cache folder, following its own KAGGLEHUB_CACHE override."""
    return Path(os.environ.get("KAGGLEHUB_CACHE") or Path.home() / ".cache" / "kagglehub")


def _download(url: str, folder: Path) -> Path:
    # Keeping the URL's file name lets errors met while reading the download name a recognisable file.
    target = folder / (Path(urllib.parse.urlparse(url).path).name or "download")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as handle:
            while chunk := response.read(1 << 20):
                handle.write(chunk)
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise FetchError(f"{url}: download failed ({error}); check the URL and the network, or download "
                         "the file yourself and set fetch.source to its path") from None
    return target


def _kaggle_download(handle: str) -> Path:
    import kagglehub  # imported here: it is slow to import and only this source needs it

    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as error:  # kagglehub surfaces requests, kagglesdk and its own errors alike
        reason = (str(error).splitlines() or [""])[0][:200]
        raise FetchError(f"kaggle:{handle}: kagglehub could not provide the dataset ({type(error).__name__}: "
                         f"{reason}); check the handle and your Kaggle credentials, or pin a cached version "
                         f"(kaggle:{handle}/versions/<n>) to work offline") from None


def _local_source(path: Path, location: str, origin: str, expected_sha256: str, where: str = "") -> Source:
    """Check and classify a local file or folder; `where` names it in errors (the URL of a download)."""
    if path.is_dir():
        csv = _csv_in_folder(path)
        if csv is None:
            if expected_sha256:
                raise FetchError(f"{path}: fetch.sha256 is set but this is a folder; a checksum applies to a zip "
                                 "or csv file, so clear fetch.sha256 or point fetch.source at the archive")
            return Source("folder", path, location, origin, "")
        path = csv
    where = where or str(path)
    digest = sha256_of_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise FetchError(f"{where}: sha256 is {digest}, expected {expected_sha256} (fetch.sha256); the file "
                         "is damaged or a different version: download it again or correct fetch.sha256")
    return Source(_file_kind(path, where), path, location, origin, digest)


def _csv_in_folder(folder: Path) -> Path | None:
    """The CSV to read in a folder without train/ or test/ (a kagglehub download of a CSV dataset), else None."""
    if any((folder / split).is_dir() for split in FER2013_SPLITS) or _single_subfolder_root(folder, FER2013_SPLITS):
        return None
    for name in ("fer2013.csv", "fer2013.csv.gz"):
        if (folder / name).is_file():
            return folder / name
    csvs = sorted(folder.glob("*.csv")) + sorted(folder.glob("*.csv.gz"))
    if len(csvs) == 1:
        return csvs[0]
    raise FetchError(f"{folder}: neither train/ and test/ image folders nor one fer2013.csv inside; "
                     "point fetch.source at the extracted FER2013 folder, its zip or its csv")


def _file_kind(path: Path, where: str) -> str:
    # Decided by content so a URL or a renamed file reads right; the name only sharpens the error.
    with path.open("rb") as handle:
        magic = handle.read(2)
    if magic == b"PK":
        return "zip"
    if magic == b"\x1f\x8b":
        return "csv.gz"
    if path.name.lower().endswith((".zip", ".gz")):
        raise FetchError(f"{where}: named {path.name} but it is not a zip or gzip file (truncated, corrupt or an "
                         "error page); download it again")
    return "csv"


# ---------------------------------------------------------------- reading FER2013

def read_fer2013(source: Source) -> pd.DataFrame:
    """Read a resolved source into the canonical table."""
    if source.kind in ("csv", "csv.gz"):
        images = _read_csv(source.path, compressed=source.kind == "csv.gz")
    else:
        images = _read_image_folder(source.path)
    if not images:
        raise FetchError(f"{source.path}: no FER2013 images inside; check that this is the dataset")
    return canonical_table(images)


def parse_fer2013_member(member: str) -> tuple[str, int]:
    """(usage, label) of an image-folder member `<split>/<emotion>/<Usage>_<id>.jpg`; FetchError if malformed."""
    parts = member.split("/")
    if len(parts) != 3:
        raise FetchError("expected <split>/<emotion>/<Usage>_<id>.jpg; move or remove it")
    split, emotion, file_name = parts
    if not file_name.lower().endswith(IMAGE_SUFFIXES):
        raise FetchError(f"not an image file (expected {'/'.join(IMAGE_SUFFIXES)}); remove it")
    if emotion.lower() not in LABEL_OF_EMOTION:
        raise FetchError(f"unknown emotion folder '{emotion}'; expected one of {', '.join(EMOTIONS)}")
    usage = file_name.split("_", 1)[0]
    if usage not in USAGES:
        raise FetchError(f"unknown usage prefix '{usage}'; file names start with "
                         f"{', '.join(usage + '_' for usage in USAGES)}")
    if FOLDER_OF_USAGE[usage] != split:
        raise FetchError(f"a {usage} image in {split}/; {usage} images belong in {FOLDER_OF_USAGE[usage]}/")
    return usage, LABEL_OF_EMOTION[emotion.lower()]


def decode_image(data: bytes) -> tuple[bytes, int, int, int]:
    """(pixels, height, width, channels): greyscale files as 8-bit 'L', all others as RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = "L" if image.mode in GREY_MODES else "RGB"
            decoded = image if image.mode == mode else image.convert(mode)
            return decoded.tobytes(), decoded.height, decoded.width, len(mode)
    except DECODE_ERRORS as error:
        raise FetchError(f"not a decodable image ({_decode_reason(error)}); replace or remove the file") from None


def _decode_reason(error: Exception) -> str:
    # Pillow names the file it could not identify by the repr of our in-memory buffer; the path says more.
    if isinstance(error, Image.UnidentifiedImageError):
        return "Pillow recognises no image format in it"
    return str(error) or type(error).__name__


def _read_image_folder(path: Path) -> list[RawImage]:
    images = []
    # (file name, pixel digest) -> member: one image copied into two emotion folders would carry two labels.
    member_of_image: dict[tuple[str, str], str] = {}
    with _image_tree(path, FER2013_SPLITS) as (members, read):
        for member in members:
            with _located(f"{path}: {member}"):
                usage, label = parse_fer2013_member(member)
                pixels, height, width, channels = decode_image(read(member))
                if (height, width) != (IMAGE_SIDE, IMAGE_SIDE):
                    raise FetchError(f"{width}x{height} pixels, but FER2013 faces are {IMAGE_SIDE}x{IMAGE_SIDE}; "
                                     "this file is not from FER2013 (or was resized): remove it")
            # Two real FER2013 files share a name in two folders (Training_8475486.jpg, Training_52789098.jpg)
            # yet hold different faces, so only a name *and* pixels match is refused.
            key = (member.rsplit("/", 1)[-1], hashlib.sha256(pixels).hexdigest())
            if key in member_of_image:
                raise FetchError(f"{path}: {member_of_image[key]} and {member} are the same image (same name, same "
                                 "pixels) under two emotions; keep it only in the folder of its true emotion")
            member_of_image[key] = member
            images.append(RawImage(usage, label, height, width, channels, pixels, member))
    return images


def parse_csv_row(emotion: str, pixels: str, usage: str, source: str) -> RawImage:
    """One row of the Kaggle CSV; the pixel string must hold 48*48 integers in 0..255."""
    emotion, usage = emotion.strip(), usage.strip()
    if not (emotion.isdigit() and int(emotion) < len(EMOTIONS)):
        raise FetchError(f"unknown emotion index '{emotion}'; expected 0..{len(EMOTIONS) - 1} "
                         f"({', '.join(f'{i}={name}' for i, name in enumerate(EMOTIONS))})")
    if usage not in USAGES:
        raise FetchError(f"unknown Usage '{usage}'; expected one of {', '.join(USAGES)}")
    try:
        values = np.array(pixels.split(), dtype=np.int64)
    except ValueError:
        raise FetchError("pixels is not a list of integers separated by spaces") from None
    if values.size != IMAGE_SIDE * IMAGE_SIDE:
        raise FetchError(f"{values.size} pixels, expected {IMAGE_SIDE}*{IMAGE_SIDE}={IMAGE_SIDE * IMAGE_SIDE}; "
                         "the row is cut short or is not FER2013")
    if values.min() < 0 or values.max() > 255:
        raise FetchError("pixel values outside 0..255")
    return RawImage(usage, int(emotion), IMAGE_SIDE, IMAGE_SIDE, 1, values.astype(np.uint8).tobytes(), source)


def _read_csv(path: Path, compressed: bool) -> list[RawImage]:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, compression="gzip" if compressed else None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError,
            zlib.error) as error:
        reason = (str(error).splitlines() or [""])[0]
        raise FetchError(f"{path}: not a readable CSV ({reason}); download it again") from None
    # The Kaggle file says `emotion,pixels,Usage`; some copies differ in case or add spaces.
    columns = {str(name).strip().lower(): name for name in table.columns}
    missing = [name for name in ("emotion", "pixels", "usage") if name not in columns]
    if missing:
        raise FetchError(f"{path}: missing column(s) {', '.join(missing)}; a FER2013 CSV has emotion,pixels,Usage")
    rows = zip(table[columns["emotion"]], table[columns["pixels"]], table[columns["usage"]])
    images = []
    for number, (emotion, pixels, usage) in enumerate(rows, start=1):
        with _located(f"{path}: row {number} (line {number + 1})"):
            images.append(parse_csv_row(emotion, pixels, usage, f"row {number}"))
    return images


def canonical_table(images: list[RawImage]) -> pd.DataFrame:
    """Sort by (usage, pixel sha256, label) and number within each usage, so the order depends on content only."""
    digests = [hashlib.sha256(image.pixels).hexdigest() for image in images]
    # The source is the last key only so exact duplicates (same usage, pixels, label) sort reproducibly.
    order = sorted(range(len(images)), key=lambda i: (USAGES.index(images[i].usage), digests[i],
                                                     images[i].label, images[i].source))
    ranks = dict.fromkeys(USAGES, 0)
    columns = {name: [] for name in CANONICAL_COLUMNS}
    for index in order:
        image = images[index]
        columns["image_id"].append(f"{image.usage}_{ranks[image.usage]:05d}")
        ranks[image.usage] += 1
        for name in ("usage", "label", "height", "width", "channels", "pixels", "source"):
            columns[name].append(getattr(image, name))
        columns["emotion"].append(EMOTIONS[image.label])
        columns["sha256"].append(digests[index])
    return pa.table(columns, schema=CANONICAL_SCHEMA).to_pandas()


# Key of the parquet schema metadata that names the copy the table was read from (validate quotes it).
SOURCE_METADATA_KEY = b"dlfer.source"


def portable_location(location: str, root: Path) -> str:
    """A local path inside the checkout as a checkout-relative path; URLs, kaggle: handles, outside paths as given."""
    if not location or "://" in location or location.startswith("kaggle:"):
        return location
    try:
        return str(Path(location).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return location


def write_canonical_table(table: pd.DataFrame, path: str | Path, source: str = "") -> None:
    """Write the table as parquet with the fixed schema, atomically; `source` names the copy it came from."""
    arrow_table = pa.Table.from_pandas(table, schema=CANONICAL_SCHEMA, preserve_index=False)
    arrow_table = arrow_table.replace_schema_metadata({**(arrow_table.schema.metadata or {}),
                                                       SOURCE_METADATA_KEY: source.encode()})
    with atomic_path(path) as temporary:
        pq.write_table(arrow_table, temporary)


# ---------------------------------------------------------------- image trees (zip or folder)

def _is_junk(member: str) -> bool:
    return any(part in JUNK_NAMES or part.startswith(".") for part in member.split("/"))


def _climbs_out(name: str) -> bool:
    """Whether an archive entry's name would land outside the folder it was extracted into (zip slip)."""
    parts = re.split(r"[/\\]", name)
    return name.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:", name)) or ".." in parts


def _printable_name(name: str) -> str:
    """A file name as text; bytes that are not UTF-8 (surrogate-escaped by the OS layer) shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def _require_utf8_names(path: Path, members: list[str]) -> None:
    for member in members:
        try:
            member.encode("utf-8")
        except UnicodeEncodeError:
            raise FetchError(f"{path}: {_printable_name(member)}: the file name is not valid UTF-8 (the bytes shown "
                             "as \\xNN); rename the file to its FER2013 name, e.g. Training_<id>.jpg") from None


def _single_subfolder_root(folder: Path, splits: tuple[str, ...]) -> Path | None:
    subfolders = [path for path in folder.iterdir() if path.is_dir() and not _is_junk(path.name)]
    if len(subfolders) == 1 and any((subfolders[0] / split).is_dir() for split in splits):
        return subfolders[0]
    return None


@contextlib.contextmanager
def _image_tree(path: Path, splits: tuple[str, ...]):
    """Yield (members, read): sorted `<split>/...` file names of a zip or folder, and read(member) -> bytes."""
    layout = f"no {' or '.join(split + '/' for split in splits)} folder inside; expected {'/, '.join(splits)}/ " \
             "at the top or under one top-level folder"
    if path.is_dir():
        root = path if any((path / split).is_dir() for split in splits) else _single_subfolder_root(path, splits)
        if root is None:
            raise FetchError(f"{path}: {layout}")
        members = sorted(file.relative_to(root).as_posix() for split in splits if (root / split).is_dir()
                         for file in (root / split).rglob("*") if file.is_file())
        members = [member for member in members if not _is_junk(member)]
        _require_utf8_names(path, members)
        yield members, lambda member: (root / member).read_bytes()
        return
    try:
        archive = zipfile.ZipFile(path)
    except UnicodeDecodeError as error:  # an entry flagged as UTF-8 whose name is not
        name = error.object.decode("utf-8", errors="backslashreplace")
        raise FetchError(f"{path}: {name}: the entry's name is marked UTF-8 but is not (the bytes shown as \\xNN); "
                         "the archive is broken: download it again, or re-create it from the extracted "
                         "files") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise FetchError(f"{path}: not a readable zip archive ({error}); it is truncated or corrupt, "
                         "download it again") from None
    with archive:
        # Members are read in memory and never extracted, but a name that climbs out of the archive means
        # a broken or hostile archive: nothing in it can be trusted.
        for name in archive.namelist():
            if _climbs_out(name):
                raise FetchError(f"{path}: {name}: an archive entry that points outside the archive (path "
                                 "traversal); the archive is broken or hostile: do not extract it, download it "
                                 "again from a trusted source")
        names = [name for name in archive.namelist() if not name.endswith("/") and not _is_junk(name)]
        tops = {name.split("/", 1)[0] for name in names}
        prefix = ""
        if not tops & set(splits):
            inner = {name.split("/", 2)[1] for name in names if name.count("/") >= 2}
            if len(tops) != 1 or not inner & set(splits):
                raise FetchError(f"{path}: {layout}")
            prefix = tops.pop() + "/"
        members = sorted(name[len(prefix):] for name in names
                         if name.startswith(prefix) and name[len(prefix):].split("/", 1)[0] in splits)

        def read(member: str) -> bytes:
            try:
                return archive.read(prefix + member)
            except MEMBER_ERRORS as error:
                # zipfile names the member again ("Bad CRC-32 for file '...'"); the caller already does.
                reason = str(error).replace(f" for file {prefix + member!r}", "") or type(error).__name__
                raise FetchError(f"damaged zip member ({reason}); the archive is corrupt, download it again") from None

        yield members, read


# ---------------------------------------------------------------- the source-domain set

def resolve_source_domain(setting: str, root: str | Path = ".") -> tuple[Path | None, str]:
    """(path or None to skip, origin) for fetch.source_domain: "", auto, or a zip/folder path."""
    root = Path(root).resolve()
    if setting == "":
        return None, "skipped (fetch.source_domain is empty)"
    origin = "fetch.source_domain"
    if setting == "auto":
        if os.environ.get(SOURCE_DOMAIN_ENV):
            setting, origin = os.environ[SOURCE_DOMAIN_ENV], f"${SOURCE_DOMAIN_ENV}"
        else:
            found = sorted((root / "data" / "external").glob("imagenette*.zip"))
            if len(found) > 1:
                names = ", ".join(path.name for path in found)
                raise FetchError(f"{found[0].parent}: several imagenette*.zip ({names}); "
                                 "set fetch.source_domain to the one to use")
            if not found:
                return None, "skipped (auto found no source domain)"
            return found[0], "data/external"
    path = (root / Path(setting).expanduser()).resolve()
    if not path.exists():
        raise FetchError(f"{path}: not found ({origin}); fix the path, or set fetch.source_domain to \"\" to skip it")
    return path, origin


def source_domain_member(member: str) -> tuple[str, str]:
    """(split, class) of an ImageNet-layout member `<train|val>/<class>/<image>`; FetchError if malformed."""
    parts = member.split("/")
    if len(parts) != 3:
        raise FetchError("expected <train|val>/<class>/<image>; move or remove it")
    if not parts[2].lower().endswith(IMAGE_SUFFIXES):
        raise FetchError(f"not an image file (expected {'/'.join(IMAGE_SUFFIXES)}); remove it")
    return parts[0], parts[1]


def select_per_class(members_by_class: dict[str, list[str]], per_class: int,
                     rng: np.random.Generator | None) -> list[str]:
    """At most `per_class` members of each class (0 = all, rng unused), drawn by `rng` over classes in sorted order."""
    chosen = []
    for class_name in sorted(members_by_class):
        members = sorted(members_by_class[class_name])
        if 0 < per_class < len(members):
            members = [members[i] for i in sorted(rng.choice(len(members), size=per_class, replace=False))]
        chosen.extend(members)
    return chosen


def square_rgb(data: bytes, size: int) -> np.ndarray:
    """Decode as RGB, centre-crop to a square (keeps the aspect ratio) and resize to size x size."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except DECODE_ERRORS as error:
        raise FetchError(f"not a decodable image ({_decode_reason(error)}); replace or remove the file") from None
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def empty_source_domain(size: int) -> dict[str, np.ndarray]:
    """The arrays of a skipped source domain: zero-length, so the npz out always exists and loads alike."""
    images = np.zeros((0, size, size, 3), dtype=np.uint8)
    labels = np.zeros((0,), dtype=np.int64)
    return {"train_images": images, "train_labels": labels, "val_images": images, "val_labels": labels,
            "class_names": np.array([], dtype=str)}


def read_source_domain(path: Path, size: int, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Read an ImageNet-layout zip or folder into the source-domain arrays (CONTEXT.md)."""
    if size < 1 or per_class < 0:
        raise FetchError(f"fetch.source_domain_size must be >= 1 and fetch.source_domain_per_class >= 0, got "
                         f"{size} and {per_class}; fix params.yaml")
    with _image_tree(path, SOURCE_DOMAIN_SPLITS) as (members, read):
        by_split = {split: {} for split in SOURCE_DOMAIN_SPLITS}
        for member in members:
            with _located(f"{path}: {member}"):
                split, class_name = source_domain_member(member)
            by_split[split].setdefault(class_name, []).append(member)
        class_names = sorted(by_split["train"])
        if not class_names:
            raise FetchError(f"{path}: no train/<class>/ images; expected ImageNet layout train/<class>/*, "
                             "val/<class>/*")
        unknown = sorted(set(by_split["val"]) - set(class_names))
        if unknown:
            raise FetchError(f"{path}: val/ classes {', '.join(unknown)} have no train/ folder; "
                             "a source domain needs the same classes in train/ and val/")
        label_of_class = {name: label for label, name in enumerate(class_names)}
        arrays = {}
        for split, chosen in (("train", select_per_class(by_split["train"], per_class, np.random.default_rng(seed))),
                              ("val", select_per_class(by_split["val"], 0, None))):
            images = np.empty((len(chosen), size, size, 3), dtype=np.uint8)
            for index, member in enumerate(chosen):
                with _located(f"{path}: {member}"):
                    images[index] = square_rgb(read(member), size)
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = np.array([label_of_class[m.split("/")[1]] for m in chosen], dtype=np.int64)
    arrays["class_names"] = np.array(class_names, dtype=str)
    return arrays


def write_source_domain(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    """Write the arrays as an uncompressed npz, atomically (photos barely compress; loading stays fast)."""
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        # A file handle, not a path: np.savez would append .npz to the temporary name.
        np.savez(handle, **arrays)
