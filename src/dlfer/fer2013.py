"""What FER2013 is: its classes, usages and published counts.

Label indices follow the original Kaggle CSV (`fer2013.csv`, column `emotion`):
0=Angry 1=Disgust 2=Fear 3=Happy 4=Sad 5=Surprise 6=Neutral. The image-folder layout
(Kaggle `msambare/fer2013`) names the same classes in lower case.
"""

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
LABEL_OF_EMOTION = {name: index for index, name in enumerate(EMOTIONS)}
USAGES = ("Training", "PublicTest", "PrivateTest")
IMAGE_SIDE = 48

# Per-usage, per-class counts of the official release (Goodfellow et al. 2013), as listed by
# the Kaggle CSV and the msambare image-folder copy alike. Validate compares the data with these.
OFFICIAL_COUNTS = {
    "Training": {"angry": 3995, "disgust": 436, "fear": 4097, "happy": 7215, "sad": 4830, "surprise": 3171, "neutral": 4965},
    "PublicTest": {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "sad": 653, "surprise": 415, "neutral": 607},
    "PrivateTest": {"angry": 491, "disgust": 55, "fear": 528, "happy": 879, "sad": 594, "surprise": 416, "neutral": 626},
}
OFFICIAL_TOTAL = sum(sum(per_class.values()) for per_class in OFFICIAL_COUNTS.values())  # 35,887

# The columns of the canonical raw table written by fetch and checked by validate.
CANONICAL_COLUMNS = ("image_id", "usage", "label", "emotion", "height", "width", "channels", "pixels", "sha256", "source")
