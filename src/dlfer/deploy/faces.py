"""Finding faces in photos and cutting them out the way FER2013's faces were cut.

The detector is OpenCV's frontal-face Haar cascade (`haarcascade_frontalface_default.xml`),
which ships inside the opencv-python-headless wheel (`cv2.data.haarcascades`), so detection
works offline with nothing to download. It is also the detector FER2013 was built with:
Goodfellow et al. (2013) cropped the collected photos with OpenCV face detection, and the
cascade's box on a FER2013 image covers a median 0.95 of its side (600 training images placed
on a larger canvas). So its crops match what the model was trained on better than a modern
detector's would. Its weakness is profile and strongly tilted faces, which it misses; that
shows up as "no face found", never as a wrong crop. OpenCV 5 wheels no longer ship the
cascades, hence opencv-python-headless<5.

Boxes are (x, y, width, height) in pixels of the original image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dlfer.fer2013 import IMAGE_SIDE

CASCADE_FILE = "haarcascade_frontalface_default.xml"
# Half the difference between FER2013's crop and the cascade's box, per side, as a fraction of
# the box: a box of 0.95 crop sides grows by (1/0.95 - 1) / 2 = 0.026 on each side.
DEFAULT_MARGIN = 0.026
# detectMultiScale's usual settings: each scale step 10% larger, a face needs 5 overlapping hits.
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
# Faces smaller than FER2013's own 48 pixels would be upscaled into blur; below 32 the cascade
# mostly finds texture.
MIN_FACE_SIDE = 32


class Box(NamedTuple):
    x: int
    y: int
    width: int
    height: int


class Face(NamedTuple):
    box: Box
    crop: np.ndarray  # (48, 48) uint8 greyscale, as FER2013 stores its images


def load_detector():
    """OpenCV's frontal-face cascade from the files packaged with the cv2 wheel."""
    import cv2

    path = cv2.data.haarcascades + CASCADE_FILE
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise RuntimeError(f"{path}: OpenCV's face cascade did not load; reinstall opencv-python-headless<5 "
                           "(OpenCV 5 wheels no longer ship the cascades)")
    return detector


def to_grey(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 greyscale from (H, W), (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4) uint8."""
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels 0-255, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
    raise ValueError(f"expected a greyscale, RGB or RGBA image, got shape {image.shape}")


def reading_order(boxes: list[Box]) -> list[Box]:
    """Boxes in reading order: rows top to bottom, each row left to right.

    A box joins the current row when its centre lies within the vertical extent of the row's
    first (highest) box, so faces of one row of a group photo at slightly different heights
    keep their left-to-right order. The order depends only on the boxes, so the same photo
    always numbers its faces the same way.
    """
    rows: list[list[Box]] = []
    for box in sorted(boxes, key=lambda box: (box.y + box.height / 2, box.x)):
        if rows and box.y + box.height / 2 <= rows[-1][0].y + rows[-1][0].height:
            rows[-1].append(box)
        else:
            rows.append([box])
    return [box for row in rows for box in sorted(row, key=lambda box: (box.x, box.y, box.width, box.height))]


def detect_faces(grey: np.ndarray, detector, min_face_side: int = MIN_FACE_SIDE) -> list[Box]:
    """Face boxes in a greyscale image, in reading order (left to right, top to bottom)."""
    # No histogram equalisation first: with FER2013 faces pasted on ten of scikit-image's photos
    # (240 faces) it lowered recall from 0.76 to 0.70 for 22 instead of 24 false detections, and on
    # the composites of bench/predict.py it halved the speed.
    found = detector.detectMultiScale(grey, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS,
                                      minSize=(min_face_side, min_face_side))
    return reading_order([Box(int(x), int(y), int(width), int(height)) for x, y, width, height in found])


def crop_face(grey: np.ndarray, box: Box, margin: float = DEFAULT_MARGIN, side: int = IMAGE_SIDE) -> np.ndarray:
    """A square side x side crop centred on the box, grown by `margin` of its side on every side.

    Where the grown square runs past the image border the edge pixels are repeated, as
    FER2013's own crops of faces near a photo's border are.
    """
    import cv2

    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    square = max(box.width, box.height) * (1 + 2 * margin)
    centre_x, centre_y = box.x + box.width / 2, box.y + box.height / 2
    left, top = int(round(centre_x - square / 2)), int(round(centre_y - square / 2))
    extent = max(1, int(round(square)))
    height, width = grey.shape
    pad = max(0, -left, -top, left + extent - width, top + extent - height)
    if pad:
        grey = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        left, top = left + pad, top + pad
    region = grey[top:top + extent, left:left + extent]
    # INTER_AREA averages the pixels a 48x48 cell covers: the right filter for shrinking.
    interpolation = cv2.INTER_AREA if extent >= side else cv2.INTER_LINEAR
    return cv2.resize(region, (side, side), interpolation=interpolation)


def whole_image_face(grey: np.ndarray, side: int = IMAGE_SIDE) -> Face:
    """The image itself as one face, for inputs that are already face crops (like FER2013's).

    A non-square image gives its centred square; the box is that square.
    """
    height, width = grey.shape
    extent = min(height, width)
    box = Box((width - extent) // 2, (height - extent) // 2, extent, extent)
    return Face(box, crop_face(grey, box, margin=0.0, side=side))


def find_faces(grey: np.ndarray, detector, margin: float = DEFAULT_MARGIN) -> list[Face]:
    """Every detected face of a greyscale image with its 48x48 crop, in reading order."""
    return [Face(box, crop_face(grey, box, margin)) for box in detect_faces(grey, detector)]
