"""Segment images with a PCAA model: colour masks, overlays and, with --cams, what each PCAA module attends to.

Each image goes through the model's image processor (which may rescale it: ADE20K models fit images into 2048x512)
and the model runs at that size; the logits are then resized to the image's own size. For every image:
  <stem>_mask.png      the class map as a palette PNG in the label set's colours (the official Cityscapes or ADE20K
                       palette, generated colours otherwise); pixel values are class ids
  <stem>_overlay.png   the class colours blended over the image
With --cams, for each chosen class and each PCAA module m (counted from 0):
  <stem>_cam<m>_<class>.png      the module's partial class activation map (sigmoid scores) as a heatmap
  <stem>_regions<m>_<class>.png  the module's region class scores, one flat tile per region, as a heatmap
  <stem>_regions.json            the region class scores of every class, per module
Class names in file names have spaces and other symbols replaced by "-" (e.g. traffic-light).

Folders are searched recursively for .bmp, .jpeg, .jpg, .png, .tif, .tiff and .webp files; their outputs keep the
sub-folders below the folder given (val/city/x.png -> OUTPUT_DIR/city/x_mask.png). Files under --output_dir are never
taken as inputs. Two inputs that would write the same output names are refused. Existing outputs are replaced.

Examples:
    python scripts/predict.py pcaa-r50-cityscapes frame.png --output_dir predictions
    python scripts/predict.py pcaa-r50-cityscapes leftImg8bit/val --output_dir predictions --mode slide \\
        --crop_size 768 768 --scales 0.75 1.0 1.25 --flip --cams --cam_classes car person
"""

import logging
import sys
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pcaa_hf.cli.arguments import ArgumentParser, image_scale, opacity, output_folder, positive_int, reports_errors
from pcaa_hf.inference.prediction import (
    DEFAULT_TOP_CLASSES,
    PredictionError,
    Predictor,
    describe,
    find_images,
    load_model,
    resolve_classes,
)
from pcaa_hf.inference.segmentation_inference import MODES, SegmentationInference
from pcaa_hf.utils.process_settings import configure_cpu_process

logger = logging.getLogger("predict")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("model", metavar="MODEL",
                        help="a folder written by save_pretrained (with the image processor) or a Hub id; "
                             "Hub models load offline once cached")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or folders searched recursively")
    parser.add_argument("--output_dir", required=True, type=output_folder,
                        help="folder for the outputs (created if needed)")
    parser.add_argument("--mode", choices=MODES, default="whole",
                        help="whole: one forward per image; slide: overlapping windows, as the paper evaluates "
                             "Cityscapes (default: whole)")
    parser.add_argument("--crop_size", nargs=2, type=positive_int, metavar=("H", "W"),
                        help="window size in --mode slide, in pixels of the processed image (default: 768 768)")
    parser.add_argument("--stride", nargs=2, type=positive_int, metavar=("H", "W"),
                        help="window step in --mode slide (default: two thirds of the crop, the paper's overlap)")
    parser.add_argument("--scales", nargs="+", type=image_scale, default=[1.0], metavar="SCALE",
                        help="rescale the processed image by each factor and average the logits (the paper's "
                             "multi-scale test: 0.5 0.75 1.0 1.25 1.5 1.75; default: 1.0)")
    parser.add_argument("--flip", action="store_true", help="also average the logits of the mirrored image")
    parser.add_argument("--alpha", type=opacity, default=0.5,
                        help="opacity of the colours in the overlay and the heatmaps (default: 0.5)")
    parser.add_argument("--cams", action="store_true",
                        help="also write the partial class activation maps and region class scores of every PCAA "
                             "module; they come from one extra forward of the whole image at the processor's size, "
                             "whatever --mode, --scales and --flip say")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--cam_classes", nargs="+", metavar="NAME_OR_ID",
                        help="classes to draw with --cams, by name (any case; '-' or '_' for spaces) or id")
    chosen.add_argument("--top_classes", type=positive_int, metavar="N",
                        help=f"with --cams, draw the N classes covering most pixels of each image's prediction "
                             f"(default: {DEFAULT_TOP_CLASSES})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the model (default: cuda when available)")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="warn about images that cannot be read and go on, instead of stopping at the first")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="load the model with the code files stored next to it rather than the installed pcaa_hf")
    args = parser.parse_args(argv)

    if (args.cam_classes or args.top_classes) and not args.cams:
        parser.error("--cam_classes and --top_classes choose what --cams draws; add --cams")
    if args.mode == "whole" and (args.crop_size or args.stride):
        parser.error("--crop_size and --stride only apply to --mode slide")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device here; use --device cpu")
    return args


def cam_class_ids(args, id2label):
    """The ids of --cam_classes, or None (the top classes of each image)."""
    if not args.cam_classes:
        return None
    try:
        return resolve_classes(args.cam_classes, id2label)
    except PredictionError as error:
        raise PredictionError(f"--cam_classes: {error}") from error


def run(args):
    images = find_images(args.inputs, args.output_dir)
    model, processor = load_model(args.model, args.device, args.trust_remote_code)
    inference = SegmentationInference(
        mode=args.mode, scales=tuple(args.scales), flip=args.flip,
        **{name: tuple(value) for name, value in (("crop_size", args.crop_size), ("stride", args.stride)) if value},
    )
    predictor = Predictor(model, processor, inference, args.output_dir, args.alpha, args.device, args.cams,
                          cam_class_ids=cam_class_ids(args, model.config.id2label),
                          top_classes=args.top_classes or DEFAULT_TOP_CLASSES)
    logger.info("Loaded %s (%d classes) on %s; inference on the %s", args.model, model.config.num_labels,
                args.device, describe(inference))
    args.output_dir.mkdir(parents=True, exist_ok=True)

    skipped = 0
    start = time.perf_counter()
    with logging_redirect_tqdm(), torch.inference_mode():
        for source, name in tqdm(images, unit="image", disable=None):
            try:
                written = predictor.write(source, name)
            except PredictionError as error:
                if not args.skip_invalid:
                    raise
                logger.warning("Skipped: %s", error)
                skipped += 1
                continue
            logger.info("%s -> %s", source, ", ".join(str(path.relative_to(args.output_dir)) for path in written))
    processed = len(images) - skipped
    elapsed = time.perf_counter() - start
    per_image = f", {elapsed / processed:.2f} s per image" if processed else ""
    print(f"Processed {processed} of {len(images)} images ({skipped} skipped) in {elapsed:.1f} s{per_image} "
          f"on {args.device}; outputs in {args.output_dir}")


@reports_errors
def main(argv=None):
    args = parse_args(argv)
    configure_cpu_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
