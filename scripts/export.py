#!/usr/bin/env python
r"""Export a PCAA model folder for deployment with transformers' exporters: torch.export ("dynamo"), ONNX (run with
ONNX Runtime) or OpenVINO.

By default the batch size, height and width stay dynamic: one export serves every input size. The export is traced on
random inputs of --example-size, written to a sibling folder, reloaded from there and compared with the eager model
on --check-shapes (by default, when dynamic, the example size at batch 1 and a larger batch at another size; when
static, the example shape); it replaces --output-dir only when every max |exported - eager| is within --tolerance.

Examples:
    python scripts/export.py --model pcaa-r50-cityscapes --format onnx --output-dir pcaa-r50-cityscapes-onnx
    python scripts/export.py --model pcaa-r50-cityscapes --format openvino --output-dir pcaa-openvino \
        --example-size 512 1024
    python scripts/export.py --model pcaa-r50-cityscapes --format dynamo --static --example-size 768 768 \
        --output-dir pcaa-768

Load the result with `pcaa_hf.exporting.load_exported(folder)` (or transformers'
`ExportedModel.from_pretrained(folder)`; a dynamo export needs trust_remote_code=True) and call it as the model:
`exported(pixel_values=pixel_values).logits`.
"""

import argparse
import logging
import sys
import warnings

from huggingface_hub.errors import StrictDataclassError

from pcaa_hf.argument_types import batch_shape, positive_float, positive_int
from pcaa_hf.exporting import DEFAULT_EXAMPLE_SIZE, EXPORT_FORMATS, export_to_folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a PCAA folder written by save_pretrained")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="dynamo: torch.export's model.pt2; onnx: model.onnx (+ model.onnx.data) for ONNX Runtime; "
                             "openvino: openvino_model.xml/.bin")
    parser.add_argument("--output-dir", required=True, help="folder to write the export to")
    parser.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                        help="dynamic batch size, height and width (default); --no-dynamic: fixed to the example's")
    parser.add_argument("--static", dest="dynamic", action="store_false", help="the same as --no-dynamic")
    parser.add_argument("--example-size", nargs=2, type=positive_int, default=DEFAULT_EXAMPLE_SIZE,
                        metavar=("H", "W"),
                        help=f"the traced input's height and width; a static export takes only this size "
                             f"(default: {DEFAULT_EXAMPLE_SIZE[0]} {DEFAULT_EXAMPLE_SIZE[1]})")
    parser.add_argument("--example-batch-size", type=positive_int,
                        help="the traced input's batch size (default: 2 when dynamic, at least 2 there; 1 when static)")
    parser.add_argument("--check-shapes", nargs="+", type=batch_shape, metavar="BxHxW",
                        help="input shapes to compare the export with the eager model on (default: dynamic, the "
                             "example size at batch 1 and a larger batch at another size; static, the example shape)")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="largest max |exported - eager| accepted, relative to max(1, max |logits|) "
                             "(default: 1e-4)")
    parser.add_argument("--opset-version", type=positive_int, help="--format onnx: the ONNX opset (default: latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output-dir")
    args = parser.parse_args(argv)
    if args.opset_version is not None and args.format != "onnx":
        parser.error("--opset-version only applies to --format onnx")
    if args.dynamic and args.example_batch_size == 1:
        parser.error("--example-batch-size must be at least 2 with --dynamic: torch.export fixes an axis traced "
                     "at size 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = {} if args.opset_version is None else {"opset_version": args.opset_version}
    try:
        with warnings.catch_warnings():
            # torch.export's and onnxscript's deprecation chatter about their own internals.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            report = export_to_folder(
                args.model, args.output_dir, args.format, dynamic=args.dynamic, example_size=args.example_size,
                batch_size=args.example_batch_size, check_shapes=args.check_shapes, tolerance=args.tolerance,
                overwrite=args.overwrite, **options,
            )
    except (OSError, ImportError, ValueError, RuntimeError, TypeError, StrictDataclassError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    axes = "dynamic batch size, height and width" if report.dynamic else "static shape"
    print(f"Exported {args.model} as {report.format} ({axes}) to {report.output_dir}, traced on "
          f"{'x'.join(map(str, report.example_shape))} in {report.export_seconds:.1f} s.")
    print(f"Files: {', '.join(report.files)}")
    print(f"Reloaded and compared with the eager model ({str(report.dtype).removeprefix('torch.')}, random inputs):")
    for check in report.checks:
        print(f"  {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
