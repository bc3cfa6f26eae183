"""Matching the sharpness of the evaluation images to the training images (preprocess.match_training_sharpness).

The shared FER2013 copy holds a Training usage whose every face is Gaussian-blurred (median
Laplacian variance ~6) beside sharp PublicTest / PrivateTest faces (~2,000); validate reports the
ratio. A model trained on those blurred faces and tested on sharp ones measures the blur, not the
emotions: every model, ImageNet-initialised or not, lands at chance. Blurring the evaluation
images until their median sharpness equals Training's puts every split in one image domain, so
the ablation measures what it claims to. It is a deviation from the benchmark (the test faces are
no longer the published pixels), which is why it is a parameter, recorded as the sigma used, and
a no-op on a copy whose usages are equally sharp.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dlfer.validation import SHARPNESS_SHIFT_RATIO, laplacian_variance

# Largest Gaussian sigma searched (pixels of the 48x48 image); the shared copy needs about 3.
MAX_SIGMA = 8.0


def median_sharpness(images: np.ndarray) -> float:
    """Median variance of the Laplacian over the images (validate's sharpness score); 0.0 for none."""
    return float(np.median(laplacian_variance(images))) if len(images) else 0.0


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W) uint8 images blurred by a Gaussian of `sigma` pixels (edges repeat), rounded back to uint8."""
    if sigma <= 0:
        return images.copy()
    blurred = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma), mode="nearest")
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def matching_sigma(reference: np.ndarray, sharp: np.ndarray, tolerance: float = 0.01) -> float:
    """The Gaussian sigma that brings the median sharpness of `sharp` down to that of `reference`.

    0.0 when `sharp` is not markedly sharper (validate's SHARPNESS_SHIFT_RATIO), so data without a
    split shift is never touched. Found by bisection: blur only ever lowers the Laplacian variance.
    Uses every image: a sample of 600 left the estimate ~0.1 px noisy, and all of PublicTest takes
    a few seconds.
    """
    target = median_sharpness(reference)
    if len(sharp) == 0 or median_sharpness(sharp) <= SHARPNESS_SHIFT_RATIO * target:
        return 0.0
    low, high = 0.0, MAX_SIGMA
    while high - low > tolerance:
        middle = (low + high) / 2
        if median_sharpness(gaussian_blur(sharp, middle)) > target:
            low = middle
        else:
            high = middle
    return round((low + high) / 2, 2)


def match_training_sharpness(images: np.ndarray, usages: np.ndarray) -> tuple[np.ndarray, dict]:
    """Blur the non-Training images to Training's median sharpness; return the images and what was done.

    Sigma is estimated on PublicTest (validation) alone, so no statistic of the test usage steers
    the preprocessing; the same sigma then blurs PublicTest and PrivateTest.
    """
    training = usages == "Training"
    evaluation = ~training
    estimate_on = usages == "PublicTest" if (usages == "PublicTest").any() else evaluation
    sigma = matching_sigma(images[training], images[estimate_on]) if training.any() else 0.0
    matched = images.copy()
    if sigma > 0:
        matched[evaluation] = gaussian_blur(images[evaluation], sigma)
    summary = {"eval_blur_sigma": sigma, "eval_images_blurred": int(evaluation.sum()) if sigma > 0 else 0,
               "sharpness_median_training": median_sharpness(images[training]),
               "sharpness_median_eval_before": median_sharpness(images[evaluation]),
               "sharpness_median_eval_after": median_sharpness(matched[evaluation])}
    return matched, summary
