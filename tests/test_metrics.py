"""
Tests for `pcaa_hf.evaluation.metrics` (`mean_iou`, `ConfusionMatrix`, `summarise_confusion`) and the offline `evaluate`
module `pcaa_hf/evaluate_module/mean_iou.py`.

`reference_mean_iou` below is an independent, deliberately plain re-statement of the conventions of Hugging Face
`evaluate`'s `mean_iou` metric (per image: `label_map` pairs applied in order, then `reduce_labels`, then the ignore
index dropped; per class: intersection and union pixel counts summed over all images). All arithmetic is float64 on
exact integer counts, so the library must agree with it bit for bit: comparisons use exact equality (NaN == NaN).
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pcaa_hf.evaluation.metrics import EVALUATE_MODULE, METRIC_KEYS, ConfusionMatrix, mean_iou, summarise_confusion

KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
ARRAY_KEYS = ("per_category_iou", "per_category_accuracy")
SCALAR_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy")


def reference_mean_iou(predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                       reduce_labels=False):
    """evaluate's `mean_iou`, written out with per-image, per-class loops."""
    intersection = np.zeros(num_labels, dtype=np.int64)
    predicted_area = np.zeros(num_labels, dtype=np.int64)
    reference_area = np.zeros(num_labels, dtype=np.int64)
    for prediction, reference in zip(predictions, references):
        prediction = np.array(prediction, dtype=np.int64)
        reference = np.array(reference, dtype=np.int64)  # a copy: the caller's map stays as it was
        for old, new in (label_map or {}).items():
            reference[reference == old] = new
        if reduce_labels:
            reference[reference == 0] = 255
            reference = reference - 1
            reference[reference == 254] = 255
        scored = reference != ignore_index
        prediction, reference = prediction[scored], reference[scored]
        for c in range(num_labels):
            intersection[c] += np.count_nonzero((prediction == c) & (reference == c))
            predicted_area[c] += np.count_nonzero(prediction == c)
            reference_area[c] += np.count_nonzero(reference == c)
    union = predicted_area + reference_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0 / 0 and the mean of an all-NaN array
        iou = intersection.astype(np.float64) / union.astype(np.float64)
        accuracy = intersection.astype(np.float64) / reference_area.astype(np.float64)
        result = {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": np.float64(intersection.sum()) / np.float64(reference_area.sum()),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if nan_to_num is not None:
        result = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in result.items()}
    return result


def assert_same_metrics(actual, expected, num_labels=None, context=""):
    """Exactly the five keys, float64 scalars and (K,) float64 arrays, bit-identical values (NaN matches NaN)."""
    assert set(actual) == set(KEYS)
    for key in SCALAR_KEYS:
        assert isinstance(actual[key], np.float64), (key, type(actual[key]))
    for key in ARRAY_KEYS:
        assert isinstance(actual[key], np.ndarray) and actual[key].dtype == np.float64, key
        if num_labels is not None:
            assert actual[key].shape == (num_labels,), key
    for key in KEYS:
        np.testing.assert_array_equal(actual[key], expected[key], strict=True, err_msg=f"{context} {key}")


def random_maps(rng, num_labels, sizes, dtype=np.int64, ignore_index=255, ignore_rate=0.1, error_rate=0.3):
    """References with ~10 % ignored pixels, and predictions that agree with them on most pixels."""
    predictions, references = [], []
    for size in sizes:
        reference = rng.integers(0, num_labels, size)
        prediction = np.where(rng.random(size) < error_rate, rng.integers(0, num_labels, size), reference)
        reference = np.where(rng.random(size) < ignore_rate, ignore_index, reference)
        predictions.append(prediction.astype(dtype))
        references.append(reference.astype(dtype))
    return predictions, references


# ---------------------------------------------------------------------------------------------------------------
# The reference implementation itself, and the result's shape
# ---------------------------------------------------------------------------------------------------------------

# Scored (prediction, reference) pixels: (0, 0), (1, 1), (1, 2), (2, 2), (0, 1); one pixel ignored; class 3 absent.
HAND_PREDICTION = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)
HAND_REFERENCE = np.array([[0, 1, 2], [2, 255, 1]], dtype=np.uint8)
HAND_IOU = np.array([1 / 2, 1 / 3, 1 / 2, np.nan])
HAND_ACCURACY = np.array([1 / 1, 1 / 2, 1 / 2, np.nan])


@pytest.mark.parametrize("implementation", [reference_mean_iou, mean_iou])
def test_hand_computed_example(implementation):
    result = implementation([HAND_PREDICTION], [HAND_REFERENCE], num_labels=4, ignore_index=255)
    np.testing.assert_array_equal(result["per_category_iou"], HAND_IOU)
    np.testing.assert_array_equal(result["per_category_accuracy"], HAND_ACCURACY)
    assert result["overall_accuracy"] == 3 / 5
    assert result["mean_iou"] == pytest.approx(4 / 9, rel=1e-15)
    assert result["mean_accuracy"] == pytest.approx(2 / 3, rel=1e-15)


def test_result_keys_and_types():
    assert METRIC_KEYS == KEYS
    result = mean_iou([HAND_PREDICTION], [HAND_REFERENCE], num_labels=4, ignore_index=255)
    assert_same_metrics(result, reference_mean_iou([HAND_PREDICTION], [HAND_REFERENCE], 4, 255), num_labels=4)


# ---------------------------------------------------------------------------------------------------------------
# mean_iou against the reference implementation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("num_labels", [1, 2, 19, 150])
def test_random_maps_match_reference(num_labels, dtype):
    rng = np.random.default_rng([num_labels, np.dtype(dtype).num])
    predictions, references = random_maps(rng, num_labels, [(1, 1), (5, 7), (48, 64), (97, 33)], dtype)
    expected = reference_mean_iou(predictions, references, num_labels, 255)
    # The comparison means something: real figures, not all-NaN; imperfect predictions when there is a choice.
    assert np.isfinite(expected["mean_iou"]) and np.isfinite(expected["overall_accuracy"])
    if num_labels > 1:
        assert 0 < expected["mean_iou"] < 1
    assert_same_metrics(mean_iou(predictions, references, num_labels, 255), expected, num_labels)


@pytest.mark.parametrize("size", [(1, 1), (3, 200), (256, 256)])
def test_single_map_of_each_size_matches_reference(size):
    rng = np.random.default_rng(size)
    predictions, references = random_maps(rng, 19, [size], np.uint8)
    expected = reference_mean_iou(predictions, references, 19, 255)
    assert_same_metrics(mean_iou(predictions, references, 19, 255), expected)


def test_maps_of_different_sizes_are_pooled_not_averaged_per_image():
    # Image 1: one pixel, wrong. Image 2: 99 pixels, right. Pooled accuracy is 99 %, the per-image average 50 %.
    predictions = [np.array([[1]]), np.zeros((9, 11), dtype=np.int64)]
    references = [np.array([[0]]), np.zeros((9, 11), dtype=np.int64)]
    result = mean_iou(predictions, references, num_labels=2, ignore_index=255)
    assert result["overall_accuracy"] == 99 / 100
    np.testing.assert_array_equal(result["per_category_iou"], [99 / 100, 0.0])
    np.testing.assert_array_equal(result["per_category_accuracy"], [99 / 100, np.nan])
    assert_same_metrics(result, reference_mean_iou(predictions, references, 2, 255))


def test_all_references_ignored_gives_nan_everywhere():
    rng = np.random.default_rng(0)
    predictions = [rng.integers(0, 5, (6, 4)), rng.integers(0, 5, (3, 3))]
    references = [np.full((6, 4), 255), np.full((3, 3), 255)]
    result = mean_iou(predictions, references, num_labels=5, ignore_index=255)
    for key in KEYS:
        assert np.isnan(result[key]).all(), key
    assert_same_metrics(result, reference_mean_iou(predictions, references, 5, 255), num_labels=5)
    zeroed = mean_iou(predictions, references, num_labels=5, ignore_index=255, nan_to_num=0)
    for key in KEYS:
        assert (zeroed[key] == 0).all(), key


def test_class_absent_from_both_sides_is_nan_and_left_out_of_means():
    prediction = np.array([[0, 0, 1, 3], [3, 3, 1, 0]])
    reference = np.array([[0, 1, 1, 3], [3, 0, 1, 0]])
    result = mean_iou([prediction], [reference], num_labels=4, ignore_index=255)
    assert np.isnan(result["per_category_iou"][2]) and np.isnan(result["per_category_accuracy"][2])
    present = [0, 1, 3]
    assert np.isfinite(result["per_category_iou"][present]).all()
    assert result["mean_iou"] == np.mean(result["per_category_iou"][present])
    assert result["mean_accuracy"] == np.mean(result["per_category_accuracy"][present])
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 4, 255))


def test_class_only_in_predictions_has_zero_iou_and_nan_accuracy():
    prediction = np.array([[0, 2], [1, 1]])
    reference = np.array([[0, 0], [1, 1]])
    result = mean_iou([prediction], [reference], num_labels=3, ignore_index=255)
    np.testing.assert_array_equal(result["per_category_iou"], [1 / 2, 1.0, 0.0])
    np.testing.assert_array_equal(result["per_category_accuracy"], [1 / 2, 1.0, np.nan])
    assert result["mean_iou"] == pytest.approx(1 / 2, rel=1e-15)  # the 0 counts in the mean
    assert result["mean_accuracy"] == 3 / 4  # the NaN does not
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 3, 255))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_reduce_labels(dtype):
    # 0 -> 255 (ignored), v -> v - 1, 255 stays 255 (ignored).
    prediction = np.array([[0, 0, 1], [2, 2, 0]], dtype=dtype)
    reference = np.array([[0, 1, 2], [3, 255, 2]], dtype=dtype)
    result = mean_iou([prediction], [reference], num_labels=3, ignore_index=255, reduce_labels=True)
    # Scored (prediction, reduced reference): (0, 0), (1, 1), (2, 2), (0, 1).
    np.testing.assert_array_equal(result["per_category_iou"], [1 / 2, 1 / 2, 1.0])
    np.testing.assert_array_equal(result["per_category_accuracy"], [1.0, 1 / 2, 1.0])
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 3, 255, reduce_labels=True))

    rng = np.random.default_rng(1)
    predictions, references = random_maps(rng, 19, [(20, 30), (7, 9)], dtype)
    references = [np.where(reference == 255, 255, reference + 1).astype(dtype) for reference in references]
    references[0][0, :5] = 0
    expected = reference_mean_iou(predictions, references, 19, 255, reduce_labels=True)
    assert_same_metrics(mean_iou(predictions, references, 19, 255, reduce_labels=True), expected)


def test_label_map_applies_pairs_in_order():
    prediction = np.array([[1, 2, 3, 3]])
    reference = np.array([[1, 2, 3, 0]])
    result = mean_iou([prediction], [reference], num_labels=4, ignore_index=255, label_map={1: 2, 2: 3})
    # {1: 2, 2: 3} sends both 1 and 2 to 3: the mapped reference is [3, 3, 3, 0].
    np.testing.assert_array_equal(result["per_category_accuracy"], [0.0, np.nan, np.nan, 1 / 3])
    np.testing.assert_array_equal(result["per_category_iou"], [0.0, 0.0, 0.0, 1 / 4])
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 4, 255, label_map={1: 2, 2: 3}))


def test_label_map_before_reduce_labels():
    prediction = np.array([[4, 0, 1, 1]], dtype=np.uint8)
    reference = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    label_map = {0: 5, 3: 0}
    result = mean_iou([prediction], [reference], 5, 255, label_map=label_map, reduce_labels=True)
    # label_map first: [5, 1, 2, 0]; then reduce_labels: [4, 0, 1, ignored]. (The other order gives [ignored, ...].)
    np.testing.assert_array_equal(result["per_category_accuracy"], [1.0, 1.0, np.nan, np.nan, 1.0])
    assert result["overall_accuracy"] == 1.0
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 5, 255, label_map=label_map,
                                                   reduce_labels=True))

    rng = np.random.default_rng(2)
    predictions, references = random_maps(rng, 10, [(16, 16), (5, 40)], np.uint8)
    label_map = {3: 7, 7: 9, 9: 0, 254: 1}
    expected = reference_mean_iou(predictions, references, 10, 255, label_map=label_map, reduce_labels=True)
    actual = mean_iou(predictions, references, 10, 255, label_map=label_map, reduce_labels=True)
    assert_same_metrics(actual, expected)


def test_label_map_onto_the_ignore_index_and_into_the_label_range():
    prediction = np.array([[0, 1, 1, 0]])
    reference = np.array([[0, 1, 200, 7]])
    label_map = {200: 1, 7: 255}  # 200 would be out of range, 7 becomes the ignore index
    result = mean_iou([prediction], [reference], num_labels=2, ignore_index=255, label_map=label_map)
    np.testing.assert_array_equal(result["per_category_iou"], [1.0, 1.0])
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 2, 255, label_map=label_map))

    # Values beyond 8 bits on either side of the map, with an ignore index beyond 8 bits too.
    prediction = np.array([[299, 0, 256, 1]], dtype=np.uint16)
    reference = np.array([[5, 0, 7, 300]], dtype=np.uint16)
    label_map = {5: 299, 7: 256, 300: 1000}
    result = mean_iou([prediction], [reference], num_labels=300, ignore_index=1000, label_map=label_map)
    assert result["overall_accuracy"] == 1.0 and np.isfinite(result["per_category_iou"][[0, 256, 299]]).all()
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 300, 1000, label_map=label_map))


@pytest.mark.parametrize("nan_to_num", [0, -1, 0.5])
def test_nan_to_num(nan_to_num):
    prediction = np.array([[0, 2], [1, 1]])
    reference = np.array([[0, 0], [1, 1]])
    plain = mean_iou([prediction], [reference], num_labels=4, ignore_index=255)
    result = mean_iou([prediction], [reference], num_labels=4, ignore_index=255, nan_to_num=nan_to_num)
    for key in ARRAY_KEYS:
        nan = np.isnan(plain[key])
        assert nan.any(), key
        assert (result[key][nan] == nan_to_num).all() and (result[key][~nan] == plain[key][~nan]).all(), key
    assert_same_metrics(result, reference_mean_iou([prediction], [reference], 4, 255, nan_to_num=nan_to_num))

    everything_ignored = mean_iou([prediction], [np.full((2, 2), 255)], 4, 255, nan_to_num=nan_to_num)
    for key in KEYS:
        assert (everything_ignored[key] == nan_to_num).all(), key


def test_ignore_index_inside_the_label_range():
    rng = np.random.default_rng(3)
    predictions, references = random_maps(rng, 5, [(12, 10), (4, 4)], np.uint8, ignore_index=0, ignore_rate=0.2)
    result = mean_iou(predictions, references, num_labels=5, ignore_index=0)
    assert np.isnan(result["per_category_accuracy"][0])  # no reference pixel of class 0 is scored ...
    assert result["per_category_iou"][0] == 0.0  # ... but predictions of 0 elsewhere are false positives
    assert_same_metrics(result, reference_mean_iou(predictions, references, 5, 0))


def test_negative_ignore_index_and_mixed_dtypes():
    # One call mixing dtypes and value ranges, so the value table is rebuilt and widened between maps.
    rng = np.random.default_rng(4)
    predictions, references = [], []
    for index, dtype in enumerate([np.uint8, np.int32, np.uint16, np.int64, np.int16, np.uint8, np.int8] * 3):
        size = (3 + index, 17 - index % 5)
        prediction, reference = random_maps(rng, 6, [size], np.int64, ignore_index=-1)
        if np.dtype(dtype).kind == "u":
            reference[0][reference[0] == -1] = 5
        predictions.append(prediction[0].astype(dtype))
        references.append(reference[0].astype(dtype))
    expected = reference_mean_iou(predictions, references, 6, -1)
    assert_same_metrics(mean_iou(predictions, references, 6, -1), expected)


@pytest.mark.parametrize("ignore_index", [2**20, 2**40])
def test_far_apart_reference_values(ignore_index):
    # An ignore index far from the class ids: a large value table (2**20) or a lookup of the distinct values (2**40).
    rng = np.random.default_rng(5)
    predictions, references = random_maps(rng, 7, [(30, 20), (9, 9)], np.int64, ignore_index=ignore_index)
    expected = reference_mean_iou(predictions, references, 7, ignore_index)
    assert_same_metrics(mean_iou(predictions, references, 7, ignore_index), expected)
    references[1][0, 0] = ignore_index + 1
    with pytest.raises(ValueError, match=rf"references\[1\].*\[{ignore_index + 1}\]"):
        mean_iou(predictions, references, 7, ignore_index)


def test_many_small_maps_match_reference():
    rng = np.random.default_rng(6)
    sizes = [tuple(rng.integers(1, 20, 2)) for _ in range(64)]
    predictions, references = random_maps(rng, 19, sizes, np.uint8)
    expected = reference_mean_iou(predictions, references, 19, 255)
    assert_same_metrics(mean_iou(predictions, references, 19, 255), expected)


def test_torch_pil_list_and_other_inputs_match_numpy():
    rng = np.random.default_rng(7)
    predictions, references = random_maps(rng, 19, [(8, 6)] * 3, np.uint8)
    expected = mean_iou(predictions, references, 19, 255)
    assert_same_metrics(expected, reference_mean_iou(predictions, references, 19, 255))

    pil_predictions = [Image.fromarray(prediction) for prediction in predictions]
    pil_references = [Image.fromarray(reference) for reference in references]
    assert {image.mode for image in pil_predictions + pil_references} == {"L"}
    variants = {
        "torch int64": ([torch.from_numpy(p).long() for p in predictions],
                        [torch.from_numpy(r).long() for r in references]),
        "torch uint8": ([torch.from_numpy(p) for p in predictions], [torch.from_numpy(r) for r in references]),
        "PIL": (pil_predictions, pil_references),
        "lists": ([p.tolist() for p in predictions], [r.tolist() for r in references]),
        "mixed": ([pil_predictions[0], predictions[1].tolist(), torch.from_numpy(predictions[2])],
                  [references[0].astype(np.int32), torch.from_numpy(references[1]), pil_references[2]]),
        "stacked arrays": (np.stack(predictions), np.stack(references)),
        "stacked tensors": (torch.from_numpy(np.stack(predictions)), torch.from_numpy(np.stack(references))),
        "generators": ((p for p in predictions), (r for r in references)),
        "integral floats": ([p.astype(np.float32) for p in predictions], [r.astype(np.float64) for r in references]),
    }
    for name, (these_predictions, these_references) in variants.items():
        assert_same_metrics(mean_iou(these_predictions, these_references, 19, 255), expected, context=name)

    masks = [rng.random((5, 5)) < 0.5 for _ in range(2)]
    as_bool = mean_iou(masks, masks[::-1], num_labels=2, ignore_index=255)
    as_int = [mask.astype(np.int64) for mask in masks]
    assert_same_metrics(as_bool, reference_mean_iou(as_int, as_int[::-1], 2, 255))


def test_inputs_are_not_modified():
    rng = np.random.default_rng(8)
    predictions, references = random_maps(rng, 5, [(10, 10), (4, 7)], np.uint8)
    references[0][:2] = 0
    references[1][0] = 1
    tensors = [torch.from_numpy(reference.astype(np.int64)) for reference in references]
    originals = [reference.copy() for reference in references] + [tensor.clone() for tensor in tensors]
    prediction_copies = [prediction.copy() for prediction in predictions]
    label_map = {1: 2, 2: 3, 0: 1}
    for these_references in (references, tensors):
        result = mean_iou(predictions, these_references, 5, 255, label_map=label_map, reduce_labels=True)
        assert_same_metrics(result, reference_mean_iou(predictions, references, 5, 255, label_map=label_map,
                                                       reduce_labels=True))
    for reference, original in zip(references + tensors, originals):
        np.testing.assert_array_equal(np.asarray(reference), np.asarray(original))
    for prediction, original in zip(predictions, prediction_copies):
        np.testing.assert_array_equal(prediction, original)
    # The mapping did happen (so the check above is not vacuous).
    unmapped = mean_iou(predictions, references, 5, 255)
    assert not np.array_equal(unmapped["per_category_iou"], result["per_category_iou"], equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# mean_iou errors
# ---------------------------------------------------------------------------------------------------------------


def test_out_of_range_predictions_raise_naming_the_map_and_values():
    references = [np.zeros((2, 3), dtype=np.int64)] * 2
    good = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=r"predictions\[1\] holds values outside \[0, 4\): \[-1, 4, 9\]"):
        mean_iou([good, np.array([[0, -1, 4], [9, 4, 1]])], references, num_labels=4, ignore_index=255)
    with pytest.raises(ValueError, match=r"predictions\[0\] .*\[255\]"):
        mean_iou([np.full((2, 3), 255, dtype=np.uint8), good], references, num_labels=4, ignore_index=255)
    # Predictions are checked everywhere, also where the reference is ignored (evaluate would mask them out).
    with pytest.raises(ValueError, match=r"predictions\[0\] .*\[7\]"):
        mean_iou([np.array([[7]])], [np.array([[255]])], num_labels=4, ignore_index=255)


def test_out_of_range_references_raise_naming_the_map_and_values():
    prediction = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"references\[0\] .*outside \[0, 3\) or the ignore index 255: \[-2, 3\]"):
        mean_iou([prediction], [np.array([[0, 3], [-2, 255]])], num_labels=3, ignore_index=255)
    with pytest.raises(ValueError, match=r"references\[1\] .*\[254\]"):
        mean_iou([prediction] * 2, [np.zeros((2, 2), np.uint8), np.full((2, 2), 254, np.uint8)], 3, 255)
    # Values produced by label_map or reduce_labels are checked after mapping.
    with pytest.raises(ValueError, match=r"references\[0\] \(after label_map/reduce_labels\) .*\[7\]"):
        mean_iou([prediction], [np.array([[0, 1], [1, 2]])], num_labels=3, ignore_index=255, label_map={1: 7})
    with pytest.raises(ValueError, match=r"references\[0\] .*\[3\]"):
        mean_iou([prediction], [np.array([[4, 1], [1, 0]])], num_labels=3, ignore_index=255, reduce_labels=True)


@pytest.mark.parametrize("num_bad, tail", [(10, r"\]\.$"), (11, r"\] and 1 more\.$"), (28, r"\] and 18 more\.$")])
def test_many_out_of_range_values_are_summarised(num_bad, tail):
    prediction = np.arange(2, 2 + num_bad).reshape(1, num_bad)
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 5, 6, 7, 8, 9, 10, 11" + tail):
        mean_iou([prediction], [np.zeros((1, num_bad), dtype=np.int64)], num_labels=2, ignore_index=255)


def test_shape_mismatch_raises_naming_the_index():
    maps = [np.zeros((4, 5), dtype=np.uint8)] * 3
    with pytest.raises(ValueError, match=r"predictions\[2\] has shape \(4, 5\) but references\[2\] has shape \(5, 4\)"):
        mean_iou(maps, [*maps[:2], np.zeros((5, 4), dtype=np.uint8)], num_labels=2, ignore_index=255)


def test_list_length_errors():
    one = [np.zeros((2, 2), dtype=np.uint8)]
    with pytest.raises(ValueError, match="at least one"):
        mean_iou([], [], num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match="at least one"):
        mean_iou([], one, num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match="Got 1 predictions but 2 references"):
        mean_iou(one, one * 2, num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match="Got 2 predictions but 0 references"):
        mean_iou(one * 2, [], num_labels=2, ignore_index=255)


@pytest.mark.parametrize("num_labels", [0, -3, True, 2.0, "2", None])
def test_bad_num_labels(num_labels):
    one = [np.zeros((2, 2), dtype=np.uint8)]
    with pytest.raises(ValueError, match="num_labels must be a positive integer"):
        mean_iou(one, one, num_labels=num_labels, ignore_index=255)


def test_bad_map_types_and_shapes():
    two_d = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"predictions\[0\] must be a \(height, width\) map .*\(1, 2, 2\)"):
        mean_iou([two_d[None]], [two_d[None]], num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match=r"references\[1\] must be a \(height, width\) map .*\(4,\)"):
        mean_iou([two_d, two_d], [two_d, np.zeros(4, np.int64)], num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match=r"references\[0\] must hold integer class ids, got non-integer"):
        mean_iou([two_d], [two_d + 0.5], num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match=r"predictions\[0\] must hold integer class ids, got non-integer"):
        mean_iou([np.full((2, 2), np.nan)], [two_d], num_labels=2, ignore_index=255)
    with pytest.raises(ValueError, match=r"predictions\[0\] must hold integer class ids, got dtype"):
        mean_iou([np.array([["a", "b"]])], [np.array([[0, 1]])], num_labels=2, ignore_index=255)


# ---------------------------------------------------------------------------------------------------------------
# summarise_confusion
# ---------------------------------------------------------------------------------------------------------------


def test_summarise_confusion_hand_computed():
    # Rows: reference, columns: prediction; the scored pixels of HAND_PREDICTION / HAND_REFERENCE.
    matrix = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    result = summarise_confusion(matrix)
    np.testing.assert_array_equal(result["per_category_iou"], HAND_IOU)
    np.testing.assert_array_equal(result["per_category_accuracy"], HAND_ACCURACY)
    assert_same_metrics(result, reference_mean_iou([HAND_PREDICTION], [HAND_REFERENCE], 4, 255), num_labels=4)
    zeroed = summarise_confusion(matrix, nan_to_num=-1)
    assert_same_metrics(zeroed, reference_mean_iou([HAND_PREDICTION], [HAND_REFERENCE], 4, 255, nan_to_num=-1))

    empty = summarise_confusion(np.zeros((3, 3), dtype=np.int64))
    for key in KEYS:
        assert np.isnan(empty[key]).all(), key


def test_summarise_confusion_is_exact_on_huge_counts():
    # Counts beyond float32's and past 2**40: the arithmetic stays float64 on exact integers.
    matrix = np.array([[2**41 + 1, 3], [5, 2**40 + 7]], dtype=np.int64)
    result = summarise_confusion(matrix)
    assert result["per_category_iou"][0] == np.float64(2**41 + 1) / np.float64(2**41 + 1 + 3 + 5)
    assert result["overall_accuracy"] == np.float64(2**41 + 2**40 + 8) / np.float64(2**41 + 2**40 + 16)


# ---------------------------------------------------------------------------------------------------------------
# ConfusionMatrix
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [255, 0])
def test_confusion_matrix_streaming_equals_mean_iou(ignore_index):
    rng = np.random.default_rng(9)
    num_labels = 19
    confusion = ConfusionMatrix(num_labels, ignore_index=ignore_index)
    all_predictions, all_references = [], []
    for batch_size, size in [(4, (16, 12)), (1, (5, 9)), (3, (16, 12))]:
        predictions, references = random_maps(rng, num_labels, [size] * batch_size, np.int64, ignore_index)
        confusion.update(torch.from_numpy(np.stack(predictions)), torch.from_numpy(np.stack(references)))
        all_predictions += predictions
        all_references += references
    predictions, references = random_maps(rng, num_labels, [(7, 3)], np.uint8, ignore_index)
    confusion.update(torch.from_numpy(predictions[0]), torch.from_numpy(references[0]))  # one (H, W) map
    all_predictions += predictions
    all_references += references

    result = confusion.compute()
    assert set(result) == set(KEYS) | {"mean_iou_absent_as_zero", "num_images"}
    assert result["num_images"] == 4 + 1 + 3 + 1
    expected = mean_iou(all_predictions, all_references, num_labels, ignore_index)
    assert_same_metrics(expected, reference_mean_iou(all_predictions, all_references, num_labels, ignore_index))
    assert_same_metrics({key: result[key] for key in KEYS}, expected, num_labels)
    assert np.isfinite(expected["mean_iou"]) and 0 < expected["mean_iou"] < 1


def test_confusion_matrix_absent_as_zero_hand_computed():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([[0, 1, 1, 1, 2]]), torch.tensor([[0, 0, 1, 1, 255]]))
    result = confusion.compute()
    # Class 0: TP 1, FN 1 -> 1/2. Class 1: TP 2, FP 1 -> 2/3. Class 2: predicted only on an ignored pixel -> absent.
    np.testing.assert_array_equal(result["per_category_iou"], [1 / 2, 2 / 3, np.nan])
    assert result["mean_iou"] == pytest.approx(7 / 12, rel=1e-15)
    assert result["mean_iou_absent_as_zero"] == pytest.approx(7 / 18, rel=1e-15)
    assert result["num_images"] == 1
    torch.testing.assert_close(confusion.matrix, torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 0]]))

    # A class only predicted counts 0 in both conventions; only a class absent from both sides differs.
    confusion.update(torch.tensor([[2]]), torch.tensor([[0]]))
    result = confusion.compute()
    np.testing.assert_array_equal(result["per_category_iou"], [1 / 3, 2 / 3, 0.0])
    assert result["mean_iou"] == pytest.approx(1 / 3, rel=1e-15)
    assert result["mean_iou_absent_as_zero"] == pytest.approx(1 / 3, rel=1e-15)
    assert result["num_images"] == 2


def test_confusion_matrix_counts_images():
    confusion = ConfusionMatrix(2)
    confusion.update(torch.zeros(5, 3, 3, dtype=torch.long), torch.zeros(5, 3, 3, dtype=torch.long))
    assert confusion.num_images == 5
    confusion.update(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    assert confusion.num_images == 6
    confusion.update(torch.zeros(0, 3, 3, dtype=torch.long), torch.zeros(0, 3, 3, dtype=torch.long))
    assert confusion.num_images == 6
    confusion.update(np.ones((1, 4, 2), dtype=np.uint8), np.ones((1, 4, 2), dtype=np.uint8))  # numpy is accepted
    assert confusion.compute()["num_images"] == 7
    assert int(confusion.matrix.sum()) == 5 * 9 + 9 + 8
    torch.testing.assert_close(confusion.matrix, torch.tensor([[54, 0], [0, 8]]))


def test_confusion_matrix_reset():
    confusion = ConfusionMatrix(4)
    predictions = torch.tensor([[[0, 1], [2, 3]]])
    references = torch.tensor([[[0, 1], [3, 3]]])
    confusion.update(predictions, references)
    fresh = confusion.compute()
    confusion.update(torch.tensor([[1, 1]]), torch.tensor([[0, 2]]))
    confusion.reset()
    assert confusion.num_images == 0 and int(confusion.matrix.abs().sum()) == 0
    empty = confusion.compute()
    assert empty["num_images"] == 0 and np.isnan(empty["mean_iou"]) and empty["mean_iou_absent_as_zero"] == 0
    confusion.update(predictions, references)
    again = confusion.compute()
    assert_same_metrics({key: again[key] for key in KEYS}, {key: fresh[key] for key in KEYS})
    assert again["num_images"] == 1 and again["mean_iou_absent_as_zero"] == fresh["mean_iou_absent_as_zero"]


def test_confusion_matrix_nan_to_num_and_dtypes():
    confusion = ConfusionMatrix(3, ignore_index=255)
    confusion.update(torch.tensor([[0, 1]], dtype=torch.uint8), torch.tensor([[0, 255]], dtype=torch.uint8))
    confusion.update(torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([[0, 0]], dtype=torch.int32))
    result = confusion.compute(nan_to_num=-1)
    expected = reference_mean_iou([[[0, 1]], [[0, 1]]], [[[0, 255]], [[0, 0]]], 3, 255, nan_to_num=-1)
    assert_same_metrics({key: result[key] for key in KEYS}, expected)
    np.testing.assert_array_equal(result["per_category_accuracy"], [2 / 3, -1, -1])


def test_confusion_matrix_compute_sums_across_processes():
    class FakeAccelerator:
        """Two processes that saw the same images; reduces in place, as `torch.distributed.all_reduce` does."""
        num_processes = 2

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor.mul_(2)

    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([[[0, 1, 2, 2]]]), torch.tensor([[[0, 1, 1, 2]]]))
    matrix = confusion.matrix.clone()
    single = confusion.compute()
    combined = confusion.compute(accelerator=FakeAccelerator())
    assert combined["num_images"] == 2
    assert_same_metrics({key: combined[key] for key in KEYS}, {key: single[key] for key in KEYS})
    torch.testing.assert_close(confusion.matrix, matrix)  # the local matrix is not reduced in place
    assert confusion.num_images == 1


def test_confusion_matrix_errors():
    confusion = ConfusionMatrix(3)
    good = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"predictions \(2, 4, 4\) and references \(2, 4, 3\) must be"):
        confusion.update(good, torch.zeros(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="equal shape"):
        confusion.update(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="equal shape"):
        confusion.update(good[None], good[None])
    with pytest.raises(ValueError, match="not floating point"):
        confusion.update(good.float(), good)
    with pytest.raises(ValueError, match="not floating point"):
        confusion.update(good, good.double())
    bad = good.clone()
    bad[0, 0, :3] = torch.tensor([3, -1, 3])
    with pytest.raises(ValueError, match=r"predictions holds values outside \[0, 3\): \[-1, 3\]"):
        confusion.update(bad, good)
    bad[0, 0, :3] = torch.tensor([3, 255, 254])
    with pytest.raises(ValueError, match=r"references holds values outside \[0, 3\) or the ignore index 255: \[3, 254"):
        confusion.update(good, bad)
    # Nothing was counted by the failed updates.
    assert confusion.num_images == 0 and int(confusion.matrix.sum()) == 0


# ---------------------------------------------------------------------------------------------------------------
# The evaluate module
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluate_metric(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
        import evaluate

        return evaluate.load(EVALUATE_MODULE, cache_dir=str(tmp_path_factory.mktemp("evaluate_cache")))


def test_evaluate_module_matches_mean_iou(evaluate_metric):
    rng = np.random.default_rng(10)
    predictions, references = random_maps(rng, 6, [(9, 7), (4, 12), (1, 1)], np.uint8)
    references[0][0, :4] = 0
    copies = [reference.copy() for reference in references]
    for kwargs in [{}, {"label_map": {1: 2, 2: 3}}, {"reduce_labels": True}, {"nan_to_num": -1},
                   {"label_map": {0: 5, 5: 255}, "reduce_labels": True, "nan_to_num": 0}]:
        result = evaluate_metric.compute(predictions=predictions, references=references, num_labels=6,
                                         ignore_index=255, **kwargs)
        expected = mean_iou(predictions, references, 6, 255, **kwargs)
        assert_same_metrics(expected, reference_mean_iou(predictions, references, 6, 255, **kwargs))
        assert_same_metrics(result, expected, num_labels=6)
    for reference, copy in zip(references, copies):
        np.testing.assert_array_equal(reference, copy)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_evaluate_module_wide_dtypes(evaluate_metric, dtype):
    rng = np.random.default_rng(11)
    predictions, references = random_maps(rng, 300, [(20, 20), (3, 5)], dtype, ignore_index=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # datasets: "Downcasting array dtype int64 to int32"
        result = evaluate_metric.compute(predictions=predictions, references=references, num_labels=300,
                                         ignore_index=1000)
    assert_same_metrics(result, reference_mean_iou(predictions, references, 300, 1000), num_labels=300)


def test_evaluate_module_add_batch_then_compute(evaluate_metric):
    rng = np.random.default_rng(12)
    predictions, references = random_maps(rng, 4, [(6, 6), (6, 6), (3, 8), (11, 2)], np.uint8)
    evaluate_metric.add_batch(predictions=predictions[:2], references=references[:2])
    evaluate_metric.add_batch(predictions=predictions[2:], references=references[2:])
    result = evaluate_metric.compute(num_labels=4, ignore_index=255, label_map={3: 255})
    expected = reference_mean_iou(predictions, references, 4, 255, label_map={3: 255})
    assert np.isnan(expected["per_category_accuracy"][3])
    assert_same_metrics(result, expected, num_labels=4)

    for prediction, reference in zip(predictions, references):
        evaluate_metric.add(predictions=prediction, references=reference)
    expected = mean_iou(predictions, references, 4, 255)
    assert_same_metrics(evaluate_metric.compute(num_labels=4, ignore_index=255), expected)


def palette_image(class_map):
    """A mode P image whose palette indices are the values of the uint8 `class_map`."""
    image = Image.fromarray(class_map)
    image.putpalette(list(range(256)) * 3)  # an L image becomes P with its pixel values as the indices
    assert image.mode == "P"
    return image


# What the Hub's `mean_iou` takes as `predictions` / `references`, each made from a list of equal-size uint8 maps.
INPUT_KINDS = {
    "numpy int64 list": lambda maps: [class_map.astype(np.int64) for class_map in maps],
    "numpy uint8 list": lambda maps: [class_map.astype(np.uint8) for class_map in maps],
    "stacked numpy int64": lambda maps: np.stack(maps).astype(np.int64),
    "stacked numpy uint8": lambda maps: np.stack(maps).astype(np.uint8),
    "stacked tensor": lambda maps: torch.from_numpy(np.stack(maps)).long(),
    "tensor list": lambda maps: [torch.from_numpy(class_map).long() for class_map in maps],
    "PIL L": lambda maps: [Image.fromarray(class_map.astype(np.uint8)) for class_map in maps],
    "PIL P": lambda maps: [palette_image(class_map.astype(np.uint8)) for class_map in maps],
    "PIL I": lambda maps: [Image.fromarray(class_map.astype(np.int32)) for class_map in maps],
    "nested lists": lambda maps: [class_map.tolist() for class_map in maps],
    "stacked nested list": lambda maps: np.stack(maps).tolist(),
}


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_evaluate_module_input_kinds(evaluate_metric, kind):
    # The stacked kinds are what the transformers example scripts pass; they used to fail with "The truth value of
    # an array with more than one element is ambiguous".
    convert = INPUT_KINDS[kind]
    result = evaluate_metric.compute(predictions=convert([HAND_PREDICTION]), references=convert([HAND_REFERENCE]),
                                     num_labels=4, ignore_index=255)
    np.testing.assert_array_equal(result["per_category_iou"], HAND_IOU)
    np.testing.assert_array_equal(result["per_category_accuracy"], HAND_ACCURACY)
    assert result["overall_accuracy"] == 3 / 5
    assert_same_metrics(result, reference_mean_iou([HAND_PREDICTION], [HAND_REFERENCE], 4, 255), num_labels=4)

    rng = np.random.default_rng(13)
    predictions, references = random_maps(rng, 19, [(8, 6)] * 3, np.uint8)
    references[1][0, :3] = 0
    for kwargs in [{}, {"nan_to_num": -1}, {"label_map": {1: 2, 2: 3}}, {"reduce_labels": True}]:
        result = evaluate_metric.compute(predictions=convert(predictions), references=convert(references),
                                         num_labels=19, ignore_index=255, **kwargs)
        expected = reference_mean_iou(predictions, references, 19, 255, **kwargs)
        assert_same_metrics(mean_iou(predictions, references, 19, 255, **kwargs), expected)
        assert_same_metrics(result, expected, num_labels=19, context=f"{kind} {kwargs}")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_evaluate_module_any_integer_dtype(evaluate_metric, dtype):
    rng = np.random.default_rng([14, np.dtype(dtype).num])
    predictions, references = random_maps(rng, 19, [(7, 5), (3, 9)], dtype, ignore_index=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_metric.compute(predictions=predictions, references=references, num_labels=19,
                                         ignore_index=100)
    # The maps are stored as they are or as int32, not downcast by `datasets` with a warning.
    assert not [warning for warning in caught if "Downcasting" in str(warning.message)]
    assert_same_metrics(result, reference_mean_iou(predictions, references, 19, 100), num_labels=19)


def test_evaluate_module_add_batch_of_every_kind_then_compute(evaluate_metric):
    rng = np.random.default_rng(15)
    all_predictions, all_references = [], []
    for index, kind in enumerate(INPUT_KINDS):
        size = (4 + index % 3, 9 - index % 4)  # maps of several sizes across the batches
        predictions, references = random_maps(rng, 7, [size] * (1 + index % 2), np.uint8)
        evaluate_metric.add_batch(predictions=INPUT_KINDS[kind](predictions),
                                  references=INPUT_KINDS[kind](references))
        all_predictions += predictions
        all_references += references
    evaluate_metric.add(prediction=torch.tensor([[6, 0]]), reference=[[6, 255]])  # evaluate's own spelling ...
    evaluate_metric.add(predictions=np.array([[1, 2]], np.int64), references=Image.fromarray(np.uint8([[1, 1]])))
    all_predictions += [np.array([[6, 0]]), np.array([[1, 2]])]
    all_references += [np.array([[6, 255]]), np.array([[1, 1]])]  # ... and the plural one its examples use
    result = evaluate_metric.compute(num_labels=7, ignore_index=255)
    assert_same_metrics(result, reference_mean_iou(all_predictions, all_references, 7, 255), num_labels=7)


def test_evaluate_module_as_the_transformers_example_scripts_use_it(evaluate_metric):
    rng = np.random.default_rng(16)
    num_labels = 5
    logits = torch.randn(6, num_labels, 4, 5, requires_grad=True)
    labels = torch.from_numpy(rng.integers(0, num_labels, (6, 4, 5)))

    # run_semantic_segmentation_no_trainer.py: add_batch with gathered (batch, height, width) int64 tensors, labels
    # already reduced (255 ignored), then compute(num_labels=..., ignore_index=255, reduce_labels=False).
    references = labels.masked_fill(torch.from_numpy(rng.random((6, 4, 5)) < 0.2), 255)
    with torch.no_grad():
        for start in (0, 4):
            evaluate_metric.add_batch(predictions=logits[start:start + 4].argmax(dim=1),
                                      references=references[start:start + 4])
    result = evaluate_metric.compute(num_labels=num_labels, ignore_index=255, reduce_labels=False)
    expected = reference_mean_iou(list(logits.argmax(dim=1).numpy()), list(references.numpy()), num_labels, 255)
    assert_same_metrics(result, expected, num_labels)

    # run_semantic_segmentation.py's compute_metrics: one call on stacked int64 numpy arrays, with ignore_index=0
    # and reduce_labels=image_processor.do_reduce_labels (False by default).
    predictions = logits.detach().argmax(dim=1).numpy()
    result = evaluate_metric.compute(predictions=predictions, references=labels.numpy(), num_labels=num_labels,
                                     ignore_index=0, reduce_labels=False)
    expected = reference_mean_iou(list(predictions), list(labels.numpy()), num_labels, 0)
    assert np.isnan(expected["per_category_accuracy"][0]) and np.isfinite(expected["mean_iou"])
    assert_same_metrics(result, expected, num_labels)


def test_evaluate_module_refuses_what_is_no_map_naming_it(evaluate_metric):
    good = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"predictions\[1\] must be a \(height, width\) map .*rows of different"):
        evaluate_metric.compute(predictions=[good, [[0, 1], [1]]], references=[good, good], num_labels=2,
                                ignore_index=255)
    with pytest.raises(ValueError, match=r"references\[0\] must hold integer class ids, got non-integer"):
        evaluate_metric.compute(predictions=[good], references=torch.full((1, 2, 2), 0.5), num_labels=2,
                                ignore_index=255)
    with pytest.raises(ValueError, match=r"predictions\[0\] must be a \(height, width\) map .*\(1, 2, 2\)"):
        evaluate_metric.compute(predictions=good[None, None], references=good[None, None], num_labels=2,
                                ignore_index=255)
    with pytest.raises(ValueError, match=r"reference must be a \(height, width\) map .*\(2, 2, 3\)"):
        evaluate_metric.add(prediction=good, reference=Image.new("RGB", (2, 2)))
    # Nothing of the refused inputs was kept.
    assert_same_metrics(evaluate_metric.compute(predictions=[good], references=[good], num_labels=2,
                                                ignore_index=255),
                        reference_mean_iou([good], [good], 2, 255))


def test_evaluate_module_raises_on_out_of_range_values(evaluate_metric):
    maps = [np.zeros((2, 2), dtype=np.uint8)] * 2
    with pytest.raises(ValueError, match=r"predictions\[1\] holds values outside \[0, 2\): \[5\]"):
        evaluate_metric.compute(predictions=[maps[0], np.full((2, 2), 5, np.uint8)], references=maps, num_labels=2,
                                ignore_index=255)
    with pytest.raises(ValueError, match=r"references\[0\] .*\[3\]"):
        evaluate_metric.compute(predictions=maps, references=[np.full((2, 2), 3, np.uint8), maps[1]], num_labels=2,
                                ignore_index=255)


# ---------------------------------------------------------------------------------------------------------------
# Wide integer types: uint64 maps, and values the evaluate module's int32 PNG encoding cannot hold
# ---------------------------------------------------------------------------------------------------------------


def test_uint64_predictions():
    maps = [np.array([[0, 1], [1, 0]], dtype=np.uint64)]
    assert mean_iou(maps, maps, num_labels=2, ignore_index=255)["mean_iou"] == 1.0


def test_evaluate_module_rejects_values_beyond_int32(evaluate_metric):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"predictions\[0\]"):
            evaluate_metric.compute(predictions=[np.array([[0, 2**32]])], references=[np.array([[0, 0]])],
                                    num_labels=2, ignore_index=255)


# ---------------------------------------------------------------------------------------------------------------
# Sizes: out-of-range values are refused from the maps' extremes, and tables that cannot fit are refused up front
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**27, 2**40, -(2**40)])
def test_huge_reference_values_are_refused_without_a_table_of_their_size(value):
    # A map of nothing but one huge value once built a table from 0 to it: 17 s and 4.6 GiB for 2**27, a
    # MemoryError for 2**40. The map's extremes lie outside any value that can be scored: refused at once.
    import tracemalloc

    predictions, references = [np.zeros((64, 64), np.int64)], [np.full((64, 64), value, np.int64)]
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"references\[0\] holds values outside \[0, 19\).*\[{value}\]"):
            mean_iou(predictions, references, num_labels=19, ignore_index=255)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24, f"{peak / 2**20:.0f} MiB allocated to refuse one 64x64 map"


def test_num_labels_whose_confusion_table_cannot_fit_is_refused_with_its_size():
    # 100000 classes once asked numpy for a 74.5 GiB bincount; the size is now stated before anything is allocated.
    maps = [np.zeros((2, 2), np.uint8)]
    message = r"num_labels=100000 needs .*100001x100000 int64 pixel counts, 149\.0 GiB, more than the .* GiB of memory"
    with pytest.raises(ValueError, match=message):
        mean_iou(maps, maps, num_labels=100000, ignore_index=255)
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(100000)
