"""Mean IoU exactly as `evaluate`'s `mean_iou` computes it, fast, and a streaming confusion matrix for evaluation loops.

Both count pixels in one (K, K) confusion matrix (rows: reference class, columns: predicted class) with integer
arithmetic, so figures stay exact however many images are scored, and derive every figure from it with the
conventions of `evaluate` and mmsegmentation: IoU = TP / (TP + FP + FN) over the whole split; a class absent from
both predictions and references has NaN IoU and accuracy and is left out of the means. The authors' script instead
counts such classes as 0; `ConfusionMatrix.compute` reports that figure beside ours.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pcaa_hf.data.label_sets import IGNORE_INDEX

# `evaluate.load(EVALUATE_MODULE)` gives an `evaluate` metric backed by `mean_iou` below, with no download.
EVALUATE_MODULE = str(Path(__file__).parent / "evaluate_module" / "mean_iou.py")

METRIC_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
# Reference values spanning more than this are mapped value by value rather than through a lookup table.
MAX_TABLE_SIZE = 1 << 24


def summarise_confusion(matrix, nan_to_num=None):
    """
    `evaluate`-style metrics from a (K, K) confusion matrix of pixel counts: `mean_iou`, `mean_accuracy`,
    `overall_accuracy` (numpy float64 scalars) and `per_category_iou`, `per_category_accuracy` ((K,) float64).
    The arithmetic is `evaluate`'s, in float64 on exact integer counts, so the values are identical to its own.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    intersection = np.diagonal(matrix).copy()
    reference_area = matrix.sum(axis=1)
    union = matrix.sum(axis=0) + reference_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / reference_area
        metrics = {
            "mean_iou": np.nanmean(iou) if not np.isnan(iou).all() else np.float64(np.nan),
            "mean_accuracy": np.nanmean(accuracy) if not np.isnan(accuracy).all() else np.float64(np.nan),
            "overall_accuracy": intersection.sum() / reference_area.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if nan_to_num is not None:
        metrics = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in metrics.items()}
    return metrics


def authors_mean_iou(matrix):
    """The authors' mIoU: TP / max(1, TP + FP + FN) averaged over all K classes, so absent classes count as 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    intersection = np.diagonal(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - intersection
    return (intersection / np.maximum(1.0, union)).mean()


def integer_map(array, name):
    """A (H, W) integer numpy array from a numpy array, tensor, PIL image or nested list; `name` says which input."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (height, width) map of class ids, got shape {array.shape}.")
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise ValueError(f"{name} must hold integer class ids, got non-integer values.")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}.")
    elif array.dtype == np.uint64:  # int64 arithmetic below; larger values cannot be class ids anyway
        if array.size and array.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds values beyond the int64 range: {int(array.max())}.")
        array = array.astype(np.int64)
    return array


def value_table(values, label_map, reduce_labels):
    """
    Map the distinct reference `values` (int64) as `evaluate` does: `label_map` pairs applied one after the other in
    order (so {1: 2, 2: 3} sends 1 to 3), then `reduce_labels` (0 -> 255, v -> v - 1, 255 stays 255).
    """
    mapped = values.copy()
    for old, new in (label_map or {}).items():
        mapped[mapped == int(old)] = int(new)
    if reduce_labels:
        mapped = np.where(mapped == 0, 255, mapped) - 1
        mapped[mapped == 254] = 255
    return mapped


class ReferenceRows:
    """
    Turns a reference map into confusion-matrix row offsets with one table lookup: class c -> c * K, the ignore
    index -> K * K (a spare row that is dropped), anything else -> a negative number that flags the map as invalid.
    `label_map` and `reduce_labels` are folded into the table, which covers every value seen so far.
    """

    def __init__(self, num_labels, ignore_index, label_map=None, reduce_labels=False):
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.label_map = label_map
        self.reduce_labels = reduce_labels
        self.window = (0, np.empty(0, dtype=np.int64))  # (lowest value, table); one attribute, so threads agree
        # Every raw value that can be scored lies in this span: the classes, the ignore index, label_map's keys and
        # their neighbours under reduce_labels. Maps of wide dtypes outside it are invalid without looking further.
        special = [0, num_labels, ignore_index, *(int(key) for key in label_map or ())]
        if reduce_labels:
            special += [ignore_index + 1, 255]
        self.span = (min(special), max(special))

    def classes(self, values):
        """Mapped class ids of the raw `values` (int64)."""
        return value_table(values, self.label_map, self.reduce_labels)

    def offsets(self, values):
        classes = self.classes(values)
        num_labels = self.num_labels
        valid = (classes >= 0) & (classes < num_labels)
        return np.where(classes == self.ignore_index, num_labels * num_labels,
                        np.where(valid, classes * num_labels, -(num_labels + 1) ** 2))

    def __call__(self, reference):
        if reference.size == 0:
            return np.zeros(reference.shape, dtype=np.int64)
        if reference.dtype in (np.uint8, np.uint16):
            low, high = 0, int(np.iinfo(reference.dtype).max)
            outside = False
        else:
            low, high = int(reference.min()), int(reference.max())
            outside = low < self.span[0] or high > self.span[1]
        table_low, table = self.window
        if low < table_low or high >= table_low + len(table):
            low, high = min(low, table_low), max(high, table_low + len(table) - 1)
            if outside or high - low >= MAX_TABLE_SIZE:
                # Invalid values (flagged by their offsets), or valid ones far apart: map the distinct values only.
                values, inverse = np.unique(reference, return_inverse=True)
                return self.offsets(values.astype(np.int64))[inverse].reshape(reference.shape)
            table_low, table = self.window = (low, self.offsets(np.arange(low, high + 1, dtype=np.int64)))
        return table[reference if table_low == 0 else reference.astype(np.int64) - table_low]


def check_values(values, num_labels, ignore_index, name, allow_ignore):
    """Raise naming `name` and the offending values when some lie outside [0, num_labels) (or the ignore index)."""
    values = np.unique(values)
    bad = values[(values < 0) | (values >= num_labels)]
    if allow_ignore:
        bad = bad[bad != ignore_index]
    if bad.size:
        allowed = f"[0, {num_labels})" + (f" or the ignore index {ignore_index}" if allow_ignore else "")
        raise ValueError(f"{name} holds values outside {allowed}: {bad[:10].tolist()}"
                         + (f" and {bad.size - 10} more" if bad.size > 10 else "") + ".")


def memory_size(device):
    """Bytes of memory of `device`: a CUDA device's own, otherwise the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_table_size(num_labels, copies, device):
    """
    Refuse a `num_labels` whose `copies` (K + 1, K) int64 count tables (a confusion matrix and the spare row of
    ignored pixels) would not fit in `device`'s memory, rather than fail inside numpy or torch when allocating them.
    """
    needed = copies * (num_labels + 1) * num_labels * 8
    available = memory_size(device)
    if needed > available:
        raise ValueError(f"num_labels={num_labels} needs {copies} confusion table(s) of {num_labels + 1}x{num_labels} "
                         f"int64 pixel counts, {needed / 2 ** 30:.1f} GiB, more than the "
                         f"{available / 2 ** 30:.1f} GiB of memory of {device}.")


def pair_confusion(prediction, reference, index, rows):
    """The (K, K) int64 confusion matrix of one prediction/reference pair (numpy), with its inputs checked."""
    num_labels = rows.num_labels
    prediction = integer_map(prediction, f"predictions[{index}]")
    reference = integer_map(reference, f"references[{index}]")
    if prediction.shape != reference.shape:
        raise ValueError(f"predictions[{index}] has shape {prediction.shape} but references[{index}] has shape "
                         f"{reference.shape}; predict at the reference's resolution.")
    if prediction.size and (prediction.min() < 0 or prediction.max() >= num_labels):
        check_values(prediction, num_labels, None, f"predictions[{index}]", allow_ignore=False)
    combined = rows(reference)
    combined += prediction
    if combined.size and combined.min() < 0:
        mapped = rows.label_map or rows.reduce_labels
        check_values(rows.classes(np.unique(reference).astype(np.int64)), num_labels, rows.ignore_index,
                     f"references[{index}]" + (" (after label_map/reduce_labels)" if mapped else ""),
                     allow_ignore=True)
    counts = np.bincount(combined.ravel(), minlength=(num_labels + 1) * num_labels)
    return counts[: num_labels * num_labels].reshape(num_labels, num_labels)


def confusion_sum(pairs):
    """The summed confusion matrix of `pair_confusion`'s (prediction, reference, index, rows) `pairs`."""
    matrix = pair_confusion(*pairs[0])
    for pair in pairs[1:]:
        matrix += pair_confusion(*pair)
    return matrix


def mean_iou(predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None, reduce_labels=False):
    """
    A drop-in for `evaluate.load("mean_iou").compute(...)` with the same arguments and result: `mean_iou`,
    `mean_accuracy`, `overall_accuracy`, `per_category_iou` and `per_category_accuracy`, identical in value.

    predictions, references: sequences of (height, width) class-id maps (numpy arrays, tensors, PIL images or
    nested lists), pairwise of equal shape. `label_map` and `reduce_labels` apply to the references, in `evaluate`'s
    order (see `value_table`); the inputs are never modified. Unlike `evaluate`, which silently drops them, values
    outside [0, num_labels) (other than `ignore_index` in references) raise a `ValueError` naming the map.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
    predictions, references = list(predictions), list(references)
    if not predictions:
        raise ValueError("mean_iou needs at least one prediction/reference pair, got empty lists.")
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    num_labels = int(num_labels)
    check_table_size(num_labels, 2, torch.device("cpu"))  # one thread's sum and the table of the map it scores
    rows = ReferenceRows(num_labels, ignore_index, label_map, reduce_labels)
    pairs = [(prediction, reference, index, rows)
             for index, (prediction, reference) in enumerate(zip(predictions, references))]
    # numpy's table lookups and bincount release the GIL: two threads score two maps at once. Each thread sums its
    # share of the maps, so memory holds two tables per thread however many maps there are.
    table_bytes = 2 * (num_labels + 1) * num_labels * 8
    workers = min(len(pairs), len(os.sched_getaffinity(0)), 4, memory_size(torch.device("cpu")) // table_bytes)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sums = list(pool.map(confusion_sum, (pairs[start::workers] for start in range(workers))))
    return summarise_confusion(functools.reduce(np.add, sums), nan_to_num)


class ConfusionMatrix:
    """
    A streaming (K, K) confusion matrix for evaluation loops, kept on the model's device.

    `update(predictions, references)` takes (B, H, W) or (H, W) integer tensors (references may hold `ignore_index`)
    and counts one image per map. With `accelerate`, give each process a disjoint share of the images (see
    `pcaa_hf.evaluation.scoring.process_share`) and pass the `Accelerator` to `compute`: the matrices and image counts
    are summed across processes, so every image counts exactly once — no duplicates from padding the last batch.
    """

    def __init__(self, num_labels, ignore_index=IGNORE_INDEX, device=None):
        device = torch.device(device or "cpu")
        check_table_size(num_labels, 2, device)  # the matrix and one update's counts
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=device)
        self.num_images = 0

    def reset(self):
        self.matrix.zero_()
        self.num_images = 0

    @torch.no_grad()
    def update(self, predictions, references):
        predictions = torch.as_tensor(predictions, device=self.matrix.device)
        references = torch.as_tensor(references, device=self.matrix.device)
        if predictions.shape != references.shape or predictions.dim() not in (2, 3):
            raise ValueError(f"predictions {tuple(predictions.shape)} and references {tuple(references.shape)} must "
                             "be (batch, height, width) or (height, width) maps of equal shape.")
        if predictions.is_floating_point() or references.is_floating_point():
            raise ValueError("predictions and references must be integer class-id maps, not floating point.")
        num_labels = self.num_labels
        predictions, references = predictions.long(), references.long()
        ignored = references == self.ignore_index
        if predictions.numel():
            bad_prediction = (predictions < 0) | (predictions >= num_labels)
            bad_reference = ((references < 0) | (references >= num_labels)) & ~ignored
            if bool((bad_prediction | bad_reference).any()):  # one device-to-host sync per batch when all is well
                check_values(predictions[bad_prediction].cpu().numpy(), num_labels, None, "predictions", False)
                check_values(references[bad_reference].cpu().numpy(), num_labels, self.ignore_index, "references",
                             True)
        combined = torch.where(ignored, num_labels * num_labels, references * num_labels) + predictions
        counts = torch.bincount(combined.flatten(), minlength=(num_labels + 1) * num_labels)
        self.matrix += counts[: num_labels * num_labels].view(num_labels, num_labels)
        self.num_images += 1 if predictions.dim() == 2 else predictions.shape[0]

    def compute(self, accelerator=None, nan_to_num=None):
        """
        The `mean_iou` dict over every image seen by every process, plus `mean_iou_absent_as_zero` (the authors'
        convention) and `num_images`. With an `Accelerator`, every process must call this (it is a collective).
        """
        matrix = self.matrix
        num_images = torch.tensor([self.num_images], dtype=torch.int64, device=matrix.device)
        if accelerator is not None and accelerator.num_processes > 1:
            matrix = accelerator.reduce(matrix.clone(), reduction="sum")
            num_images = accelerator.reduce(num_images, reduction="sum")
        matrix = matrix.cpu().numpy()
        metrics = summarise_confusion(matrix, nan_to_num)
        metrics["mean_iou_absent_as_zero"] = authors_mean_iou(matrix)
        metrics["num_images"] = int(num_images.item())
        return metrics


__all__ = ["EVALUATE_MODULE", "METRIC_KEYS", "ConfusionMatrix", "mean_iou", "summarise_confusion"]
