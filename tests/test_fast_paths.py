"""The fast paths: channels-last activations in the backbone for CPU inference only, the decode head and the
outputs in the standard layout; gradients still reach the input of a frozen eval-mode model; dilated stages on phase
decompositions and BatchNorm folded into the convolutions in inference, each computing what the plain layers compute;
and the model's operator count does not grow with classes, regions or pixels (no Python loops over them)."""

import copy
import weakref
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_hf.backbone_pcaa import PCAAConvNormAct, from_phases, standard_layout, to_phases

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


def test_cpu_inference_runs_the_backbone_channels_last_and_training_does_not():
    model = eval_model(torch.float32)
    layouts = []
    model.backbone.stem.register_forward_pre_hook(
        lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
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


def test_cpu_inference_runs_the_decode_head_in_the_standard_layout_with_channels_last_weights():
    model = eval_model(torch.float32).to(memory_format=torch.channels_last)
    layouts = {}

    def record_layout(name):
        def hook(module, inputs, output):
            layouts.setdefault(name, output.is_contiguous())
        return hook

    for name in ("backbone.stem.0", "decode_head.pre", "decode_head.fuse"):
        model.get_submodule(name).register_forward_hook(record_layout(name))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(pixel_values).logits
        reference = eval_model(torch.float32)(pixel_values).logits
    assert layouts == {"backbone.stem.0": False, "decode_head.pre": True, "decode_head.fuse": True}
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_hidden_states, labels", [(False, False), (False, True), (True, False)])
def test_inference_frees_the_backbone_maps_that_no_head_reads(output_hidden_states, labels):
    model = eval_model(torch.float32)
    maps, alive_in_head = [], []
    model.backbone.register_forward_hook(lambda module, inputs, outputs: maps.extend(map(weakref.ref, outputs)))
    model.decode_head.register_forward_pre_hook(
        lambda module, inputs: alive_in_head.extend(ref() is not None for ref in maps))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        outputs = model(pixel_values, labels=torch.randint(0, 5, (2, 64, 64)) if labels else None,
                        output_hidden_states=output_hidden_states)
    # The stem and stages 1-3, then stage 4 (replaced by its standard-layout copy on CPUs); the auxiliary head
    # reads stage 3.
    assert alive_in_head == [output_hidden_states] * 3 + [output_hidden_states or labels, False]
    if output_hidden_states:
        with torch.inference_mode():
            expected = model.backbone(pixel_values)
        assert len(outputs.hidden_states) == len(expected) == 5
        for state, expected_state in zip(outputs.hidden_states, expected):
            torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)
    else:
        assert outputs.hidden_states is None


class OperatorCounter(TorchDispatchMode):
    """Counts the operators run, and records the dilation of every convolution with a kernel larger than 1x1."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.dilations = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        if func is torch.ops.aten.convolution.default and args[1].shape[-1] > 1:
            self.dilations.add(tuple(args[5]))
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


class StandardLayout(torch.nn.Module):
    def forward(self, hidden_state):
        return standard_layout(hidden_state)


def test_standard_layout_exports_for_any_batch_size():
    example = torch.randn(2, 70, 8, 9).contiguous(memory_format=torch.channels_last)
    exported = torch.export.export(StandardLayout(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    hidden_state = torch.randn(3, 70, 8, 9).contiguous(memory_format=torch.channels_last)
    assert torch.equal(exported.module()(hidden_state), hidden_state)


@pytest.mark.parametrize("phases", [2, 4])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_phases_are_the_strided_slices_of_a_map_and_invert(phases, memory_format):
    hidden_state = torch.randn(2, 3, 8, 12).contiguous(memory_format=memory_format)
    phased = to_phases(hidden_state, phases)
    assert phased.shape == (phases * phases * 2, 3, 8 // phases, 12 // phases)
    assert phased.is_contiguous(memory_format=memory_format)
    for row in range(phases):
        for col in range(phases):
            for image in range(2):
                expected = hidden_state[image, :, row::phases, col::phases]
                assert torch.equal(phased[(row * phases + col) * 2 + image], expected)
    restored = from_phases(phased, phases)
    assert torch.equal(restored, hidden_state) and restored.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("overrides, expected", [
    (dict(backbone_depth=50), [1, 1, 2, 4]),
    (dict(backbone_depth=50, multi_grid=True), [1, 1, 2, 4]),  # stage 4 dilated 4, 8, 16
    (dict(backbone_depth=50, output_stride=16), [1, 1, 1, 2]),
    (dict(backbone_depth=18), [1, 1, 1, 1]),  # the second conv of a basic block is undilated
])
def test_a_stage_runs_on_phases_by_the_factor_every_dilation_of_its_convs_shares(overrides, expected):
    model = PCAAForSemanticSegmentation(small_config(**overrides))
    assert [stage.phases for stage in model.backbone.stages] == expected


@pytest.mark.parametrize("size, dilations", [
    ((64, 64), {(1, 1), (2, 2), (4, 4)}),  # 8x8 features: stage 3 on 2x2 phases, stage 4 (4, 8, 16) on 4x4
    ((48, 80), {(1, 1), (2, 2), (4, 4), (8, 8)}),  # 6x10: 2 divides both sides, 4 does not: 2x2 phases in both
    ((72, 88), {(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)}),  # 9x11: no phases, the dilated convolutions as built
])
@pytest.mark.parametrize("training", [False, True])
def test_phase_decomposition_computes_what_the_dilated_convolutions_do(size, dilations, training):
    model = randomise_weights(PCAAForSemanticSegmentation(small_config(backbone_depth=50, multi_grid=True)))
    model = model.to(torch.float64).train(training)
    dilated = copy.deepcopy(model)
    for stage in dilated.backbone.stages:
        stage.phases = 1
    pixel_values = torch.randn(2, 3, *size, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, *size))
    results = []
    for network in (model, dilated):
        torch.manual_seed(0)  # the same dropout masks
        with OperatorCounter() as counter:
            outputs = network(pixel_values, labels=labels)
            outputs.loss.backward()
        results.append((counter.dilations, outputs, dict(network.named_parameters()), dict(network.named_buffers())))
    (seen, outputs, parameters, buffers), (_, expected, dilated_parameters, dilated_buffers) = results
    assert seen == dilations
    torch.testing.assert_close(outputs.logits, expected.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs.loss, expected.loss, rtol=1e-12, atol=1e-12)
    for name, parameter in parameters.items():
        torch.testing.assert_close(parameter.grad, dilated_parameters[name].grad, rtol=1e-9, atol=1e-9)
    for name, buffer in buffers.items():  # BatchNorm statistics of the phases are those of the whole map
        torch.testing.assert_close(buffer, dilated_buffers[name], rtol=1e-12, atol=1e-12)


def test_wrapped_or_hooked_layers_run_as_modules():
    """A hook or a wrapper (LoRA, fake quantisation) on a conv is honoured: its stage runs without phases, and its
    layer without folding."""

    class Doubled(torch.nn.Conv2d):
        def forward(self, hidden_state):
            return 2 * super().forward(hidden_state)

    model = randomise_weights(PCAAForSemanticSegmentation(small_config(backbone_depth=50))).to(torch.float64).eval()
    expected = copy.deepcopy(model)
    layer = model.backbone.stages[2][1].conv2
    doubled = Doubled(256, 256, 3, padding=2, dilation=2, bias=False).to(torch.float64)
    doubled.load_state_dict(layer.conv.state_dict())
    layer.conv = doubled
    with torch.no_grad():
        expected.backbone.stages[2][1].conv2.conv.weight.mul_(2)
    calls = []
    model.backbone.stages[3][0].conv2.conv.register_forward_hook(lambda module, inputs, output: calls.append(1))
    pixel_values = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with OperatorCounter() as counter:
        logits = model(pixel_values).logits
    assert calls == [1]
    assert {(2, 2), (4, 4)} <= counter.dilations  # stages 3 and 4 kept their dilated convs
    torch.testing.assert_close(logits, expected(pixel_values).logits, rtol=1e-10, atol=1e-10)


def test_inference_folds_batch_norm_into_the_convolution_with_the_current_parameters():
    layer = randomise_weights(PCAAConvNormAct(4, 6, 3, dilation=2)).to(torch.float64)
    pixels = torch.randn(2, 4, 10, 10, dtype=torch.float64, requires_grad=True)

    def conv_then_norm():
        return layer.activation(layer.norm(layer.conv(pixels)))

    for training in (True, False):
        layer.train(training)
        with OperatorCounter() as counter:
            output = layer(pixels)
        normalised = any("batch_norm" in name for name in counter.counts)
        assert normalised == training  # in inference BatchNorm runs inside the convolution
        torch.testing.assert_close(output, conv_then_norm(), rtol=1e-12, atol=1e-12)
    # Fine-tuning with frozen statistics: the same gradients as through the convolution and BatchNorm.
    gradients = torch.autograd.grad(layer(pixels).square().sum(), [pixels, *layer.parameters()])
    expected = torch.autograd.grad(conv_then_norm().square().sum(), [pixels, *layer.parameters()])
    for gradient, reference in zip(gradients, expected):
        torch.testing.assert_close(gradient, reference, rtol=1e-12, atol=1e-12)
    # Nothing is cached: parameters and statistics changed in place count at the next call.
    with torch.no_grad():
        layer.conv.weight.mul_(-1.5)
        layer.norm.running_mean.add_(0.5)
        layer.norm.weight.mul_(2.0)
    torch.testing.assert_close(layer(pixels), conv_then_norm(), rtol=1e-12, atol=1e-12)
    # Without an affine map, BatchNorm normalises as a module of its own.
    layer.norm = torch.nn.BatchNorm2d(6, affine=False).to(torch.float64).eval()
    layer.norm.running_var.fill_(2.0)
    torch.testing.assert_close(layer(pixels), conv_then_norm(), rtol=1e-12, atol=1e-12)


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
