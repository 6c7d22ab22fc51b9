"""Write generated data sets in the real folder layouts: Cityscapes (leftImg8bit/ + gtFine/ with real label ids) or
ADE20K (ADEChallengeData2016/images + annotations, 150 classes). Options in snake_case (--num_train) or, as first
spelled, kebab-case (--num-train)."""

from pcaa_hf.cli.arguments import ArgumentParser, non_negative_int, output_folder, reports_errors
from pcaa_hf.data.synthetic import write_ade20k_tree, write_cityscapes_tree


def parse_args(argv, description, output_help, size, test_split=False):
    """The options of both generators (`--num_test` with `test_split`); --size checked and made a tuple."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--output", required=True, type=output_folder, help=output_help)
    parser.add_argument("--num_train", type=non_negative_int, default=64)
    parser.add_argument("--num_val", type=non_negative_int, default=16)
    if test_split:
        parser.add_argument("--num_test", type=non_negative_int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=size, metavar=("W", "H"))
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a data set already in --output first, rather than refusing to write there")
    args = parser.parse_args(argv)
    if min(args.size) < 16:
        parser.error(f"--size must be at least 16x16, got {args.size}")
    args.size = tuple(args.size)
    return args


@reports_errors
def cityscapes(argv=None):
    """`pcaa-make-synthetic-cityscapes`: a Cityscapes-layout tree."""
    args = parse_args(argv, "Write a generated data set in the Cityscapes folder layout (leftImg8bit/ + gtFine/ with "
                            "real label ids).", "root folder to write (leftImg8bit/ and gtFine/ go inside)",
                      size=(512, 256), test_split=True)
    counts = write_cityscapes_tree(args.output, args.num_train, args.num_val, args.num_test, args.size, args.seed,
                                   args.overwrite)
    print(f"Wrote a Cityscapes-layout tree to {args.output}: {counts} frames of {args.size[0]}x{args.size[1]}")
    return 0


@reports_errors
def ade20k(argv=None):
    """`pcaa-make-synthetic-ade20k`: an ADE20K-layout tree."""
    args = parse_args(argv, "Write a generated data set in the ADE20K folder layout (ADEChallengeData2016/images + "
                            "annotations, 150 classes).", "folder in which ADEChallengeData2016/ is written",
                      size=(256, 192))
    counts = write_ade20k_tree(args.output, args.num_train, args.num_val, args.size, args.seed, args.overwrite)
    print(f"Wrote an ADE20K-layout tree to {args.output}: {counts} images of about {args.size[0]}x{args.size[1]}")
    return 0
