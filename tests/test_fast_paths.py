"""The CPU inference fast path behind its one predicate and switch: channels-last activations in the backbone for CPU
inference only, the decode head and every output in the standard layout, the same results as the plain forward, off
under the switch and when traced; gradients still reach the input of a frozen eval-mode model; and the model's
operator count does not grow with classes, regions or pixels (no Python loops over them)."""

import weakref
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcaa_hf import PCAAForSemanticSegmentation, cpu_fast_paths, set_cpu_fast_paths
from pcaa_hf.model.backbone_pcaa import standard_layout, uses_cpu_fast_paths
from pcaa_testing import randomise_weights, small_config


def eval_model(dtype=torch.float64, seed=0, **overrides):
    return randomise_weights(PCAAForSemanticSegmentation(small_config(**overrides)), seed).to(dtype).eval()


def stem_layouts(model):
    """A list that records, at every forward, whether the backbone's stem received a channels-last input."""
    layouts = []
    model.backbone.stem.register_forward_pre_hook(
        lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    return layouts


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


def test_cpu_inference_runs_the_backbone_channels_last_and_training_does_not():
    model = eval_model(torch.float32)
    layouts = stem_layouts(model)
    head_inputs_contiguous = []
    model.decode_head.register_forward_pre_hook(
        lambda module, inputs: head_inputs_contiguous.append(inputs[0].is_contiguous()))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = model(pixel_values, labels=torch.randint(0, 5, (2, 64, 64)))
        reference = model.decode_head(model.backbone(pixel_values)[-1])[0]  # the standard layout throughout
    assert layouts == [True, False]
    assert head_inputs_contiguous == [True, True]  # the decode head runs in the standard layout either way
    torch.testing.assert_close(outputs.logits, reference, rtol=1e-5, atol=1e-5)
    # Whatever the layout inside, callers get standard tensors.
    assert outputs.logits.is_contiguous() and outputs.auxiliary_logits.is_contiguous()
    assert all(scores.is_contiguous() for scores in outputs.region_class_scores)
    model.train()
    model(pixel_values)
    assert layouts == [True, False, False]


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).logits


def test_the_switch_and_tracing_turn_the_fast_path_off_with_the_same_results():
    model = eval_model(torch.float32)
    layouts = stem_layouts(model)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(pixel_values, output_hidden_states=True)
        with cpu_fast_paths(False):
            assert not uses_cpu_fast_paths(model, pixel_values)
            plain = model(pixel_values, output_hidden_states=True)
        assert uses_cpu_fast_paths(model, pixel_values)  # the previous setting is back
        set_cpu_fast_paths(False)
        try:
            model(pixel_values)
        finally:
            set_cpu_fast_paths(True)
        torch.export.export(LogitsOnly(model), (pixel_values,))
    assert layouts == [True, False, False, False]
    torch.testing.assert_close(fast.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for state, plain_state in zip(fast.hidden_states, plain.hidden_states, strict=True):
        assert state.is_contiguous()  # standard tensors whatever the path
        torch.testing.assert_close(state, plain_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("output_hidden_states, labels", [(False, False), (False, True), (True, False)])
def test_inference_frees_the_backbone_maps_that_no_head_reads(output_hidden_states, labels, fast_path):
    model = eval_model(torch.float32)
    maps, alive_in_head = [], []
    model.backbone.register_forward_hook(lambda module, inputs, outputs: maps.extend(map(weakref.ref, outputs)))
    model.decode_head.register_forward_pre_hook(
        lambda module, inputs: alive_in_head.extend(ref() is not None for ref in maps))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), cpu_fast_paths(fast_path):
        outputs = model(pixel_values, labels=torch.randint(0, 5, (2, 64, 64)) if labels else None,
                        output_hidden_states=output_hidden_states)
    if fast_path:  # every map a head or the caller reads is replaced by its standard-layout copy
        assert alive_in_head == [False] * 5
    else:  # the stem and stages 1-3, then stage 4; the auxiliary head reads stage 3
        assert alive_in_head == [output_hidden_states] * 3 + [output_hidden_states or labels, True]
    if output_hidden_states:
        with torch.inference_mode():
            expected = model.backbone(pixel_values)
        assert len(outputs.hidden_states) == len(expected) == 5
        for state, expected_state in zip(outputs.hidden_states, expected):
            torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)
    else:
        assert outputs.hidden_states is None


class OperatorCounter(TorchDispatchMode):
    """Counts the operators run."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 70, 8, 9), (1, 3, 1, 1), (3, 1, 5, 4)])
def test_standard_layout_copies_any_layout_into_a_contiguous_map(shape, memory_format):
    hidden_state = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    hidden_state.requires_grad_(True)
    standard = standard_layout(hidden_state)
    assert standard.is_contiguous() and torch.equal(standard, hidden_state)
    (standard * torch.arange(standard.numel(), dtype=torch.float64).view(shape)).sum().backward()
    assert torch.equal(hidden_state.grad, torch.arange(standard.numel(), dtype=torch.float64).view(shape))
    reversed_axes = torch.randn(shape[::-1]).permute(3, 2, 1, 0)  # neither layout
    assert torch.equal(standard_layout(reversed_axes), reversed_axes) and standard_layout(reversed_axes).is_contiguous()


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
