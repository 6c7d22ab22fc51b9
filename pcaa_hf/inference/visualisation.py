"""Predictions as pictures: class maps in a data set's palette, overlays on the image, the Cityscapes test server's
label-id format, and PCAA's partial class activation maps and region class scores as heatmaps."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pcaa_hf.data.label_sets import LABEL_SETS, PALETTES, TRAIN_ID_TO_CITYSCAPES_ID

# Colour stops of the heatmap ramp (black -> purple -> red -> orange -> pale yellow), evenly spaced over [0, 1].
HEATMAP_STOPS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)


def generated_palette(num_labels):
    """Distinct colours for any number of classes: the PASCAL VOC scheme, spreading each id's bits over R, G, B."""
    palette = np.zeros((num_labels, 3), dtype=np.uint8)
    ids = np.arange(num_labels)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


def palette_for(id2label):
    """(K, 3) uint8 colours for a label set: the official palette for Cityscapes or ADE20K, generated otherwise."""
    names = tuple(id2label[index] for index in sorted(id2label))
    for name, labels in LABEL_SETS.items():
        if names == labels:
            return np.array(PALETTES[name], dtype=np.uint8)
    return generated_palette(len(names))


def colourise(class_map, palette):
    """A (H, W) class-id map as a palette ("P" mode) PNG-ready image; ids without a colour (e.g. 255) are black."""
    class_map = np.asarray(class_map)
    if class_map.size and (class_map.min() < 0 or class_map.max() > 255):
        raise ValueError(f"Palette images hold ids 0-255, got values in [{class_map.min()}, {class_map.max()}].")
    image = Image.fromarray(class_map.astype(np.uint8), mode="P")
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: min(len(palette), 256)] = palette[:256]
    image.putpalette(colours.tobytes())
    return image


def overlay(image, class_map, palette, alpha=0.5):
    """The RGB image with the class map's colours blended in at `alpha` (ids without a colour are left as is)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    class_map = np.asarray(class_map)
    if class_map.shape != rgb.shape[:2]:
        raise ValueError(f"The class map {class_map.shape} and the image {rgb.shape[:2]} differ in size.")
    coloured = class_map < len(palette)
    colours = np.asarray(palette, dtype=np.float32)[np.where(coloured, class_map, 0)]
    blended = np.where(coloured[..., None], (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(np.rint(blended).astype(np.uint8))


def cityscapes_label_ids(train_ids):
    """Train ids -> Cityscapes label ids (uint8), the format the Cityscapes test server and scripts expect."""
    table = np.zeros(256, dtype=np.uint8)
    for train_id, label_id in TRAIN_ID_TO_CITYSCAPES_ID.items():
        table[train_id] = label_id
    train_ids = np.asarray(train_ids)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= len(TRAIN_ID_TO_CITYSCAPES_ID)):
        raise ValueError(f"Cityscapes train ids lie in [0, {len(TRAIN_ID_TO_CITYSCAPES_ID)}), got values in "
                         f"[{train_ids.min()}, {train_ids.max()}].")
    return table[train_ids]


def heatmap(values):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours on a perceptually ordered dark-to-bright ramp."""
    position = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(HEATMAP_STOPS) - 1)
    low = np.minimum(np.floor(position).astype(np.int64), len(HEATMAP_STOPS) - 2)
    weight = (position - low)[..., None]
    return np.rint((1 - weight) * HEATMAP_STOPS[low] + weight * HEATMAP_STOPS[low + 1]).astype(np.uint8)


def heatmap_overlay(image, values, alpha=0.6):
    """The RGB image with `heatmap(values)` (resized to the image, bilinear) blended in at `alpha`."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]
    values = F.interpolate(values, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    return Image.fromarray(np.rint((1 - alpha) * rgb + alpha * heatmap(values)).astype(np.uint8))


def pcaa_modules(model):
    """
    The PCAA modules of `model`'s decode head; a ValueError for a model without them (another model type, or a
    baseline head of the paper's Table 3).
    """
    config = model.config
    if config.model_type != "pcaa":
        raise ValueError(f"class activations need a PCAA model, got a {config.model_type!r} model")
    # Folders saved before the baseline heads carry a configuration without the field: those are PCAA's.
    head = getattr(config, "decode_head_type", "pcaa")
    if head != "pcaa":
        raise ValueError(f"class activations are what PCAA modules attend to, and the model's {head!r} head (a "
                         "baseline of the paper's Table 3) has none")
    return model.decode_head.pcaa_modules


@torch.inference_mode()
def partial_class_activations(model, pixel_values):
    """
    Run `model` (a `PCAAForSemanticSegmentation`) on (B, 3, H, W) `pixel_values` and capture what each PCAA module
    attends with: its class activation map (B, K, h, w) as per-pixel sigmoid scores, and its region class scores
    (B, K, bins_rows, bins_columns). Returns (outputs, activation maps, region class scores), one of each per module.
    """
    activation_maps = []
    hooks = [module.cam_classifier.register_forward_hook(lambda _, __, output: activation_maps.append(output.sigmoid()))
             for module in pcaa_modules(model)]
    try:
        outputs = model(pixel_values=pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, tuple(activation_maps), outputs.region_class_scores


__all__ = ["cityscapes_label_ids", "colourise", "generated_palette", "heatmap", "heatmap_overlay", "overlay",
           "palette_for", "partial_class_activations", "pcaa_modules"]
