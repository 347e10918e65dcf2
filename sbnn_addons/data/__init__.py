"""Offline datasets: scikit-learn digits (embedded default), DVS Gesture frames, SHD via tonic,
randman (generated), CIFAR-10 (python pickle batches)."""

from .cifar10 import load_cifar10
from .digits import load_digits_split, rate_code
from .dvs_gesture import DVSGestureFrames, load_dvs_gesture_32
from .randman import make_randman, randman_split
from .shd import SHDBinned, collate_time_major, load_shd, make_synthetic_shd

__all__ = [
    "load_digits_split", "rate_code", "DVSGestureFrames", "load_dvs_gesture_32",
    "SHDBinned", "collate_time_major", "load_shd", "make_synthetic_shd",
    "make_randman", "randman_split", "load_cifar10",
]
