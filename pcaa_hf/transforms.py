"""Training and evaluation transforms for `datasets` splits (`with_transform`/`set_transform`), and their collate.

The training transform is the paper's: random keep-ratio rescale (ratio 0.5-2.0 of the base size), random crop with
cat_max_ratio 0.75 (10 tries), horizontal flip, photometric distortion, normalisation, padding to the crop size. It
computes only the crop of the rescaled image — the same pixels as rescaling the whole image and cropping, at a
fraction of the work — and stays in uint8 until normalisation. All randomness comes from a seeded generator.
"""

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .image_processing_pcaa import PCAAImageProcessor, keep_ratio_size

IGNORE_INDEX = 255


def resize_indices(source_length, target_length, start, stop):
    """
    Bilinear source indices and weights (align_corners=False, as OpenCV's INTER_LINEAR) for target positions
    [start, stop) of an axis resized from `source_length` to `target_length`.
    """
    scale = source_length / target_length
    position = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5
    position = np.clip(position, 0, source_length - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, source_length - 1)
    return low, high, (position - low).astype(np.float32)


def nearest_indices(source_length, target_length, start, stop):
    """Nearest-neighbour source indices: floor(x * source / target) in float32, as torch's "nearest" (and OpenCV)."""
    scale = np.float32(source_length) / np.float32(target_length)
    positions = np.arange(start, stop, dtype=np.float32) * scale
    return np.minimum(np.floor(positions).astype(np.int64), source_length - 1)


def resized_crop(image, size, top, left, height, width):
    """
    Rows [top, top+height) and columns [left, left+width) of `image` (H, W, C) uint8 resized bilinearly to `size`
    (h, w), computed from the source pixels they need only. Rounded back to uint8 as OpenCV does.
    """
    rows = resize_indices(image.shape[0], size[0], top, top + height)
    cols = resize_indices(image.shape[1], size[1], left, left + width)
    row_low, row_high = image[rows[0]].astype(np.float32), image[rows[1]].astype(np.float32)
    blended = row_low + (row_high - row_low) * rows[2][:, None, None]
    col_low, col_high = blended[:, cols[0]], blended[:, cols[1]]
    out = col_low + (col_high - col_low) * cols[2][None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def rgb_to_hsv(image):
    """uint8 RGB -> H in [0, 180), S and V in [0, 255], rounded to integers (OpenCV's 8-bit HSV convention)."""
    rgb = image.astype(np.float32)
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, 255.0 * delta / np.maximum(value, 1e-6), 0.0)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-6)
    hue = np.where(value == red, (green - blue) / safe, np.where(value == green, 2.0 + (blue - red) / safe,
                                                                  4.0 + (red - green) / safe))
    hue = np.where(delta > 0, np.rint(hue * 30.0) % 180.0, 0.0)
    return np.stack([hue, np.rint(saturation), value], axis=-1)


def hsv_to_rgb(hsv):
    """The inverse of `rgb_to_hsv`, rounded to uint8."""
    hue, saturation, value = hsv[..., 0] / 30.0, hsv[..., 1] / 255.0, hsv[..., 2]
    sector = np.floor(hue).astype(np.int64) % 6
    fraction = hue - np.floor(hue)
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    channels = [np.choose(sector, [choice[c] for choice in choices]) for c in range(3)]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def scale_and_shift(image, alpha=1.0, beta=0.0):
    """uint8 -> clip(image * alpha + beta) truncated to uint8, as the authors' `convert`."""
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """
    mmsegmentation's / the authors' PhotoMetricDistortion on a uint8 RGB image: brightness, then contrast either first
    or last, saturation and hue in HSV; each step with probability 1/2.
    """
    if rng.integers(2):
        image = scale_and_shift(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        image = scale_and_shift(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 255).astype(np.uint8)
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-hue_delta, hue_delta, endpoint=False)) % 180
        image = hsv_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        image = scale_and_shift(image, alpha=rng.uniform(*contrast_range))
    return image


def normalise(image, mean, std, scale):
    """uint8 (H, W, 3) -> float32 (3, H, W): (image * scale - mean) / std."""
    factor = (scale / np.asarray(std, dtype=np.float32)).astype(np.float32)
    offset = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)).astype(np.float32)
    return np.ascontiguousarray((image.astype(np.float32) * factor - offset).transpose(2, 0, 1))


def as_arrays(image, label):
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return image, np.asarray(label).astype(np.int64)


class SeededTransform:
    """
    Randomness from a generator seeded with (seed, DataLoader worker id, call number): the same seed and the same
    loading setup give the same batches, and every worker draws its own numbers.
    """

    def __init__(self, seed=0):
        self.seed = seed
        self.calls = 0

    def next_generator(self):
        worker = get_worker_info()
        self.calls += 1
        return np.random.default_rng([self.seed, 0 if worker is None else worker.id + 1, self.calls])


class TrainTransform(SeededTransform):
    """
    The paper's training augmentation for a batch of `{"image", "label"}` examples, giving `pixel_values` (3, ch, cw)
    float32 and `labels` (ch, cw) int64. `base_size` and `crop_size` are (width, height) as in the authors' scripts
    (Cityscapes: base (2048, 1024), crop (768, 768); ADE20K: base (2048, 512), crop (512, 512)).
    """

    def __init__(self, base_size=(2048, 1024), crop_size=(768, 768), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 flip_probability=0.5, photometric=True, image_processor=None, seed=0):
        super().__init__(seed)
        self.base_size, self.crop_size = tuple(base_size), tuple(crop_size)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio
        self.flip_probability, self.photometric = flip_probability, photometric
        processor = image_processor or PCAAImageProcessor()
        self.mean, self.std, self.scale = processor.image_mean, processor.image_std, processor.rescale_factor

    def __call__(self, batch):
        rng = self.next_generator()
        pixel_values, labels = [], []
        for image, label in zip(batch["image"], batch["label"]):
            image, label = self.augment(*as_arrays(image, label), rng)
            pixel_values.append(image)
            labels.append(label)
        return {"pixel_values": pixel_values, "labels": labels}

    def augment(self, image, label, rng):
        height, width = label.shape
        if image.shape[:2] != label.shape:
            raise ValueError(f"Image of size {image.shape[:2]} and label of size {label.shape} do not match.")
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.base_size[0] * ratio), int(self.base_size[1] * ratio))
        size = keep_ratio_size(height, width, max(scale), min(scale))
        crop_width, crop_height = self.crop_size
        top, left = self.choose_crop(label, size, rng)
        crop_h, crop_w = min(crop_height, size[0] - top), min(crop_width, size[1] - left)

        image = resized_crop(image, size, top, left, crop_h, crop_w)
        label = self.label_crop(label, size, top, left, crop_h, crop_w)
        if rng.random() < self.flip_probability:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        pixels = np.zeros((3, crop_height, crop_width), dtype=np.float32)
        pixels[:, :crop_h, :crop_w] = normalise(image, self.mean, self.std, self.scale)
        padded_label = np.full((crop_height, crop_width), IGNORE_INDEX, dtype=np.int64)
        padded_label[:crop_h, :crop_w] = label
        return pixels, padded_label

    @staticmethod
    def label_crop(label, size, top, left, height, width):
        rows = nearest_indices(label.shape[0], size[0], top, top + height)
        cols = nearest_indices(label.shape[1], size[1], left, left + width)
        return label[rows[:, None], cols[None, :]]

    def choose_crop(self, label, size, rng):
        """
        The authors' random crop: offsets uniform over the margin; while no class covers less than `cat_max_ratio`
        of the crop (ignored pixels excluded, at least two classes), draw again, up to 10 checks.
        """
        crop_width, crop_height = self.crop_size
        margin_h, margin_w = max(size[0] - crop_height, 0), max(size[1] - crop_width, 0)
        top, left = rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = self.label_crop(label, size, top, left, min(crop_height, size[0] - top),
                                       min(crop_width, size[1] - left))
                counts = np.bincount(crop[crop != IGNORE_INDEX].ravel())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)
        return int(top), int(left)


class EvalTransform:
    """
    Evaluation: the image prepared exactly as `image_processor` prepares it for inference (normalised; keep-ratio
    resized to `base_size` (width, height) when given), the label kept at its original resolution for scoring.
    """

    def __init__(self, base_size=None, image_processor=None):
        self.processor = image_processor or PCAAImageProcessor()
        self.resize = {} if base_size is None else {
            "do_resize": True, "size": {"longest_edge": max(base_size), "shortest_edge": min(base_size)}}

    def __call__(self, batch):
        pixel_values = self.processor(images=list(batch["image"]), **self.resize)["pixel_values"]
        labels = [np.asarray(label).astype(np.int64) for label in batch["label"]]
        return {"pixel_values": pixel_values, "labels": labels}


def collate(examples):
    """
    Stack examples into `pixel_values` (B, 3, H, W) float32 and `labels` (B, H, W) int64, padding to the largest
    size in the batch (image 0, label 255) where sizes differ.
    """
    height = max(example["pixel_values"].shape[-2] for example in examples)
    width = max(example["pixel_values"].shape[-1] for example in examples)
    label_height = max(np.shape(example["labels"])[0] for example in examples)
    label_width = max(np.shape(example["labels"])[1] for example in examples)
    pixel_values = torch.zeros(len(examples), 3, height, width, dtype=torch.float32)
    labels = torch.full((len(examples), label_height, label_width), IGNORE_INDEX, dtype=torch.int64)
    for index, example in enumerate(examples):
        image = torch.as_tensor(example["pixel_values"])
        label = torch.as_tensor(np.asarray(example["labels"]), dtype=torch.int64)
        pixel_values[index, :, : image.shape[-2], : image.shape[-1]] = image
        labels[index, : label.shape[0], : label.shape[1]] = label
    return {"pixel_values": pixel_values, "labels": labels}
