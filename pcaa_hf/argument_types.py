"""argparse types shared by the command-line scripts: each refuses a bad value with a message naming it."""

import argparse
import math
import re


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return int(text)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def batch_shape(text):
    """An input shape written BATCHxHEIGHTxWIDTH (e.g. 3x389x643)."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not match or min(int(value) for value in match.groups()) < 1:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxHEIGHTxWIDTH with positive integers (e.g. 3x389x643), "
                                         f"got {text!r}")
    return tuple(int(value) for value in match.groups())


def region_grid(text):
    """A PCAA region grid written ROWSxCOLUMNS (e.g. 4x4), as the authors' --bin_h/--bin_w pairs."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"a bin grid is ROWSxCOLUMNS with positive integers (e.g. 4x4), got {text!r}")
    return int(match[1]), int(match[2])


__all__ = ["batch_shape", "non_negative_int", "positive_float", "positive_int", "region_grid"]
