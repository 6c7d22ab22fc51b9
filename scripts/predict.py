#!/usr/bin/env python
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
sub-folders below the folder given (val/city/x.png -> OUTPUT_DIR/city/x_mask.png). Files under --output-dir are never
taken as inputs. Two inputs that would write the same output names are refused. Existing outputs are replaced.

Examples:
    python scripts/predict.py pcaa-r50-cityscapes frame.png --output-dir predictions
    python scripts/predict.py pcaa-r50-cityscapes leftImg8bit/val --output-dir predictions --mode slide \\
        --crop-size 768 768 --scales 0.75 1.0 1.25 --flip --cams --cam-classes car person
"""

import os

# Large CPU tensors on transparent huge pages (torch reads THP_MEM_ALLOC_ENABLE at its first allocation): 7x fewer
# page faults, about 4 % faster inference on CPUs (docs/benchmarks.md). An explicit setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
from transformers.image_transforms import convert_to_rgb

# Importing pcaa_hf registers PCAA with the Auto classes.
from pcaa_hf.argument_types import positive_float, positive_int
from pcaa_hf.cpu_memory import reuse_freed_cpu_memory
from pcaa_hf.image_processing_pcaa import open_image, to_eight_bit
from pcaa_hf.inference import MODES, SegmentationInference
from pcaa_hf.visualisation import colourise, heatmap_overlay, overlay, palette_for, partial_class_activations

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
DEFAULT_TOP_CLASSES = 3

logger = logging.getLogger("predict")


class UserError(Exception):
    """A mistake in the command line or its files, reported as one line without a traceback."""


def opacity(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL",
                        help="a folder written by save_pretrained (with the image processor) or a Hub id; "
                             "Hub models load offline once cached")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or folders searched recursively")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the outputs (created if needed)")
    parser.add_argument("--mode", choices=MODES, default="whole",
                        help="whole: one forward per image; slide: overlapping windows, as the paper evaluates "
                             "Cityscapes (default: whole)")
    parser.add_argument("--crop-size", nargs=2, type=positive_int, metavar=("H", "W"),
                        help="window size in --mode slide, in pixels of the processed image (default: 768 768)")
    parser.add_argument("--stride", nargs=2, type=positive_int, metavar=("H", "W"),
                        help="window step in --mode slide (default: two thirds of the crop, the paper's overlap)")
    parser.add_argument("--scales", nargs="+", type=positive_float, default=[1.0], metavar="SCALE",
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
    chosen.add_argument("--cam-classes", nargs="+", metavar="NAME_OR_ID",
                        help="classes to draw with --cams, by name (any case; '-' or '_' for spaces) or id")
    chosen.add_argument("--top-classes", type=positive_int, metavar="N",
                        help=f"with --cams, draw the N classes covering most pixels of each image's prediction "
                             f"(default: {DEFAULT_TOP_CLASSES})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the model (default: cuda when available)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="warn about images that cannot be read and go on, instead of stopping at the first")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="load the model with the code files stored next to it rather than the installed pcaa_hf")
    args = parser.parse_args(argv)

    if (args.cam_classes or args.top_classes) and not args.cams:
        parser.error("--cam-classes and --top-classes choose what --cams draws; add --cams")
    if args.mode == "whole" and (args.crop_size or args.stride):
        parser.error("--crop-size and --stride only apply to --mode slide")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device here; use --device cpu")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir} exists and is not a folder")
    return args


def one_line(error):
    return " ".join(str(error).split())


def collect_images(inputs, output_dir):
    """
    (image path, output name) pairs, the output name being the path of the outputs below --output-dir without the
    `_mask.png`-style ending: a file's stem, or for an image found in a folder, its path inside that folder.
    """
    output_dir = output_dir.resolve()
    images = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            # Outputs written into a folder that is also searched must not come back as inputs on the next run.
            found = [(file, file.relative_to(path).with_suffix("")) for file in sorted(path.rglob("*"))
                     if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()
                     and output_dir not in file.resolve().parents]
            if not found:
                raise UserError(f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif path.is_file():
            found = [(path, Path(path.stem))]
        else:
            raise UserError(f"input {path} does not exist")
        for file, name in found:
            if name in images:
                raise UserError(f"inputs {images[name]} and {file} would both write {output_dir / name}_mask.png; "
                                "rename one or predict them in separate runs")
            images[name] = file
    return [(file, name) for name, file in images.items()]


def load_model(name, device, trust_remote_code):
    path = Path(name)
    if path.is_file():
        raise UserError(f"model {name} is a file; MODEL is a folder written by save_pretrained or a Hub id")
    if not path.exists() and not HUB_ID.fullmatch(name):
        raise UserError(f"model folder {name} does not exist")
    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, StrictDataclassError) as error:
        tried = "" if path.exists() else " (no folder of that name here, so it was tried as a Hub id)"
        raise UserError(f"cannot load the model {name}{tried}: {one_line(error)}") from error
    try:
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the image processor of {name}: {one_line(error)}") from error
    if model.config.num_labels > 256:
        raise UserError(f"model {name} has {model.config.num_labels} classes; palette PNG masks hold at most 256")
    if model.config.num_labels == 1:
        raise UserError(f"model {name} is a binary model with one label, whose class map holds 0 and 1 with a name "
                        "for one of them; masks and overlays need a name per class (train with num_labels=2)")
    return model.to(device).eval(), processor


def file_label(name):
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def resolve_classes(requested, id2label):
    """Class ids of --cam-classes entries (names, matched ignoring case and spacing, or ids), in the order given."""
    by_label = {file_label(name).lower(): index for index, name in id2label.items()}
    ids = []
    for entry in requested:
        index = by_label.get(file_label(entry).lower())
        if index is None and entry.isdigit() and int(entry) in id2label:
            index = int(entry)
        if index is None:
            raise UserError(f"--cam-classes: the model has no class {entry!r}; give a name or an id in "
                            f"[0, {len(id2label)}) (classes: {', '.join(id2label[i] for i in sorted(id2label))})")
        if index not in ids:
            ids.append(index)
    return ids


def top_classes(class_map, count):
    """The `count` classes covering most pixels, most first (fewer if fewer are predicted)."""
    ids, pixels = np.unique(class_map, return_counts=True)
    return [int(ids[i]) for i in np.argsort(-pixels, kind="stable")[:count]]


def describe(inference):
    text = ("whole image" if inference.mode == "whole" else
            f"sliding {inference.crop_size[0]}x{inference.crop_size[1]} windows every "
            f"{inference.stride[0]}x{inference.stride[1]} pixels")
    if inference.scales != (1.0,):
        text += f", scales {', '.join(f'{scale:g}' for scale in inference.scales)}"
    return text + (", flip" if inference.flip else "")


@dataclass
class Predictor:
    """Writes the outputs of one image at a time (see the module docstring for the files)."""

    model: torch.nn.Module
    processor: object
    inference: SegmentationInference
    output_dir: Path
    alpha: float
    device: str
    cams: bool
    cam_class_ids: list | None
    top_classes: int

    def __post_init__(self):
        self.palette = palette_for(self.model.config.id2label)

    def read(self, source):
        """
        The processed pixel values, and the image as RGB to draw on: 16-bit values and transparency converted as
        the processor converts them (PIL's own RGB conversion would clip the one and drop the other).
        """
        try:
            image = to_eight_bit(open_image(source))
        except (OSError, ValueError) as error:  # open_image's messages name the file
            raise UserError(one_line(error)) from error
        try:
            pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"]
        except ValueError as error:
            raise UserError(f"cannot preprocess image {source}: {one_line(error)}") from error
        return pixel_values.to(self.device), Image.fromarray(convert_to_rgb(image, return_numpy=True))

    def write(self, source, name):
        """The paths written for the image `source`, named `name` below the output folder."""
        pixel_values, rgb = self.read(source)
        logits = self.inference.logits(self.model, pixel_values, output_size=(rgb.height, rgb.width))
        class_map = logits[0].argmax(dim=0).cpu().numpy()

        prefix = self.output_dir / name
        prefix.parent.mkdir(parents=True, exist_ok=True)
        mask_path, overlay_path = Path(f"{prefix}_mask.png"), Path(f"{prefix}_overlay.png")
        colourise(class_map, self.palette).save(mask_path)
        overlay(rgb, class_map, self.palette, self.alpha).save(overlay_path)
        if not self.cams:
            return [mask_path, overlay_path]
        class_ids = self.cam_class_ids or top_classes(class_map, self.top_classes)
        return [mask_path, overlay_path, *self.write_cams(pixel_values, rgb, class_ids, prefix, source)]

    def write_cams(self, pixel_values, rgb, class_ids, prefix, source):
        """The heatmaps of `class_ids` for every PCAA module, and every class's region class scores as JSON."""
        _, activation_maps, region_scores = partial_class_activations(self.model, pixel_values)
        id2label = self.model.config.id2label
        written = []
        modules = []
        for module, (activations, scores) in enumerate(zip(activation_maps, region_scores)):
            activations, scores = activations[0].float().cpu(), scores[0].float().cpu()
            for class_id in class_ids:
                label = file_label(id2label[class_id]) or str(class_id)
                cam_path = Path(f"{prefix}_cam{module}_{label}.png")
                heatmap_overlay(rgb, activations[class_id].numpy(), self.alpha).save(cam_path)
                # heatmap_overlay resizes bilinearly; tiles expanded to the image first keep each region flat.
                tiles = F.interpolate(scores[class_id][None, None], size=(rgb.height, rgb.width), mode="nearest")
                regions_path = Path(f"{prefix}_regions{module}_{label}.png")
                heatmap_overlay(rgb, tiles[0, 0].numpy(), self.alpha).save(regions_path)
                written += [cam_path, regions_path]
            modules.append({"bins": list(scores.shape[-2:]),
                            "region_class_scores": {id2label[k]: scores[k].tolist() for k in sorted(id2label)}})
        json_path = Path(f"{prefix}_regions.json")
        json_path.write_text(json.dumps({"image": str(source), "modules": modules}))
        return written + [json_path]


def run(args):
    images = collect_images(args.inputs, args.output_dir)
    model, processor = load_model(args.model, args.device, args.trust_remote_code)
    if args.cams and model.config.model_type != "pcaa":
        raise UserError(f"--cams needs a PCAA model; {args.model} is a {model.config.model_type!r} model")
    inference = SegmentationInference(
        mode=args.mode, scales=tuple(args.scales), flip=args.flip,
        **{name: tuple(value) for name, value in (("crop_size", args.crop_size), ("stride", args.stride)) if value},
    )
    predictor = Predictor(
        model, processor, inference, args.output_dir, args.alpha, args.device, args.cams,
        cam_class_ids=resolve_classes(args.cam_classes, model.config.id2label) if args.cam_classes else None,
        top_classes=args.top_classes or DEFAULT_TOP_CLASSES,
    )
    logger.info("Loaded %s (%d classes) on %s; inference on the %s", args.model, model.config.num_labels,
                args.device, describe(inference))
    args.output_dir.mkdir(parents=True, exist_ok=True)

    skipped = 0
    start = time.perf_counter()
    with logging_redirect_tqdm(), torch.inference_mode():
        for source, name in tqdm(images, unit="image", disable=None):
            try:
                written = predictor.write(source, name)
            except UserError as error:
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


def main(argv=None):
    args = parse_args(argv)
    reuse_freed_cpu_memory()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
