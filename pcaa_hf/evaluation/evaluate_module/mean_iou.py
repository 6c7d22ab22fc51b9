"""An `evaluate` metric computing mean IoU with `pcaa_hf.evaluation.metrics.mean_iou`: same arguments and results as
the Hub's `mean_iou` metric, available offline. Load it with
`evaluate.load(pcaa_hf.evaluation.metrics.EVALUATE_MODULE)`."""

import datasets
import evaluate
import numpy as np

from pcaa_hf.evaluation.metrics import integer_map, mean_iou

_DESCRIPTION = """
Mean Intersection-over-Union over a whole split: per class, the pixels where prediction and reference agree divided
by the pixels where either has the class, from one confusion matrix accumulated over every image. Classes absent from
both predictions and references are NaN and left out of the means. Also mean class accuracy and overall pixel
accuracy. Values outside [0, num_labels) (other than the ignore index in references) raise an error.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `ndarray`): predicted class-id maps, each (height, width): numpy arrays of any integer
        dtype, tensors, PIL images or nested lists; or one stacked (batch, height, width) array or tensor.
    references (`list` of `ndarray`): reference class-id maps, each of its prediction's shape, in the same forms.
    num_labels (`int`): number of classes.
    ignore_index (`int`): reference value that is not scored (255 for Cityscapes and ADE20K).
    nan_to_num (`float`, *optional*): replace NaN results by this value.
    label_map (`dict`, *optional*): reference value -> new value, applied in order before scoring.
    reduce_labels (`bool`, *optional*, defaults to `False`): references 0 -> 255 and v -> v - 1 (ADE20K).
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats), `per_category_iou`, `per_category_accuracy` (arrays).
Examples:
    >>> import evaluate, numpy as np, pcaa_hf.evaluation.metrics
    >>> metric = evaluate.load(pcaa_hf.evaluation.metrics.EVALUATE_MODULE)
    >>> metric.compute(predictions=[np.array([[0, 1]])], references=[np.array([[0, 0]])], num_labels=2,
    ...                ignore_index=255)["mean_iou"]
    0.25
"""

_CITATION = """
@inproceedings{liu2022partial,
  title={Partial Class Activation Attention for Semantic Segmentation},
  author={Liu, Sun-Ao and Xie, Hongtao and Xu, Hai and Zhang, Yongdong and Tian, Qi},
  booktitle={CVPR},
  year={2022}
}
"""


# The map dtypes the Image feature below stores as they are (PNG or TIFF); maps of other integer dtypes go as int32.
STORED_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)


def storable_map(class_map, name):
    """
    One (height, width) class-id map, as a numpy array, tensor, PIL image or nested list, as a numpy array that the
    Image feature stores losslessly: uint8, uint16, int16 and int32 as they are, other integer dtypes as int32. What
    is no such map (ragged rows, fractions, another shape) or holds values beyond int32, which the encoding would wrap
    silently, is refused with an error naming `name`.
    """
    if isinstance(class_map, (list, tuple)):
        try:
            class_map = np.asarray(class_map)
        except ValueError:  # numpy's own message names neither the map nor the problem
            raise ValueError(f"{name} must be a (height, width) map of class ids, got rows of different "
                             "lengths.") from None
    class_map = integer_map(class_map, name)
    if class_map.dtype not in STORED_DTYPES:
        limits = np.iinfo(np.int32)
        if class_map.size and (class_map.min() < limits.min or class_map.max() > limits.max):
            raise ValueError(f"{name} holds values outside the int32 range: [{class_map.min()}, {class_map.max()}].")
        class_map = class_map.astype(np.int32)
    return class_map


class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Maps travel as PNG images, as in the Hub's `mean_iou`: compact, any size, decoded back losslessly.
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """
        Add a batch of prediction and reference maps: each a list of maps (see `storable_map`) or one stacked
        (batch, height, width) array or tensor.
        """
        predictions, references = (
            None if maps is None else [storable_map(class_map, f"{name}[{index}]")
                                       for index, class_map in enumerate(maps)]
            for name, maps in (("predictions", predictions), ("references", references))
        )
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and reference map (see `storable_map`); `evaluate` also takes them as `predictions=`."""
        prediction = kwargs.pop("predictions", prediction)
        reference = kwargs.pop("references", reference)
        super().add(prediction=None if prediction is None else storable_map(prediction, "prediction"),
                    reference=None if reference is None else storable_map(reference, "reference"), **kwargs)

    def _compute(self, predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                 reduce_labels=False):
        return mean_iou(predictions, references, num_labels, ignore_index, nan_to_num=nan_to_num,
                        label_map=label_map, reduce_labels=reduce_labels)
