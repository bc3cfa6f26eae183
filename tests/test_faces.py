"""Face detection and FER2013-style cropping on real photos: scikit-image's portrait and FER2013 composites."""

import io
import zipfile

import numpy as np
import pytest

from conftest import FER2013_ZIP, require
from dlfer.deploy import faces

FACE_SIDE_ON_CANVAS = 144  # FER2013 crops upscaled 3x: a face of ordinary photo size


def fer2013_members(prefix: str, emotions: tuple[str, ...], count: int) -> list[np.ndarray]:
    """The first `count` images (zip order) of the given emotions under test/ with the usage prefix."""
    from PIL import Image

    with zipfile.ZipFile(require(FER2013_ZIP)) as archive:
        names = sorted(name for name in archive.namelist()
                       if name.startswith("test/") and f"/{prefix}_" in name and name.split("/")[1] in emotions)
        return [np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L")) for name in names[:count]]


def composite(crops: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, list[faces.Box]]:
    """FER2013 crops enlarged and pasted in a 2x3 grid on a 600x900 noisy gradient; their boxes."""
    import cv2

    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:600, 0:900]
    canvas = np.clip(90 + 60 * columns / 900 + 30 * rows / 600 + rng.normal(0, 6, rows.shape), 0, 255).astype(np.uint8)
    boxes = []
    for index, crop in enumerate(crops):
        x, y = 40 + (index % 3) * 290, 60 + (index // 3) * 290
        canvas[y:y + FACE_SIDE_ON_CANVAS, x:x + FACE_SIDE_ON_CANVAS] = cv2.resize(
            crop, (FACE_SIDE_ON_CANVAS, FACE_SIDE_ON_CANVAS), interpolation=cv2.INTER_CUBIC)
        boxes.append(faces.Box(x, y, FACE_SIDE_ON_CANVAS, FACE_SIDE_ON_CANVAS))
    return canvas, boxes


def overlap(first: faces.Box, second: faces.Box) -> float:
    """Intersection over union of two boxes."""
    width = max(0, min(first.x + first.width, second.x + second.width) - max(first.x, second.x))
    height = max(0, min(first.y + first.height, second.y + second.height) - max(first.y, second.y))
    intersection = width * height
    return intersection / (first.width * first.height + second.width * second.height - intersection)


def test_detector_ships_with_opencv_and_finds_the_astronaut_portrait():
    skimage_data = pytest.importorskip("skimage.data")
    photo = skimage_data.astronaut()  # Eileen Collins' NASA portrait, 512x512 RGB, inside the wheel
    found = faces.find_faces(faces.to_grey(photo), faces.load_detector())
    assert len(found) == 1
    box = found[0].box
    # Her face spans roughly x 180-270, y 70-160 in the photo (eyes near y 110).
    centre_x, centre_y = box.x + box.width / 2, box.y + box.height / 2
    assert 190 <= centre_x <= 260 and 85 <= centre_y <= 150, box
    assert 60 <= box.width <= 140
    assert found[0].crop.shape == (48, 48) and found[0].crop.dtype == np.uint8


def test_no_face_on_a_plain_background():
    canvas, _ = composite([])
    assert faces.detect_faces(canvas, faces.load_detector()) == []


def test_faces_on_fer2013_composites_are_found_where_they_were_pasted():
    crops = fer2013_members("PrivateTest", ("happy", "neutral", "surprise"), 18)
    detector = faces.load_detector()
    found_total = 0
    for start in range(0, 18, 6):
        canvas, pasted = composite(crops[start:start + 6], seed=start)
        found = faces.find_faces(canvas, detector)
        for face in found:
            overlaps = sorted((overlap(face.box, box) for box in pasted), reverse=True)
            # Each detection lies on one pasted face, and only one: no false positives in between.
            assert overlaps[0] >= 0.4 and overlaps[1] == 0.0, (face.box, overlaps)
            assert face.crop.shape == (48, 48)
        assert len({max(range(6), key=lambda k: overlap(face.box, pasted[k])) for face in found}) == len(found)
        found_total += len(found)
    # The frontal cascade misses some tight FER2013 crops (chin or brow cut off); most are found.
    assert found_total >= 9, found_total


def test_crop_is_square_centred_and_grown_by_the_margin():
    # Pixel value = column index, so a crop's first and last columns tell where it was cut.
    image = np.tile(np.arange(200, dtype=np.uint8), (200, 1))
    box = faces.Box(50, 60, 96, 96)
    tight = faces.crop_face(image, box, margin=0.0, side=96)
    assert tight.shape == (96, 96)
    assert tight[0, 0] == 50 and tight[0, -1] == 145
    grown = faces.crop_face(image, box, margin=0.25, side=144)  # 96 * 1.5 = 144 pixels, no resampling
    assert grown[0, 0] == 50 - 24 and grown[0, -1] == 145 + 24


def test_crop_past_the_border_repeats_the_edge_pixels():
    image = np.tile(np.arange(100, dtype=np.uint8), (100, 1))
    crop = faces.crop_face(image, faces.Box(-10, 0, 40, 40), margin=0.0, side=40)
    assert crop.shape == (40, 40)
    assert (crop[:, :11] == 0).all() and crop[0, 11] == 1  # ten repeated edge columns, then the image


def test_crop_of_a_wide_rectangle_uses_its_longer_side():
    image = np.zeros((300, 300), dtype=np.uint8)
    image[100:140, 100:180] = 255  # an 80x40 bright rectangle
    crop = faces.crop_face(image, faces.Box(100, 100, 80, 40), margin=0.0, side=80)
    # The 80x80 square around it holds the rectangle in its middle 40 rows.
    assert (crop[20:60] == 255).all() and (crop[:19] == 0).all() and (crop[61:] == 0).all()


def test_whole_image_face_takes_the_centred_square():
    image = np.zeros((48, 96), dtype=np.uint8)
    image[:, 24:72] = 200
    face = faces.whole_image_face(image)
    assert face.box == faces.Box(24, 0, 48, 48)
    assert (face.crop == 200).all()


@pytest.mark.parametrize("shape", [(30, 40), (30, 40, 1), (30, 40, 3), (30, 40, 4)])
def test_to_grey_accepts_grey_rgb_and_rgba(shape):
    image = np.full(shape, 120, dtype=np.uint8)
    grey = faces.to_grey(image)
    assert grey.shape == (30, 40) and (grey == 120).all()


def test_to_grey_rejects_float_and_odd_shapes():
    with pytest.raises(ValueError, match="uint8"):
        faces.to_grey(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        faces.to_grey(np.zeros((10, 10, 2), dtype=np.uint8))


def test_negative_margin_is_refused():
    with pytest.raises(ValueError, match="margin"):
        faces.crop_face(np.zeros((50, 50), dtype=np.uint8), faces.Box(0, 0, 10, 10), margin=-0.1)


def test_reading_order_numbers_rows_top_to_bottom_and_each_row_left_to_right():
    # A group photo: the back row's faces at slightly different heights, the front row lower down.
    back_right, back_left, back_middle = faces.Box(300, 40, 80, 80), faces.Box(20, 50, 90, 90), faces.Box(160, 30, 70, 70)
    front_left, front_right = faces.Box(100, 200, 100, 100), faces.Box(250, 210, 90, 90)
    expected = [back_left, back_middle, back_right, front_left, front_right]
    assert faces.reading_order([back_right, front_right, back_left, front_left, back_middle]) == expected
    assert faces.reading_order(expected[::-1]) == expected


def test_faces_of_a_composite_come_in_reading_order_every_time():
    crops = fer2013_members("PrivateTest", ("happy", "neutral", "surprise"), 6)
    canvas, pasted = composite(crops)
    detector = faces.load_detector()
    found = faces.find_faces(canvas, detector)
    assert len(found) >= 3
    # The pasted grid is numbered row by row, left to right: the detections keep that order.
    grid_places = [max(range(len(pasted)), key=lambda k: overlap(face.box, pasted[k])) for face in found]
    assert grid_places == sorted(grid_places), grid_places
    assert [face.box for face in faces.find_faces(canvas, detector)] == [face.box for face in found]
