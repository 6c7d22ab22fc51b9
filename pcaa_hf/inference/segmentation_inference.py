"""The paper's inference modes for any image size: whole image, sliding window, and multi-scale with flip.

`SegmentationInference(mode="slide", crop_size=(768, 768))` is the authors' Cityscapes evaluation: 768x768 windows
overlapping by a third (stride 512), batched through the model, each window's logits upsampled to the window and
averaged over the windows covering a pixel. As in the authors' code, an image shorter than the crop on either side
(e.g. Cityscapes at scale 0.5) gets one whole-image forward instead. Unlike theirs, inputs are not first resized to a
multiple of the output stride: the model takes any size. `scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True` adds
their multi-scale + flip test: logits of every scale and flip are resized to the output size and averaged (logits, not
probabilities, as in the authors' `evaluate.py`).

Memory, in float32 (B, K, ., .) maps: a sliding pass holds one sum at the scaled input size plus one window's
upsampled logits at a time; resizing it to the output size, flipping it back and the running sum over scales and
flips add up to three maps at the output size. At most about (s^2 + 3) * B * K * H * W * 4 bytes for the largest
scale s, whatever the number of windows and scales (1024x2048, 150 classes, scale 1 with flip: about 4 GB).
"""

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pcaa_hf.model.image_processing_pcaa import predicted_classes

MODES = ("whole", "slide")


def sliding_windows(height, width, crop_size, stride):
    """
    (top, left, bottom, right) of the windows tiling a height x width image, as the authors and mmsegmentation
    place them: every `stride` pixels, the last row/column of windows pushed back inside the image. A side shorter
    than the crop gets one window of the side's length.
    """
    def starts(length, crop, step):
        count = max(math.ceil((length - crop) / step), 0) + 1
        return [max(min(index * step + crop, length) - crop, 0) for index in range(count)]

    crop_height, crop_width = crop_size
    return [(top, left, min(top + crop_height, height), min(left + crop_width, width))
            for top in starts(height, crop_height, stride[0]) for left in starts(width, crop_width, stride[1])]


def scaled_size(size, scale):
    """The size of an image rescaled by `scale`, rounded half up (mmsegmentation's rule)."""
    return tuple(max(int(length * scale + 0.5), 1) for length in size)


def upsample(logits, size):
    """Bilinear resize (align_corners=False) of (B, K, h, w) logits to `size`, in float32; a no-op at equal size."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class SegmentationInference:
    """
    How to turn normalised images into per-pixel logits.

    mode: "whole" (one forward of the whole image) or "slide" (windows of `crop_size`, every `stride` pixels;
        the default stride is two thirds of the crop, the paper's overlap of 1/3; at most the crop, so that every
        pixel is covered).
    scales: input rescaling factors; flip: add horizontally flipped inputs. Logits are averaged over all of them.
    window_batch_size: windows per forward in "slide" mode.
    """

    mode: str = "whole"
    crop_size: tuple = (768, 768)
    stride: tuple | None = None
    scales: tuple = (1.0,)
    flip: bool = False
    window_batch_size: int = 4

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        object.__setattr__(self, "crop_size", self.pair(self.crop_size, "crop_size"))
        stride = tuple(math.ceil(length * 2 / 3) for length in self.crop_size) if self.stride is None else self.stride
        object.__setattr__(self, "stride", self.pair(stride, "stride"))
        if any(step > crop for step, crop in zip(self.stride, self.crop_size)):
            raise ValueError(f"stride {self.stride} must not exceed crop_size {self.crop_size}: pixels between "
                             "windows would get no prediction.")
        try:
            scales = tuple(float(scale) for scale in self.scales)
        except (TypeError, ValueError):
            scales = ()
        if not scales or not all(math.isfinite(scale) and scale > 0 for scale in scales):
            raise ValueError(f"scales must be a non-empty list of positive factors, got {self.scales!r}.")
        object.__setattr__(self, "scales", scales)
        if not self.is_positive_integer(self.window_batch_size):
            raise ValueError(f"window_batch_size must be a positive integer, got {self.window_batch_size!r}.")

    @staticmethod
    def is_positive_integer(value):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0

    @classmethod
    def pair(cls, value, name):
        pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
        if len(pair) != 2 or not all(cls.is_positive_integer(v) for v in pair):
            raise ValueError(f"{name} must be a positive integer or a (height, width) pair, got {value!r}.")
        return tuple(int(v) for v in pair)

    def to_dict(self):
        return asdict(self)

    @torch.inference_mode()
    def logits(self, model, pixel_values, output_size=None):
        """
        pixel_values (B, 3, H, W) normalised images -> (B, K, *output_size) float32 logits (default output size:
        H x W), averaged over the scales and flips.
        """
        if pixel_values.dim() != 4 or not pixel_values.shape[0]:
            raise ValueError("pixel_values must be a non-empty (batch, channels, height, width) tensor, got shape "
                             f"{tuple(pixel_values.shape)}.")
        output_size = tuple(pixel_values.shape[-2:]) if output_size is None else tuple(output_size)
        total = None
        flips = (False, True) if self.flip else (False,)
        for scale in self.scales:
            size = scaled_size(pixel_values.shape[-2:], scale)
            scaled = pixel_values if scale == 1 else F.interpolate(
                pixel_values, size=size, mode="bilinear", align_corners=False)
            for flipped in flips:
                inputs = scaled.flip(-1) if flipped else scaled
                if self.mode == "slide" and all(side >= crop for side, crop in zip(size, self.crop_size)):
                    logits = upsample(self.slide(model, inputs), output_size)
                else:
                    logits = self.whole(model, inputs, output_size)
                if flipped:
                    logits = logits.flip(-1)
                total = logits if total is None else total.add_(logits)
        count = len(self.scales) * len(flips)
        return total if count == 1 else total.div_(count)

    def predict(self, model, pixel_values, output_size=None):
        """(B, H', W') int64 class ids: the argmax of `logits` (for one logit, 1 where positive)."""
        return predicted_classes(self.logits(model, pixel_values, output_size), class_dim=1)

    @staticmethod
    def whole(model, pixel_values, output_size):
        return upsample(model(pixel_values=pixel_values).logits, output_size)

    def slide(self, model, pixel_values):
        """(B, K, H, W) float32 logits of (B, 3, H, W) images, averaged over the windows covering each pixel."""
        batch_size, _, height, width = pixel_values.shape
        windows = sliding_windows(height, width, self.crop_size, self.stride)
        # Every window has the same size (min(crop, side) per side), so windows of all images stack into batches.
        tiles = [(image, window) for image in range(batch_size) for window in windows]
        total = count = None
        for start in range(0, len(tiles), self.window_batch_size):
            chunk = tiles[start : start + self.window_batch_size]
            crops = torch.stack([pixel_values[image, :, top:bottom, left:right]
                                 for image, (top, left, bottom, right) in chunk])
            chunk_logits = model(pixel_values=crops).logits
            if total is None:
                total = torch.zeros(batch_size, chunk_logits.shape[1], height, width, device=chunk_logits.device)
                count = torch.zeros(1, 1, height, width, device=chunk_logits.device)
            for window_logits, (image, (top, left, bottom, right)) in zip(chunk_logits, chunk):
                window_size = (bottom - top, right - left)
                total[image, :, top:bottom, left:right] += upsample(window_logits[None], window_size)[0]
        for top, left, bottom, right in windows:
            count[..., top:bottom, left:right] += 1
        return total.div_(count)


__all__ = ["MODES", "SegmentationInference", "scaled_size", "sliding_windows"]
