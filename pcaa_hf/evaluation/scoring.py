"""Evaluation of a segmentation model over a data set split, on one process or many, and its results table.

Each process scores a contiguous, disjoint share of the split (no padding, unlike a prepared DataLoader's last
batch), accumulates a `ConfusionMatrix` on its device, and the matrices are summed across processes: every image
counts exactly once. Images are predicted at their own size (never padded to a common one, which would change the
logits near the padding); consecutive images of equal size share a forward.
"""

import contextlib
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pcaa_hf.data.label_sets import IGNORE_INDEX
from pcaa_hf.inference.segmentation_inference import SegmentationInference

from .metrics import ConfusionMatrix


def process_share(length, num_processes, process_index):
    """The indices of `range(length)` that process `process_index` of `num_processes` evaluates (contiguous)."""
    base, extra = divmod(length, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


class IndexedShare(Dataset):
    """Examples `indices` of a (transformed) data set, each returned with its index in the full data set."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        index = self.indices[position]
        try:
            return index, self.dataset[index]
        except ValueError as error:  # a transform's complaint (e.g. a label of another size): name the example
            raise ValueError(f"Evaluation example {index}: {error}") from error


def keep_examples(examples):
    """Collate that keeps (index, example) pairs as they are: images are predicted at their own sizes."""
    return examples


def equal_size_groups(examples):
    """Split a batch of (index, example) pairs into runs of consecutive examples with equal image and label sizes."""
    groups = []
    for index, example in examples:
        key = (tuple(np.shape(example["pixel_values"])), tuple(np.shape(example["labels"])))
        if groups and groups[-1][0] == key:
            groups[-1][1].append((index, example))
        else:
            groups.append((key, [(index, example)]))
    return [group for _, group in groups]


def evaluate_segmentation(model, dataset, num_labels, inference=None, accelerator=None, batch_size=1,
                          num_workers=0, ignore_index=IGNORE_INDEX, on_prediction=None, description="Evaluating"):
    """
    Score `model` on `dataset`, a split whose examples hold `pixel_values` (3, h, w) and `labels` (H, W) (e.g. a
    `datasets` split with `pcaa_hf.data.transforms.EvalTransform`); predictions are made at the label's size. The
    model is a PCAA model or an export of one (`pcaa_hf.publishing.exporting.load_exported`).

    inference: a `SegmentationInference` (default: whole image). accelerator: an `accelerate.Accelerator` to share
    the split among processes, run under its autocast and sum the results; every process must call this.
    on_prediction(index, class_map): called with each image's index in `dataset` and its (H, W) int64 numpy
    prediction, on the process that made it. Returns `ConfusionMatrix.compute`'s dict (identical on every process).
    The model is evaluated in eval mode and put back in its previous mode.
    """
    inference = inference or SegmentationInference()
    if len(dataset) == 0:
        raise ValueError("The evaluation split holds no images.")
    if accelerator is not None:
        # The bare module: a DistributedDataParallel wrapper may synchronise buffers at every forward, which would
        # hang when processes run different numbers of forwards.
        if isinstance(model, torch.nn.Module):
            model = accelerator.unwrap_model(model)
        num_processes, process_index = accelerator.num_processes, accelerator.process_index
        autocast, is_main = accelerator.autocast, accelerator.is_main_process
    else:
        num_processes, process_index, autocast, is_main = 1, 0, contextlib.nullcontext, True
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
    else:  # an exported model (transformers' ExportedModel), which takes inputs where it runs
        device, dtype = model.device, model.dtype
    share = IndexedShare(dataset, process_share(len(dataset), num_processes, process_index))
    # An explicit generator keeps the global RNG untouched (a DataLoader draws a seed from it otherwise), so that
    # evaluating in the middle of training does not change the training run.
    loader = DataLoader(share, batch_size=batch_size, num_workers=num_workers, collate_fn=keep_examples,
                        generator=torch.Generator())
    metric = ConfusionMatrix(num_labels, ignore_index, device=device)
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        with tqdm(total=len(dataset), desc=description, disable=not is_main, unit="img") as progress:
            for batch in loader:
                for group in equal_size_groups(batch):
                    pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for _, example in group])
                    labels = torch.stack([torch.as_tensor(np.asarray(example["labels"])) for _, example in group])
                    labels = labels.to(device)
                    with autocast():
                        predictions = inference.predict(
                            model, pixel_values.to(device, dtype), labels.shape[-2:])
                    try:
                        metric.update(predictions, labels)
                    except ValueError as error:
                        indices = ", ".join(str(index) for index, _ in group)
                        raise ValueError(f"Evaluation example(s) {indices}: {error}") from error
                    if on_prediction is not None:
                        for (index, _), prediction in zip(group, predictions.cpu().numpy()):
                            on_prediction(index, prediction)
                # Other processes advance at about the same rate; the bar shows the whole split's progress.
                progress.update(min(len(batch) * num_processes, progress.total - progress.n))
    finally:
        if was_training is not None:
            model.train(was_training)
    return metric.compute(accelerator)


def metrics_to_json(metrics, id2label):
    """`ConfusionMatrix.compute`'s dict as JSON-ready values: per-class figures by class name, NaN as None."""
    def number(value):
        value = float(value)
        return value if math.isfinite(value) else None

    results = {key: number(metrics[key]) for key in ("mean_iou", "mean_accuracy", "overall_accuracy",
                                                    "mean_iou_absent_as_zero")}
    for key in ("per_category_iou", "per_category_accuracy"):
        results[key] = {id2label[index]: number(value) for index, value in enumerate(metrics[key])}
    results["num_images"] = metrics["num_images"]
    return results


def results_table(metrics, id2label):
    """A plain-text table of per-class IoU and accuracy (in %) followed by aAcc, mIoU and mAcc."""
    width = max([len("Class")] + [len(str(name)) for name in id2label.values()])
    lines = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}", f"{'-' * width}  {'-' * 6}  {'-' * 6}"]

    def percent(value):
        return f"{100 * value:6.2f}" if np.isfinite(value) else f"{'nan':>6}"

    for index, (iou, accuracy) in enumerate(zip(metrics["per_category_iou"], metrics["per_category_accuracy"])):
        lines.append(f"{id2label.get(index, index)!s:<{width}}  {percent(iou)}  {percent(accuracy)}")
    lines.append(f"aAcc {percent(metrics['overall_accuracy']).strip()}  mIoU {percent(metrics['mean_iou']).strip()}  "
                 f"mAcc {percent(metrics['mean_accuracy']).strip()}")
    if "mean_iou_absent_as_zero" in metrics:
        lines.append(f"mIoU counting classes absent from the split as 0 (the authors' script): "
                     f"{percent(metrics['mean_iou_absent_as_zero']).strip()}")
    return "\n".join(lines)


__all__ = ["evaluate_segmentation", "metrics_to_json", "process_share", "results_table"]
