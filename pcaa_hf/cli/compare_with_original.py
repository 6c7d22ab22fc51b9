"""Numerical parity of pcaa_hf with the authors' PCAA code (GitHub lsa1997/PCAA), which is NOT part of this project.

Point --original at a checkout of that repository. For each configuration, the authors' `Seg_Model` is built with
random weights and randomised BatchNorm statistics, saved as a DistributedDataParallel-style checkpoint (`module.`
prefix), converted with pcaa-convert-original's code, reloaded from the written folder, and both models are run in
eval mode on the same random images and label maps. Prints the relative error (max |ours - theirs| / max |theirs|)
of the logits, the region class scores and each loss term, and exits non-zero above --tolerance (float64) or where
our rounding error exceeds --rounding_ratio times theirs (float32, below). The comparison is
pcaa_hf.conversion.parity's.

Both models run in float64 by default: the randomised networks amplify float32 rounding differences (pcaa_hf runs
CPU inference channels-last, where oneDNN sums in another order) by orders of magnitude, while in float64 any
difference in the functions computed stands out above 1e-10. `--dtype float32` runs both in float32 and also the
authors' model in float64, and compares the rounding error each code makes against that reference: ours passes when
its error is at most --rounding_ratio times theirs.
"""

import sys
from pathlib import Path

import torch

from pcaa_hf.cli.arguments import ArgumentParser
from pcaa_hf.conversion.parity import CONFIGURATIONS, DEFAULT_ROUNDING_RATIO, DEFAULT_TOLERANCE, ParityCheck


def row_line(row):
    line = f"  {row.output:24s} relative error {row.error:.2e}   (max |theirs| {row.scale:.4g})"
    if row.our_rounding is not None:
        line += f"   against float64: ours {row.our_rounding:.2e}, theirs {row.their_rounding:.2e}"
    return line


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--original", required=True, type=Path, help="checkout of GitHub lsa1997/PCAA")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGURATIONS), default=sorted(CONFIGURATIONS))
    parser.add_argument("--tolerance", type=float,
                        help=f"float64: largest relative error accepted (default: {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--rounding_ratio", type=float, default=DEFAULT_ROUNDING_RATIO,
                        help=f"float32: largest ratio of our rounding error to the authors' "
                             f"(default: {DEFAULT_ROUNDING_RATIO:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision of both models")
    args = parser.parse_args(argv)
    if args.dtype == "float32" and args.tolerance is not None:
        parser.error("--tolerance bounds the float64 comparison; in float32, --rounding_ratio decides")
    if not (args.original / "networks" / "caanet.py").is_file():
        parser.error(f"{args.original} is not a checkout of lsa1997/PCAA (networks/caanet.py is missing)")
    check = ParityCheck(args.original, getattr(torch, args.dtype), args.seed,
                        DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance, args.rounding_ratio)
    rows = []
    for name in args.configs:
        settings = CONFIGURATIONS[name]
        head = f"bins {settings['bins']}" if "bins" in settings else (
            f"auxiliary head {settings.get('auxiliary_head', True) or settings['model'] == 'ocrnet'}")
        print(f"{name}: {settings.get('model', 'caanet')}, {settings['backbone']}, {settings['num_labels']} classes, "
              f"{head}, multi-grid {settings['multi_grid']}, dropout {settings['dropout']}, OHEM {settings['ohem']}, "
              f"input 2x3x{settings['size'][0]}x{settings['size'][1]}, {args.dtype}", flush=True)
        for row in check.compare(name):
            print(row_line(row), flush=True)
            rows.append(row)
    print(check.summary(rows))
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
