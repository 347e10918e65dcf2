"""Offline datasets: scikit-learn digits (embedded default), DVS Gesture frames, SHD via tonic."""

from .digits import load_digits_split, rate_code
from .dvs_gesture import DVSGestureFrames, load_dvs_gesture_32
from .shd import SHDBinned, collate_time_major, load_shd, make_synthetic_shd

__all__ = [
    "load_digits_split", "rate_code", "DVSGestureFrames", "load_dvs_gesture_32",
    "SHDBinned", "collate_time_major", "load_shd", "make_synthetic_shd",
]
