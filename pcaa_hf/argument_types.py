"""argparse types shared by the command-line scripts: each refuses a bad value with a message naming it."""

import argparse
import re


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return int(text)


def region_grid(text):
    """A PCAA region grid written ROWSxCOLUMNS (e.g. 4x4), as the authors' --bin_h/--bin_w pairs."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"a bin grid is ROWSxCOLUMNS with positive integers (e.g. 4x4), got {text!r}")
    return int(match[1]), int(match[2])


__all__ = ["non_negative_int", "positive_int", "region_grid"]
