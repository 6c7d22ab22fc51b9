"""The fast paths: channels-last activations for CPU inference only, standard tensors out; gradients still reach
the input of a frozen eval-mode model; and the model's operator count does not grow with classes, regions or pixels
(no Python loops over them)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcaa_hf import PCAAForSemanticSegmentation

from pcaa_testing import randomise_weights, small_config


def eval_model(dtype=torch.float64, seed=0, **overrides):
    return randomise_weights(PCAAForSemanticSegmentation(small_config(**overrides)), seed).to(dtype).eval()


def test_input_gradients_through_a_frozen_model_after_inference():
    """Saliency maps and adversarial inputs: gradients reach the input of a frozen model in eval mode."""
    model = eval_model().requires_grad_(False)
    pixel_values = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        expected = model(pixel_values).logits.clone()
    pixel_values.requires_grad_(True)
    logits = model(pixel_values).logits
    logits.sum().backward()
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-12, atol=1e-12)
    assert pixel_values.grad.abs().sum() > 0


def test_cpu_inference_runs_channels_last_and_training_does_not():
    model = eval_model(torch.float32)
    layouts = []
    model.backbone.stem.register_forward_pre_hook(
        lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(pixel_values, labels=torch.randint(0, 5, (2, 64, 64)))
        reference = model.decode_head(model.backbone(pixel_values)[-1])[0]  # the standard layout throughout
    assert layouts == [True, False]
    torch.testing.assert_close(outputs.logits, reference, rtol=1e-5, atol=1e-5)
    # Whatever the layout inside, callers get standard tensors.
    assert outputs.logits.is_contiguous() and outputs.auxiliary_logits.is_contiguous()
    assert all(scores.is_contiguous() for scores in outputs.region_class_scores)
    model.train()
    model(pixel_values)
    assert layouts == [True, False, False]


class OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def operator_counts(num_labels, bins, size, training):
    model = PCAAForSemanticSegmentation(small_config(num_labels=num_labels, bins=bins))
    model.train(training)
    pixel_values = torch.randn(2, 3, *size)
    labels = torch.randint(0, num_labels, (2, *size))

    def run():
        if training:
            model(pixel_values, labels=labels).loss.backward()
        else:
            with torch.no_grad():
                model(pixel_values)

    run()  # builds the per-size region indices (cached), so that every count sees the same state
    with OperatorCounter() as counter:
        run()
    return counter.counts


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("small, large", [
    ((5, ((2, 2),), (64, 64)), (40, ((8, 8),), (192, 128))),  # regions divide the feature map
    ((5, ((4, 4),), (72, 72)), (23, ((3, 5),), (200, 136))),  # they do not (uneven regions)
])
def test_operator_count_does_not_grow_with_classes_regions_or_pixels(small, large, training):
    """The model's hot path has no Python loop over pixels, regions or classes: the same operators run, as often."""
    assert operator_counts(*small, training) == operator_counts(*large, training)
