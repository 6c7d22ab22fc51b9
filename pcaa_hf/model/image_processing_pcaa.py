"""Image processor for PCAA: RGB conversion, keep-ratio resize, ImageNet normalisation, label maps, post-processing."""

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    is_scaled_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import logging

logger = logging.get_logger(__name__)

SIXTEEN_BIT_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# What PIL raises for a file that is not a whole, readable image of a sensible size.
IMAGE_READ_ERRORS = (OSError, SyntaxError, PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning)


class PCAAImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Map label 0 to 255 (ignored) and every other label l to l - 1, as for ADE20K annotations.
    label_map (`dict[int, int]`, *optional*, defaults to `self.label_map`):
        Replace label values before `do_reduce_labels` (e.g. Cityscapes label ids -> train ids); values that are not
        keys are kept.
    """

    do_reduce_labels: bool
    label_map: dict[int, int] | dict[str, int] | None


def predicted_classes(logits: torch.Tensor, class_dim: int) -> torch.Tensor:
    """Class ids from logits: the argmax over `class_dim`, or, for one logit (binary segmentation), 1 where positive."""
    if logits.shape[class_dim] == 1:
        return (logits.squeeze(class_dim) > 0).long()
    return logits.argmax(dim=class_dim)


def keep_ratio_size(height, width, longest_edge, shortest_edge):
    """
    The size (height, width) of an image rescaled, keeping its aspect ratio, to the largest size whose long side is at
    most `longest_edge` and short side at most `shortest_edge` (up or down), rounded as mmsegmentation's
    `Resize(scale=(longest_edge, shortest_edge), keep_ratio=True)` and the authors' code do.
    """
    scale = min(longest_edge / max(height, width), shortest_edge / min(height, width))
    # A very elongated image (1x5000) would round its short side to 0 pixels: keep at least one.
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


@contextlib.contextmanager
def decompression_bombs_refused():
    """
    PIL refuses images of over twice `PIL.Image.MAX_IMAGE_PIXELS` but only warns below that; refuse both, so that one
    limit holds wherever an image file is opened (data set builders, processor, prediction).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        yield


def unreadable_image_message(path, error):
    """The one-line reason why image `path` cannot be used, with the way out for images PIL deems too large."""
    message = f"Cannot read image {path}: {error}"
    if isinstance(error, (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning)):
        message += " (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
    return message


def open_image(source):
    """
    A local image path opened with PIL as stored (EXIF orientation applied, no mode conversion, so 16-bit and alpha
    survive until `to_eight_bit` and RGB conversion); anything else is returned unchanged (URLs are left to
    transformers).
    """
    if not isinstance(source, (str, os.PathLike)) or str(source).startswith(("http://", "https://")):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Image {path} does not exist.")
    try:
        with decompression_bombs_refused(), PIL.Image.open(path) as image:
            return PIL.ImageOps.exif_transpose(image) or image.copy()
    except IMAGE_READ_ERRORS as error:
        raise ValueError(unreadable_image_message(path, error)) from error


def standardise_images(images):
    """`open_image` then `to_eight_bit` on every image of a (possibly nested) list, or on a single image."""
    if isinstance(images, (list, tuple)):
        return [standardise_images(image) for image in images]
    return to_eight_bit(open_image(images))


def to_eight_bit(image):
    """
    16-bit images (PIL "I;16"/"I" modes, uint16 arrays) rounded to 8 bits (v / 257), the precision the model works
    at, and 2-D integer arrays (grayscale) as PIL images, whose layout transformers need not guess. Other images are
    returned unchanged.
    """
    if isinstance(image, PIL.Image.Image):
        if image.mode not in SIXTEEN_BIT_PIL_MODES:
            return image
        image = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    elif isinstance(image, torch.Tensor):
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        return image
    if image.dtype == np.uint16:
        image = np.round(image / 257.0).astype(np.uint8)
    if image.ndim == 2:
        return PIL.Image.fromarray(image) if image.dtype == np.uint8 else image[..., None]
    return image


def check_pixel_values(image, index, do_rescale):
    """
    Refuse NaN or infinite pixels (the model would turn them into one class everywhere they spread), and warn, as
    transformers' processors do, when images about to be rescaled look rescaled already.
    """
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(f"Image {index} holds NaN or infinite pixel values; images must be finite.")
    if do_rescale and is_scaled_image(image):
        logger.warning_once(
            "It looks like you are trying to rescale already rescaled images. If the input images have pixel values "
            "between 0 and 1, set `do_rescale=False` to avoid rescaling them again."
        )


class PCAAImageProcessor(PilBackend):
    r"""
    Prepares images (and optionally segmentation maps) for [`PCAAForSemanticSegmentation`], without torchvision.

    Images are converted to RGB (grayscale repeated; transparency composited on white; 16-bit images rounded to
    8 bits), optionally resized, rescaled to [0, 1] and normalised with the ImageNet mean and std. The model
    accepts any size, so resizing is off by default (the paper evaluates Cityscapes at full resolution).

    `size` either fixes the output size (`{"height": h, "width": w}`) or, with `{"longest_edge": L,
    "shortest_edge": S}`, rescales keeping the aspect ratio as mmsegmentation's `Resize(scale=(L, S),
    keep_ratio=True)` (the paper's ADE20K evaluation: L=2048, S=512). Images are resized bilinearly without
    antialiasing (as OpenCV's INTER_LINEAR, which the authors use), segmentation maps with nearest neighbour.

    Segmentation maps pass through `label_map` and then `do_reduce_labels`, and come back as int64 `labels`.
    Local image paths are opened as stored (transformers' own loader would convert 16-bit and RGBA images to RGB by
    clipping and dropping alpha).
    """

    valid_kwargs = PCAAImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"longest_edge": 2048, "shortest_edge": 1024}
    do_resize = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_reduce_labels = False
    label_map = None

    def __init__(self, **kwargs: Unpack[PCAAImageProcessorKwargs]):
        super().__init__(**kwargs)

    def preprocess(self, images, segmentation_maps=None, **kwargs: Unpack[PCAAImageProcessorKwargs]) -> BatchFeature:
        r"""
        segmentation_maps (`ImageInput`, *optional*):
            One label map per image, of the image's size (PIL "L"/"P"/"I;16" images or 2-D integer arrays).
        """
        empty_list = isinstance(images, (list, tuple)) and len(images) == 0
        empty_array = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4 and images.shape[0] == 0
        if images is None or empty_list or empty_array:
            raise ValueError("No images were given: pass at least one image.")
        unsupported = [name for name in ("do_pad", "do_center_crop") if kwargs.get(name, getattr(self, name, None))]
        if unsupported:
            raise ValueError(f"PCAAImageProcessor does not support {unsupported}: the model takes any image size.")
        if ChannelDimension(kwargs.get("data_format") or ChannelDimension.FIRST) != ChannelDimension.FIRST:
            raise ValueError("PCAAImageProcessor returns channels-first pixel values only (the model's layout).")
        images = standardise_images(images)
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _preprocess_image_like_inputs(self, images, segmentation_maps, do_convert_rgb, input_data_format,
                                      return_tensors, **kwargs) -> BatchFeature:
        images = self._prepare_image_like_inputs(images=images, do_convert_rgb=do_convert_rgb,
                                                 input_data_format=input_data_format)
        image_sizes = [image.shape[-2:] for image in images]
        data = {"pixel_values": self._preprocess(images, **{**kwargs, "is_label_map": False})}

        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(images=segmentation_maps, expected_ndims=2, do_convert_rgb=False,
                                                   input_data_format=ChannelDimension.FIRST)
            if len(maps) != len(images):
                raise ValueError(
                    f"Got {len(images)} images but {len(maps)} segmentation maps: give one single-channel map per "
                    "image (a 3-D array counts as a batch of 2-D maps)."
                )
            for index, (label_map, image_size) in enumerate(zip(maps, image_sizes)):
                if label_map.ndim != 3 or label_map.shape[0] != 1:
                    raise ValueError(
                        f"Segmentation map {index} has shape {tuple(label_map.shape)}: label maps must be "
                        "single-channel (height, width) images of class ids."
                    )
                if label_map.shape[-2:] != image_size:
                    raise ValueError(
                        f"Segmentation map {index} has size {tuple(label_map.shape[-2:])} but its image has size "
                        f"{tuple(image_size)} (height, width)."
                    )
            maps = self._preprocess(maps, **{**kwargs, "is_label_map": True, "resample": PILImageResampling.NEAREST})
            data["labels"] = [label_map.squeeze(0).astype(np.int64) for label_map in maps]

        if return_tensors is not None and len({tuple(image.shape) for image in data["pixel_values"]}) > 1:
            sizes = sorted({tuple(image.shape[-2:]) for image in data["pixel_values"]})
            raise ValueError(
                f"Cannot stack images of different sizes {sizes} into one tensor: resize them to a fixed size "
                "(do_resize=True, size={'height': h, 'width': w}) or process them one at a time."
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess(self, images, is_label_map, do_resize, size, resample, do_rescale, rescale_factor, do_normalize,
                    image_mean, image_std, do_reduce_labels=False, label_map=None, **kwargs) -> list[np.ndarray]:
        processed = []
        for index, image in enumerate(images):
            if not is_label_map:
                check_pixel_values(image, index, do_rescale)
            if is_label_map:
                if label_map:
                    image = self.apply_label_map(image, label_map)
                if do_reduce_labels:
                    image = self.reduce_label(image)
            if do_resize:
                image = self.resize(image, size, resample)
            if not is_label_map:
                if do_rescale:
                    image = self.rescale(image, rescale_factor)
                if do_normalize:
                    image = self.normalize(image, image_mean, image_std)
                image = image.astype(np.float32, copy=False)
            processed.append(image)
        return processed

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """Resize a channels-first array to `size` (fixed, or keep-ratio with longest/shortest edge)."""
        height, width = image.shape[-2:]
        if size.longest_edge and size.shortest_edge:
            scale = (max(size.longest_edge, size.shortest_edge), min(size.longest_edge, size.shortest_edge))
            target = keep_ratio_size(height, width, *scale)
        elif size.height and size.width:
            target = (size.height, size.width)
        else:
            raise ValueError(f"`size` needs 'height' and 'width', or 'longest_edge' and 'shortest_edge'; got {size}.")
        modes = {PILImageResampling.NEAREST: "nearest", PILImageResampling.BILINEAR: "bilinear",
                 PILImageResampling.BICUBIC: "bicubic"}
        resample = PILImageResampling.BILINEAR if resample is None else PILImageResampling(resample)
        if resample not in modes:
            raise ValueError(f"`resample` must be NEAREST, BILINEAR or BICUBIC, got {resample!r}.")
        if target == (height, width):
            return image
        tensor = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).float()
        if resample == PILImageResampling.NEAREST:
            return F.interpolate(tensor, size=target, mode="nearest")[0].numpy().astype(image.dtype)
        resized = F.interpolate(tensor, size=target, mode=modes[resample], align_corners=False, antialias=False)
        return resized[0].numpy()

    @staticmethod
    def apply_label_map(label, label_map):
        """Replace label values by `label_map`; values that are not keys are kept (negative keys work too)."""
        mapping = {int(old): int(new) for old, new in label_map.items()}
        if label.dtype in (np.uint8, np.uint16):  # a lookup table over every possible value is small and fast
            table = np.arange(np.iinfo(label.dtype).max + 1, dtype=np.int64)
            for old, new in mapping.items():
                if 0 <= old < len(table):
                    table[old] = new
            return table[label]
        values, inverse = np.unique(label, return_inverse=True)
        mapped = np.array([mapping.get(int(value), int(value)) for value in values], dtype=np.int64)
        return mapped[inverse].reshape(label.shape)

    @staticmethod
    def reduce_label(label):
        """0 -> 255 (ignored), l -> l - 1 otherwise (255 stays 255)."""
        label = label.astype(np.int64)
        return np.where(label == 0, 255, np.where(label == 255, 255, label - 1))

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, return_segmentation_scores: bool = False
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Class-id maps from [`PCAAForSemanticSegmentation`] outputs: one (height, width) `torch.LongTensor` per image,
        the logits bilinearly resized (align_corners=False) to `target_sizes[i]` (height, width) when given, then
        argmax over classes (with one label, binary segmentation: class 1 where its logit is positive). Without
        `target_sizes`, the maps stay at the logits' resolution. With `return_segmentation_scores=True`, one
        `SemanticSegmentationPostProcessorOutput` per image instead, whose `segmentation_scores` are the (resized)
        logits, (num_labels, height, width), beside its `segmentation`.
        """
        logits = outputs.logits
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {logits.shape[0]} images.")
        results = []
        for index in range(logits.shape[0]):
            image_logits = logits[index : index + 1]
            if target_sizes is not None:
                target = tuple(int(s) for s in target_sizes[index])
                image_logits = F.interpolate(image_logits.float(), size=target, mode="bilinear", align_corners=False)
            scores = image_logits[0]
            segmentation = predicted_classes(scores, class_dim=0)
            if return_segmentation_scores:
                results.append(
                    SemanticSegmentationPostProcessorOutput(
                        data={"segmentation": segmentation, "segmentation_scores": scores}
                    )
                )
            else:
                results.append(segmentation)
        return results


__all__ = ["PCAAImageProcessor", "keep_ratio_size", "predicted_classes"]
