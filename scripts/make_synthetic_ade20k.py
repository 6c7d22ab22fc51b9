#!/usr/bin/env python
"""Write a generated data set in the ADE20K folder layout (ADEChallengeData2016/images + annotations, 150 classes)."""

import argparse

from pcaa_hf.synthetic import write_ade20k_tree


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="folder in which ADEChallengeData2016/ is written")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.size) < 16:
        parser.error(f"--size must be at least 16x16, got {args.size}")
    counts = write_ade20k_tree(args.output, args.num_train, args.num_val, tuple(args.size), args.seed)
    print(f"Wrote an ADE20K-layout tree to {args.output}: {counts} images of about {args.size[0]}x{args.size[1]}")


if __name__ == "__main__":
    main()
