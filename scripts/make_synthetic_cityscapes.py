#!/usr/bin/env python
"""Write a generated data set in the Cityscapes folder layout (leftImg8bit/ + gtFine/ with real label ids)."""

import argparse

from pcaa_hf.synthetic import write_cityscapes_tree


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="root folder to write (leftImg8bit/ and gtFine/ go inside)")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--num-test", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 256), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.size) < 16:
        parser.error(f"--size must be at least 16x16, got {args.size}")
    counts = write_cityscapes_tree(args.output, args.num_train, args.num_val, args.num_test, tuple(args.size), args.seed)
    print(f"Wrote a Cityscapes-layout tree to {args.output}: {counts} frames of {args.size[0]}x{args.size[1]}")


if __name__ == "__main__":
    main()
