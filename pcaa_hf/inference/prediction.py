"""Segmenting image files with a saved model: colour masks, overlays and pictures of what each PCAA module attends to.

`find_images` lists the images of files and folders, `load_model` loads a model and its image processor for this,
and a `Predictor` writes the files of one image at a time. For each image, named `name` below the output folder:
  <name>_mask.png      the class map as a palette PNG in the label set's colours (the official Cityscapes or ADE20K
                       palette, generated colours otherwise); pixel values are class ids
  <name>_overlay.png   the class colours blended over the image
With `cams`, for each chosen class and each PCAA module m (counted from 0):
  <name>_cam<m>_<class>.png      the module's partial class activation map (sigmoid scores) as a heatmap
  <name>_regions<m>_<class>.png  the module's region class scores, one flat tile per region, as a heatmap
  <name>_regions.json            the region class scores of every class, per module
Class names in file names have spaces and other symbols replaced by "-" (e.g. traffic-light).

Each image goes through the model's image processor (which may rescale it: ADE20K models fit images into 2048x512)
and the model runs at that size; the logits are then resized to the image's own size. Mistakes in the inputs (a
missing file, an unreadable image, an unknown class) raise `PredictionError` with a one-line message naming them.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_transforms import convert_to_rgb

import pcaa_hf  # noqa: F401  (registers PCAA with the Auto classes)
from pcaa_hf.inference.model_folders import load_saved_image_processor, load_saved_model, one_line
from pcaa_hf.inference.segmentation_inference import SegmentationInference
from pcaa_hf.inference.visualisation import (
    colourise,
    heatmap_overlay,
    overlay,
    palette_for,
    partial_class_activations,
    pcaa_modules,
)
from pcaa_hf.model.image_processing_pcaa import open_image, to_eight_bit

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
DEFAULT_TOP_CLASSES = 3


class PredictionError(ValueError):
    """A mistake in the inputs of a prediction (files, model, classes), said in one line."""


def find_images(inputs, output_dir):
    """
    (image path, output name) pairs of image files and folders (searched recursively for `IMAGE_SUFFIXES`), the
    output name being the path of the outputs below `output_dir` without the `_mask.png`-style ending: a file's
    stem, or for an image found in a folder, its path inside that folder (val/city/x.png -> city/x). Files under
    `output_dir` are never taken as inputs; two inputs that would write the same output names are refused.
    """
    output_dir = Path(output_dir).resolve()
    images = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            # Outputs written into a folder that is also searched must not come back as inputs on the next run.
            found = [(file, file.relative_to(path).with_suffix("")) for file in sorted(path.rglob("*"))
                     if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()
                     and output_dir not in file.resolve().parents]
            if not found:
                raise PredictionError(f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif path.is_file():
            found = [(path, Path(path.stem))]
        else:
            raise PredictionError(f"input {path} does not exist")
        for file, name in found:
            if name in images:
                raise PredictionError(f"inputs {images[name]} and {file} would both write {output_dir / name}"
                                      "_mask.png; rename one or predict them in separate runs")
            images[name] = file
    return [(file, name) for name, file in images.items()]


def load_model(name, device, trust_remote_code=False):
    """The model (in eval mode on `device`) and image processor of a save_pretrained folder or Hub id `name`."""
    model = load_saved_model(name, trust_remote_code=trust_remote_code)
    processor = load_saved_image_processor(name, trust_remote_code=trust_remote_code)
    if model.config.num_labels > 256:
        raise PredictionError(f"model {name} has {model.config.num_labels} classes; palette PNG masks hold at most "
                              "256")
    if model.config.num_labels == 1:
        raise PredictionError(f"model {name} is a binary model with one label, whose class map holds 0 and 1 with a "
                              "name for one of them; masks and overlays need a name per class (train with "
                              "num_labels=2)")
    return model.to(device).eval(), processor


def file_label(name):
    """A class name as file names spell it: runs of other symbols than letters, digits and dots become "-"."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def resolve_classes(requested, id2label):
    """Class ids of class names (matched ignoring case and spacing) or ids, in the order given, each once."""
    by_label = {file_label(name).lower(): index for index, name in id2label.items()}
    ids = []
    for entry in requested:
        index = by_label.get(file_label(entry).lower())
        if index is None and entry.isdigit() and int(entry) in id2label:
            index = int(entry)
        if index is None:
            raise PredictionError(f"the model has no class {entry!r}; give a name or an id in [0, {len(id2label)}) "
                                  f"(classes: {', '.join(id2label[i] for i in sorted(id2label))})")
        if index not in ids:
            ids.append(index)
    return ids


def top_classes(class_map, count):
    """The `count` classes covering most pixels, most first (fewer if fewer are predicted)."""
    ids, pixels = np.unique(class_map, return_counts=True)
    return [int(ids[i]) for i in np.argsort(-pixels, kind="stable")[:count]]


def describe(inference):
    """The inference settings in words: "whole image", "sliding 768x768 windows every 512x512 pixels, flip", ..."""
    text = ("whole image" if inference.mode == "whole" else
            f"sliding {inference.crop_size[0]}x{inference.crop_size[1]} windows every "
            f"{inference.stride[0]}x{inference.stride[1]} pixels")
    if inference.scales != (1.0,):
        text += f", scales {', '.join(f'{scale:g}' for scale in inference.scales)}"
    return text + (", flip" if inference.flip else "")


@dataclass
class Predictor:
    """
    Writes the outputs of one image at a time (see the module docstring for the files). `cam_class_ids`: the
    classes drawn with `cams`; None draws the `top_classes` classes covering most pixels of each prediction.
    """

    model: torch.nn.Module
    processor: object
    inference: SegmentationInference
    output_dir: Path
    alpha: float = 0.5
    device: str = "cpu"
    cams: bool = False
    cam_class_ids: list | None = None
    top_classes: int = DEFAULT_TOP_CLASSES

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.palette = palette_for(self.model.config.id2label)
        if self.cams:
            try:
                pcaa_modules(self.model)
            except ValueError as error:
                raise PredictionError(f"--cams: {error}") from None

    def read(self, source):
        """
        The processed pixel values, and the image as RGB to draw on: 16-bit values and transparency converted as
        the processor converts them (PIL's own RGB conversion would clip the one and drop the other).
        """
        try:
            image = to_eight_bit(open_image(source))
        except (OSError, ValueError) as error:  # open_image's messages name the file
            raise PredictionError(one_line(error)) from error
        try:
            pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"]
        except ValueError as error:
            raise PredictionError(f"cannot preprocess image {source}: {one_line(error)}") from error
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
        return [*written, json_path]


__all__ = ["DEFAULT_TOP_CLASSES", "IMAGE_SUFFIXES", "PredictionError", "Predictor", "describe", "file_label",
           "find_images", "load_model", "resolve_classes", "top_classes"]
