"""Measurements behind `pcaa-benchmark`: the training data pipeline against an OpenCV pipeline doing the same
steps, mean IoU against per-image NumPy and `evaluate`, and the timer and machine record every section uses."""

import math
import time
from functools import partial

import numpy as np
import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pcaa_hf.data.label_sets import IGNORE_INDEX
from pcaa_hf.data.transforms import TrainTransform
from pcaa_hf.evaluation.metrics import EVALUATE_MODULE, mean_iou
from pcaa_hf.model.image_processing_pcaa import keep_ratio_size

# CPU flags recorded with every figure (/proc/cpuinfo's names).
CPU_INSTRUCTION_SETS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
IMAGENET_MEAN = np.array(IMAGENET_DEFAULT_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(IMAGENET_DEFAULT_STD, dtype=np.float32)


def opencv_train_transform(cv2, image, label, rng, base_size=(2048, 1024), crop_size=(768, 768)):
    """
    The authors' training pipeline step by step with OpenCV, as their data loader runs it: rescale the whole image,
    crop (cat_max_ratio 0.75, 10 tries), flip, photometric distortion in 8-bit HSV, normalise, pad, transpose.
    """
    ratio = rng.uniform(0.5, 2.0)
    scale = (int(base_size[0] * ratio), int(base_size[1] * ratio))
    height, width = keep_ratio_size(*label.shape, max(scale), min(scale))
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)

    crop_h, crop_w = crop_size
    margin_h, margin_w = max(height - crop_h, 0), max(width - crop_w, 0)
    top, left = rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)
    for _ in range(10):
        values, counts = np.unique(label[top: top + crop_h, left: left + crop_w], return_counts=True)
        counts = counts[values != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
            break
        top, left = rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)
    image, label = image[top: top + crop_h, left: left + crop_w], label[top: top + crop_h, left: left + crop_w]
    if rng.integers(2):
        image, label = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])

    def scaled(array, alpha=1.0, beta=0.0):
        return np.clip(array.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        image = scaled(image, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        image = scaled(image, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = scaled(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-18, 18)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        image = scaled(image, alpha=rng.uniform(0.5, 1.5))

    image = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    pad_h, pad_w = crop_h - image.shape[0], crop_w - image.shape[1]
    if pad_h > 0 or pad_w > 0:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(IGNORE_INDEX,))
    return np.ascontiguousarray(image.transpose(2, 0, 1)), label.astype(np.int64)


def images_per_second(function, samples, repeats):
    start = time.perf_counter()
    for index in range(repeats):
        function(*samples[index % len(samples)])
    return repeats / (time.perf_counter() - start)


def benchmark_train_transform(samples, repeats=40, seed=0):
    """
    Images/s of our training transform and of the OpenCV pipeline on the same decoded (image, label) samples, on
    whatever threads the caller allows (scripts/benchmark.py pins one). Returns a dict of the figures.
    """
    import cv2

    transform = TrainTransform(seed=seed)
    rng = np.random.default_rng(seed)
    ours = images_per_second(lambda image, label: transform.augment(image, label, rng), samples, repeats)
    opencv_rng = np.random.default_rng(seed)
    theirs = images_per_second(lambda image, label: opencv_train_transform(cv2, image, label, opencv_rng), samples,
                               repeats)
    return {"pcaa_hf_images_per_second": ours, "opencv_images_per_second": theirs, "speedup": ours / theirs,
            "opencv_version": cv2.__version__}


def per_image_numpy_mean_iou(predictions, references, num_labels, ignore_index):
    """
    The straightforward per-image NumPy computation `evaluate`'s `mean_iou` performs: mask the ignored pixels, then
    three `np.histogram`s (intersection, prediction, reference) per image, summed in float64. The speed baseline;
    returns the per-class IoU.
    """
    totals = np.zeros((3, num_labels), dtype=np.float64)
    for prediction, reference in zip(predictions, references):
        keep = reference != ignore_index
        prediction, reference = prediction[keep], reference[keep]
        for row, values in enumerate((prediction[prediction == reference], prediction, reference)):
            totals[row] += np.histogram(values, bins=num_labels, range=(0, num_labels - 1))[0]
    intersection, predicted, labelled = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        return intersection / (predicted + labelled - intersection)


def ade20k_like_maps(count=40, size=(512, 683), num_labels=150, seed=0):
    """`count` random int64 predictions (argmax output) and uint8 references with 10 % ignored pixels."""
    rng = np.random.default_rng(seed)
    predictions = [rng.integers(0, num_labels, size) for _ in range(count)]
    references = [np.where(rng.random(size) < 0.1, IGNORE_INDEX, rng.integers(0, num_labels, size)).astype(np.uint8)
                  for _ in range(count)]
    return predictions, references


def synchronize(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(function, calls, device=None):
    """
    The shortest wall time of `calls` calls (the least disturbed by other work on the machine); on a CUDA `device`,
    synchronised before and after each call so that its kernels are counted.
    """
    best = math.inf
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def benchmark_mean_iou(num_labels=150, repeats=3, hub_module_path=None):
    """
    Seconds to score 40 ADE20K-sized maps (512x683, 150 classes) with `pcaa_hf.evaluation.metrics.mean_iou`, the
    per-image NumPy computation, our `evaluate` module and, when `hub_module_path` points at a copy of the Hub's
    `mean_iou.py`, `evaluate`'s own metric. Checks the per-class IoU agree exactly.
    """
    import evaluate

    predictions, references = ade20k_like_maps(num_labels=num_labels)
    ours = mean_iou(predictions, references, num_labels, IGNORE_INDEX)
    baseline = per_image_numpy_mean_iou(predictions, references, num_labels, IGNORE_INDEX)
    if not np.array_equal(ours["per_category_iou"], baseline, equal_nan=True):
        raise AssertionError("pcaa_hf.evaluation.metrics.mean_iou disagrees with the per-image NumPy computation.")
    figures = {
        "maps": len(predictions), "size": list(predictions[0].shape), "num_labels": num_labels,
        "pcaa_hf_seconds": best_seconds(lambda: mean_iou(predictions, references, num_labels, IGNORE_INDEX),
                                        repeats),
        "per_image_numpy_seconds": best_seconds(
            lambda: per_image_numpy_mean_iou(predictions, references, num_labels, IGNORE_INDEX), repeats),
    }
    modules = {"pcaa_hf_evaluate_module": EVALUATE_MODULE}
    if hub_module_path:
        modules["hub_evaluate_mean_iou"] = hub_module_path
    for name, path in modules.items():
        metric = evaluate.load(path)
        result = metric.compute(predictions=predictions, references=references, num_labels=num_labels,
                                ignore_index=IGNORE_INDEX)
        if not np.array_equal(result["per_category_iou"], ours["per_category_iou"], equal_nan=True):
            raise AssertionError(f"{name} disagrees with pcaa_hf.evaluation.metrics.mean_iou.")
        compute = partial(metric.compute, predictions=predictions, references=references, num_labels=num_labels,
                          ignore_index=IGNORE_INDEX)
        figures[f"{name}_seconds"] = best_seconds(compute, 1)
    return figures


def machine_description(device=None):
    """CPU model, core count, the GPU when `device` is one, and library versions, for the record next to the figures."""
    import os
    import platform

    import torch
    import transformers

    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    # The instruction sets that decide which kernels oneDNN and the runtimes pick (the CPU models change).
    flags = set(fields.get("flags", "").split())
    instruction_sets = [name for name in CPU_INSTRUCTION_SETS if name in flags]
    family_model = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    description = {"cpu": model, "cpu_family_model": family_model, "instruction_sets": instruction_sets,
                   "cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(),
                   "python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "numpy": np.__version__,
                   "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    if device is not None and device.type == "cuda":
        description.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                           cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                           float32_convolutions=torch.backends.cudnn.conv.fp32_precision)
    return description
