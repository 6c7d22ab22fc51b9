r"""Export a PCAA model folder for deployment with transformers' exporters: torch.export ("dynamo"), ONNX (run with
ONNX Runtime) or OpenVINO.

By default the batch size, height and width stay dynamic: one export serves every input size. The export is traced on
random inputs of --example_size, written to a sibling folder, reloaded from there and compared with the eager model
on --check_shapes (by default, when dynamic, the example size at batch 1 and a larger batch at another size; when
static, the example shape); it replaces --output_dir only when every max |exported - eager| is within --tolerance.

Examples:
    python scripts/export.py --model pcaa-r50-cityscapes --format onnx --output_dir pcaa-r50-cityscapes-onnx
    python scripts/export.py --model pcaa-r50-cityscapes --format openvino --output_dir pcaa-openvino \
        --example_size 512 1024
    python scripts/export.py --model pcaa-r50-cityscapes --format dynamo --static --example_size 768 768 \
        --output_dir pcaa-768

--int8 (ONNX only) quantizes the export for CPU deployment with ONNX Runtime's static int8 quantization (through
transformers' OnnxRuntimeQuantizer), calibrated on --calibration_images training images of --calibration_data, and
accepts it only when it keeps the float32 model's class on at least --min_agreement of the pixels of each of
--check_images validation images:
    python scripts/export.py --model pcaa-r50-cityscapes --format onnx --int8 --dataset_type cityscapes \
        --calibration_data cityscapes --output_dir pcaa-r50-cityscapes-int8

Load the result with `pcaa_hf.publishing.exporting.load_exported(folder)` (or transformers'
`ExportedModel.from_pretrained(folder)`; a dynamo export needs trust_remote_code=True) and call it as the model:
`exported(pixel_values=pixel_values).logits`.
"""

import logging
import sys
import warnings

from pcaa_hf.cli.arguments import (
    ArgumentParser,
    batch_shape,
    output_folder,
    positive_float,
    positive_int,
    reports_errors,
)
from pcaa_hf.data.builders import FOLDER_LAYOUTS
from pcaa_hf.inference.model_folders import load_saved_image_processor
from pcaa_hf.publishing.exporting import (
    DEFAULT_EXAMPLE_SIZE,
    EXPORT_FORMATS,
    dataset_images,
    export_to_folder,
    int8_quantizer,
)
from pcaa_hf.utils.process_settings import configure_cpu_process


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a PCAA folder written by save_pretrained")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="dynamo: torch.export's model.pt2; onnx: model.onnx (+ model.onnx.data) for ONNX Runtime; "
                             "openvino: openvino_model.xml/.bin")
    parser.add_argument("--output_dir", required=True, type=output_folder, help="folder to write the export to")
    parser.add_argument("--dynamic", action="store_true", default=True,
                        help="dynamic batch size, height and width (default)")
    parser.add_argument("--no_dynamic", "--static", dest="dynamic", action="store_false",
                        help="the batch size, height and width fixed to the example's")
    parser.add_argument("--example_size", nargs=2, type=positive_int, default=DEFAULT_EXAMPLE_SIZE,
                        metavar=("H", "W"),
                        help=f"the traced input's height and width; a static export takes only this size "
                             f"(default: {DEFAULT_EXAMPLE_SIZE[0]} {DEFAULT_EXAMPLE_SIZE[1]})")
    parser.add_argument("--example_batch_size", type=positive_int,
                        help="the traced input's batch size (default: 2 when dynamic, at least 2 there; 1 when static)")
    parser.add_argument("--check_shapes", nargs="+", type=batch_shape, metavar="BxHxW",
                        help="input shapes to compare the export with the eager model on (default: dynamic, the "
                             "example size at batch 1 and a larger batch at another size; static, the example shape)")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="largest max |exported - eager| accepted, relative to max(1, max |logits|) "
                             "(default: 1e-4)")
    parser.add_argument("--opset_version", type=positive_int, help="--format onnx: the ONNX opset (default: latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output_dir")
    int8 = parser.add_argument_group("int8 quantization (--format onnx)")
    int8.add_argument("--int8", action="store_true",
                      help="quantize to int8 (ONNX Runtime static quantization: int8 weights per output channel, "
                           "uint8 activations calibrated on training images)")
    int8.add_argument("--calibration_data", help="the data set folder whose train split calibrates, whose "
                                                 "validation split checks the int8 model")
    int8.add_argument("--dataset_type", choices=FOLDER_LAYOUTS, help="the layout of --calibration_data")
    int8.add_argument("--calibration_images", type=positive_int, default=8,
                      help="training images that calibrate the activations' ranges (default: 8)")
    int8.add_argument("--check_images", type=positive_int, default=4,
                      help="validation images the int8 model is checked on (default: 4)")
    int8.add_argument("--min_agreement", type=positive_float, default=0.98,
                      help="least share of pixels of each checked image whose class is the float32 model's "
                           "(default: 0.98)")
    args = parser.parse_args(argv)
    if args.opset_version is not None and args.format != "onnx":
        parser.error("--opset_version only applies to --format onnx")
    if args.int8 and args.format != "onnx":
        parser.error("--int8 only applies to --format onnx")
    if args.int8 and not args.dynamic:
        parser.error("--int8 needs a dynamic export: it is calibrated and checked on images of their own sizes")
    if args.int8 and args.check_shapes:
        parser.error("--check_shapes does not apply with --int8, which is checked on --check_images validation "
                     "images")
    if args.int8 and not (args.calibration_data and args.dataset_type):
        parser.error("--int8 needs --calibration_data and --dataset_type: the activations are calibrated on images")
    if not args.int8 and (args.calibration_data or args.dataset_type):
        parser.error("--calibration_data and --dataset_type only apply with --int8")
    if args.min_agreement > 1:
        parser.error(f"--min_agreement is a share of pixels, at most 1; got {args.min_agreement}")
    if args.dynamic and args.example_batch_size == 1:
        parser.error("--example_batch_size must be at least 2 with --dynamic: torch.export fixes an axis traced "
                     "at size 1")
    return args


@reports_errors
def main(argv=None):
    configure_cpu_process()
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = {} if args.opset_version is None else {"opset_version": args.opset_version}
    if args.int8:
        processor = load_saved_image_processor(args.model)
        images = dataset_images(args.dataset_type, args.calibration_data, processor, train=args.calibration_images,
                                validation=args.check_images)
        options.update(quantizer=int8_quantizer(images["train"]), check_inputs=images["validation"],
                       min_agreement=args.min_agreement, check_shapes=[])
    else:
        options["check_shapes"] = args.check_shapes
    with warnings.catch_warnings():
        # torch.export's and onnxscript's deprecation chatter about their own internals.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        report = export_to_folder(
            args.model, args.output_dir, args.format, dynamic=args.dynamic, example_size=args.example_size,
            batch_size=args.example_batch_size, tolerance=args.tolerance, overwrite=args.overwrite, **options,
        )
    axes = "dynamic batch size, height and width" if report.dynamic else "static shape"
    kind = "int8 " if args.int8 else ""
    print(f"Exported {args.model} as {kind}{report.format} ({axes}) to {report.output_dir}, traced on "
          f"{'x'.join(map(str, report.example_shape))} in {report.export_seconds:.1f} s.")
    print(f"Files: {', '.join(report.files)}")
    inputs = "validation images" if args.int8 else "random inputs"
    print(f"Reloaded and compared with the eager model ({str(report.dtype).removeprefix('torch.')}, {inputs}):")
    for check in report.checks:
        print(f"  {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
