"""Training and evaluation transforms for `datasets` splits (`with_transform`/`set_transform`), and their collate.

The training transform is the paper's: random keep-ratio rescale (ratio 0.5-2.0 of the base size), random crop with
cat_max_ratio 0.75 (10 tries), horizontal flip, photometric distortion, normalisation, padding to the crop size. It
computes only the crop of the rescaled image — the same pixels as rescaling the whole image and cropping, at a
fraction of the work — and stays in uint8 until normalisation. All randomness comes from a seeded generator.
"""

import numpy as np
import torch
from torch.utils.data import get_worker_info
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import ChannelDimension

from pcaa_hf.model.image_processing_pcaa import PCAAImageProcessor, keep_ratio_size, open_image, to_eight_bit

from .label_sets import IGNORE_INDEX


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
    """
    Nearest-neighbour source indices: floor(x * source / target) in float32, as torch's "nearest" (and the processor).
    """
    scale = np.float32(source_length) / np.float32(target_length)
    positions = np.arange(start, stop, dtype=np.float32) * scale
    return np.minimum(np.floor(positions).astype(np.int64), source_length - 1)


def resized_crop(image, size, top, left, height, width):
    """
    Rows [top, top+height) and columns [left, left+width) of `image` (H, W, C) uint8 resized bilinearly to `size`
    (h, w), computed from the source pixels they need only, and rounded back to uint8 as OpenCV does.
    """
    row_low, row_high, row_weight = resize_indices(image.shape[0], size[0], top, top + height)
    col_low, col_high, col_weight = resize_indices(image.shape[1], size[1], left, left + width)
    first, last = int(col_low.min()), int(col_high.max()) + 1
    source = torch.from_numpy(image)[:, first:last]
    rows = torch.lerp(source.index_select(0, torch.from_numpy(row_low)).float(),
                      source.index_select(0, torch.from_numpy(row_high)).float(),
                      torch.from_numpy(row_weight)[:, None, None])
    out = torch.lerp(rows.index_select(1, torch.from_numpy(col_low - first)),
                     rows.index_select(1, torch.from_numpy(col_high - first)),
                     torch.from_numpy(col_weight)[None, :, None])
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def channel_planes(image):
    """uint8 (H, W, 3) -> float32 red, green, blue planes and their max (value), min and max - min (chroma)."""
    red, green, blue = (image[..., c].astype(np.float32) for c in range(3))
    value = np.maximum(np.maximum(red, green), blue)
    chroma = value - np.minimum(np.minimum(red, green), blue)
    return red, green, blue, value, chroma


def to_uint8_image(red, green, blue):
    return np.clip(np.rint(np.stack([red, green, blue], axis=-1)), 0, 255).astype(np.uint8)


def adjust_saturation(image, alpha):
    """
    Scale the HSV saturation of a uint8 RGB image by `alpha` (clipped at full saturation), keeping hue and value:
    the 8-bit HSV saturation S = 255 * chroma / value becomes trunc(clip(S * alpha)), as the authors' step does, and
    every channel moves along its line to the value channel.
    """
    red, green, blue, value, chroma = channel_planes(image)
    saturation = np.rint(255.0 * chroma / np.maximum(value, 1.0))
    scaled = np.clip(saturation * alpha, 0, 255).astype(np.uint8).astype(np.float32)
    ratio = np.where(saturation > 0, scaled / np.maximum(saturation, 1.0), 1.0)
    return to_uint8_image(*(value - (value - channel) * ratio for channel in (red, green, blue)))


def shift_hue(image, delta):
    """
    Rotate the hue of a uint8 RGB image by `delta` OpenCV hue units (2 degrees), keeping saturation and value.
    """
    red, green, blue, value, chroma = channel_planes(image)
    inverse = 1.0 / np.maximum(chroma, 1e-6)
    # Hue in units of 60 degrees, in (-1, 5]: which channel is the maximum decides the sector.
    hue = np.where(value == red, (green - blue) * inverse,
                   np.where(value == green, (blue - red) * inverse + 2.0, (red - green) * inverse + 4.0))
    hue += delta / 30.0

    def channel(n):
        k = hue + n  # in (n - 2, n + 6): one wrap-around at 6 is enough
        k -= 6.0 * (k >= 6.0)
        k += 6.0 * (k < 0.0)
        return value - chroma * np.maximum(np.minimum(np.minimum(k, 4.0 - k), 1.0), 0.0)

    return to_uint8_image(channel(5.0), channel(3.0), channel(1.0))


def scale_and_shift(image, alpha=1.0, beta=0.0):
    """uint8 -> clip(image * alpha + beta) truncated to uint8, as the authors' `convert`."""
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """
    mmsegmentation's / the authors' PhotoMetricDistortion on a uint8 RGB image: brightness, then contrast either first
    or last, saturation and hue; each step with probability 1/2 and the same parameter ranges.
    """
    if rng.integers(2):
        image = scale_and_shift(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        image = scale_and_shift(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        image = adjust_saturation(image, rng.uniform(*saturation_range))
    if rng.integers(2):
        image = shift_hue(image, rng.integers(-hue_delta, hue_delta, endpoint=False))
    if not contrast_first and rng.integers(2):
        image = scale_and_shift(image, alpha=rng.uniform(*contrast_range))
    return image


def normalise(image, mean, std, scale, out=None):
    """
    uint8 (H, W, 3) -> float32 (3, H, W) (image * scale - mean) / std, through a 256-entry table per channel, written
    into `out` (3, >=H, >=W) when given.
    """
    height, width = image.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32) if out is None else out
    values = np.arange(256, dtype=np.float32) * np.float32(scale)
    for c in range(3):
        table = (values - np.float32(mean[c])) / np.float32(std[c])
        np.take(table, image[..., c], out=out[c, :height, :width], mode="clip")
    return out


def as_arrays(image, label):
    """
    The uint8 RGB image and the label map, kept in its stored integer type until the end. The image is converted as
    the image processor converts it for evaluation and inference: 16-bit rounded to 8 bits, grayscale repeated,
    transparency composited on white (transformers' `convert_to_rgb`).
    """
    image = to_eight_bit(image)
    if getattr(image, "mode", None) == "F":  # a 32-bit float PIL image: refused below like float arrays
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"Training images must be 8- or 16-bit integer images, got an array of {image.dtype}"
                + (" holding NaN or infinite values." if not np.isfinite(image).all() else ".")
            )
        image = convert_to_rgb(image, return_numpy=True, input_data_format=ChannelDimension.LAST)
    else:
        image = convert_to_rgb(image, return_numpy=True)
    return np.require(image, requirements="W"), label_array(label)


def check_same_size(image_size, label_size):
    """Refuse a label map whose (height, width) is not its image's: its pixels would be scored against others."""
    if tuple(image_size) != tuple(label_size):
        raise ValueError(f"Image of size {tuple(image_size)} and label of size {tuple(label_size)} do not match.")


def label_array(label):
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(
            f"Label maps must be single-channel (height, width) images of class ids, got shape {label.shape}."
        )
    return label


# The paper's random rescale: each image is resized to base_size times a ratio drawn from this range.
RESCALE_RATIOS = (0.5, 2.0)


class SeededTransform:
    """
    Randomness from a generator seeded with (seed, process rank, DataLoader worker seed, call number). torch draws
    fresh worker seeds every epoch from its own seeded generator, so epochs differ, workers and ranks differ, and the
    same seeds give the same batches.
    """

    def __init__(self, seed=0):
        self.seed = seed
        self.calls = 0

    def next_generator(self):
        worker = get_worker_info()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        self.calls += 1
        return np.random.default_rng([self.seed, rank, 0 if worker is None else worker.seed, self.calls])


class TrainTransform(SeededTransform):
    """
    The paper's training augmentation for a batch of `{"image", "label"}` examples, giving `pixel_values` (3, ch, cw)
    float32 and `labels` (ch, cw) int64. `crop_size` is (height, width) as in the authors' code; `base_size` is the
    rescale target's (long, short) sides in either order (Cityscapes: base (2048, 1024), crop (768, 768); ADE20K:
    base (2048, 512), crop (512, 512)).
    """

    def __init__(self, base_size=(2048, 1024), crop_size=(768, 768), ratio_range=RESCALE_RATIOS, cat_max_ratio=0.75,
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
        check_same_size(image.shape[:2], label.shape)
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.base_size[0] * ratio), int(self.base_size[1] * ratio))
        size = keep_ratio_size(height, width, max(scale), min(scale))
        crop_height, crop_width = self.crop_size
        top, left = self.choose_crop(label, size, rng)
        crop_h, crop_w = min(crop_height, size[0] - top), min(crop_width, size[1] - left)

        image = resized_crop(image, size, top, left, crop_h, crop_w)
        label = self.label_crop(label, size, top, left, crop_h, crop_w)
        if rng.random() < self.flip_probability:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        pixels = np.zeros((3, crop_height, crop_width), dtype=np.float32)
        normalise(image, self.mean, self.std, self.scale, out=pixels)
        padded_label = np.full((crop_height, crop_width), IGNORE_INDEX, dtype=np.int64)
        padded_label[:crop_h, :crop_w] = label
        return pixels, padded_label

    @staticmethod
    def label_crop(label, size, top, left, height, width):
        rows = nearest_indices(label.shape[0], size[0], top, top + height)
        cols = nearest_indices(label.shape[1], size[1], left, left + width)
        return label.take(rows, axis=0).take(cols, axis=1)

    def choose_crop(self, label, size, rng):
        """
        The authors' random crop: offsets uniform over the margin; while no class covers less than `cat_max_ratio`
        of the crop (ignored pixels excluded, at least two classes), draw again, up to 10 checks.
        """
        crop_height, crop_width = self.crop_size
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
        images = [open_image(image) for image in batch["image"]]
        labels = [label_array(label).astype(np.int64) for label in batch["label"]]
        for image, label in zip(images, labels):
            check_same_size(image_size(image), label.shape)
        pixel_values = self.processor(images=images, **self.resize)["pixel_values"]
        return {"pixel_values": pixel_values, "labels": labels}


def image_size(image):
    """(height, width) of a PIL image or a channels-last array."""
    return (image.height, image.width) if hasattr(image, "height") else np.shape(image)[:2]


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
