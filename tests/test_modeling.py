import math

import pytest
import torch
import torch.nn.functional as F

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.inference.segmentation_inference import SegmentationInference
from pcaa_hf.model.backbone_pcaa import PCAABasicBlock, PCAABottleneck
from pcaa_hf.model.configuration_pcaa import PCAAConfig
from pcaa_hf.model.modeling_pcaa import PCAAModule
from pcaa_testing import randomise_weights, small_config


def feature_size(length, output_stride):
    """The backbone's output size: each stride-2 step rounds up."""
    for _ in range(int(math.log2(output_stride))):
        length = -(-length // 2)
    return length


@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, (64, 64)),
        ({}, (65, 97)),  # odd sizes, feature 9x13: not divisible by the 4x4 bins
        ({"bins": ((2, 2), (4, 4))}, (64, 96)),
        ({"bins": ((3, 5),), "output_stride": 16}, (80, 112)),
        ({"backbone_depth": 34, "multi_grid": True}, (72, 40)),
        ({"use_auxiliary_head": False, "classifier_dropout": 0.1}, (48, 48)),
        ({}, (8, 8)),  # a 1x1 feature map: most regions are empty
        ({}, (1, 1)),
    ],
)
def test_output_shapes_for_configs_and_odd_sizes(overrides, size):
    config = small_config(**overrides)
    model = PCAAForSemanticSegmentation(config).train()
    pixel_values = torch.randn(2, 3, *size)
    labels = torch.randint(0, config.num_labels, (2, *size))
    labels[:, : size[0] // 4] = 255
    outputs = model(pixel_values, labels=labels, output_hidden_states=True)

    height, width = (feature_size(s, config.output_stride) for s in size)
    assert outputs.logits.shape == (2, config.num_labels, height, width)
    assert len(outputs.region_class_scores) == len(config.bins)
    for scores, grid in zip(outputs.region_class_scores, config.bins):
        assert scores.shape == (2, config.num_labels, *grid)
    if config.use_auxiliary_head:
        assert outputs.auxiliary_logits.shape == (2, config.num_labels, height, width)
        assert torch.isfinite(outputs.auxiliary_loss)
    else:
        assert outputs.auxiliary_logits is None and outputs.auxiliary_loss is None
    assert len(outputs.hidden_states) == 5
    assert outputs.hidden_states[-1].shape[-2:] == (height, width)
    for term in (outputs.loss, outputs.segmentation_loss, outputs.region_loss):
        assert term.ndim == 0 and torch.isfinite(term)
    assert torch.isfinite(outputs.logits).all()
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_paper_resnet50_structure():
    model = PCAAForSemanticSegmentation(PCAAConfig())
    assert [len(stage) for stage in model.backbone.stages] == [3, 4, 6, 3]
    assert all(isinstance(block, PCAABottleneck) for stage in model.backbone.stages for block in stage)
    assert model.backbone.channels == [64, 256, 512, 1024, 2048]
    dilations = [block.conv2.conv.dilation[0] for block in model.backbone.stages[3]]
    assert dilations == [4, 4, 4]
    assert [block.conv2.conv.dilation[0] for block in model.backbone.stages[2]] == [2] * 6
    assert model.decode_head.pre.conv.in_channels == 2048 and model.decode_head.fuse.conv.in_channels == 2560
    assert model.auxiliary_head.conv.conv.in_channels == 1024
    assert sum(p.numel() for p in model.parameters()) > 40e6


def test_multi_grid_and_output_stride_16_dilations():
    model = PCAAForSemanticSegmentation(PCAAConfig(backbone_depth=101, multi_grid=True))
    assert [len(stage) for stage in model.backbone.stages] == [3, 4, 23, 3]
    assert [block.conv2.conv.dilation[0] for block in model.backbone.stages[3]] == [4, 8, 16]
    assert [block.conv2.conv.padding[0] for block in model.backbone.stages[3]] == [4, 8, 16]
    model16 = PCAAForSemanticSegmentation(small_config(output_stride=16, multi_grid=True))
    assert isinstance(model16.backbone.stages[3][0], PCAABasicBlock)
    assert [block.conv1.conv.dilation[0] for block in model16.backbone.stages[3]] == [2, 4]
    assert model16.backbone.stages[2][0].conv1.conv.stride == (2, 2)


def reference_pcaa_module(module, features):
    """PCAA module written from the spec with explicit loops over images and regions (eval mode)."""
    cam = module.cam_classifier(features)
    batch, channels, height, width = features.shape
    num_labels = cam.shape[1]
    rows, cols = module.grid
    scores = torch.sigmoid(F.adaptive_avg_pool2d(cam, module.grid))
    row_bounds = [(i * height // rows, (i + 1) * height // rows) for i in range(rows)]
    col_bounds = [(j * width // cols, (j + 1) * width // cols) for j in range(cols)]
    regions = [(i, j, r, c) for i, r in enumerate(row_bounds) for j, c in enumerate(col_bounds)]

    local = torch.zeros(batch, len(regions), num_labels, channels)
    for b in range(batch):
        for n, (i, j, (r0, r1), (c0, c1)) in enumerate(regions):
            pixels = features[b, :, r0:r1, c0:c1].reshape(channels, -1).T
            if pixels.shape[0] == 0:
                continue
            confidence = cam[b, :, r0:r1, c0:c1].reshape(num_labels, -1).T.softmax(dim=0)
            local[b, n] = confidence.T @ pixels * scores[b, :, i, j, None]
    node_weight = module.region_graph.node_conv.weight[:, :, 0, 0]
    graph = torch.einsum("nm,bmkc->bnkc", node_weight, local) + local
    graph = graph.relu() @ module.region_graph.channel_linear.weight.T
    fuse_weight = module.global_fuse.weight[0, :, 0, 0]
    global_centres = (torch.einsum("n,bnkc->bkc", fuse_weight, graph) + module.global_fuse.bias).relu()

    attended = torch.zeros(batch, channels // 2, height, width)
    for b in range(batch):
        value = module.value(global_centres[b])
        for n, (_, _, (r0, r1), (c0, c1)) in enumerate(regions):
            pixels = features[b, :, r0:r1, c0:c1].reshape(channels, -1).T
            if pixels.shape[0] == 0:
                continue
            attention = (module.query(pixels) @ module.key(graph[b, n]).T).softmax(dim=-1)
            attended[b, :, r0:r1, c0:c1] = (attention @ value).T.reshape(-1, r1 - r0, c1 - c0)
    return features + module.output_projection(attended), scores


@pytest.mark.parametrize(
    "grid, size", [((4, 4), (8, 12)), ((4, 4), (9, 7)), ((2, 3), (5, 11)), ((4, 4), (3, 2)), ((1, 1), (6, 5))]
)
@torch.no_grad()
def test_pcaa_module_matches_a_per_region_reference(grid, size):
    config = small_config(bins=(grid,))
    module = randomise_weights(PCAAModule(config, grid), seed=1).eval()
    features = torch.randn(2, config.hidden_size, *size)
    output, scores = module(features)
    expected_output, expected_scores = reference_pcaa_module(module, features)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output, expected_output, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_non_divisible_input_covers_the_whole_image():
    model = randomise_weights(PCAAForSemanticSegmentation(small_config())).eval()
    pixel_values = torch.randn(1, 3, 520 // 4, 520 // 4)  # feature 17x17, like the paper's 520x520 failure case
    logits = model(pixel_values).logits
    assert logits.shape[-2:] == (17, 17)
    # Every output position depends on its own input: perturbing a corner changes the logits there.
    changed = pixel_values.clone()
    changed[..., -8:, -8:] += 5.0
    assert not torch.allclose(model(changed).logits[..., -1, -1], logits[..., -1, -1])


def test_region_indices_cached_during_inference_still_serve_training():
    model = PCAAForSemanticSegmentation(small_config()).eval()
    pixel_values = torch.randn(2, 3, 75, 91)  # feature 10x12: uneven for the 4x4 grid
    labels = torch.randint(0, 5, (2, 75, 91))
    with torch.inference_mode():
        model(pixel_values, labels=labels)
    model.train()(pixel_values, labels=labels).loss.backward()


def test_auxiliary_logits_only_when_training_or_given_labels():
    model = PCAAForSemanticSegmentation(small_config()).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(pixel_values).auxiliary_logits is None
        labels = torch.zeros(1, 64, 64, dtype=torch.long)
        assert model(pixel_values, labels=labels).auxiliary_logits is not None
    assert model.train()(pixel_values).auxiliary_logits is not None


@torch.no_grad()
def test_tuple_output_matches_dict_output():
    model = randomise_weights(PCAAForSemanticSegmentation(small_config())).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    labels = torch.randint(0, 5, (1, 64, 64))
    as_dict = model(pixel_values, labels=labels)
    as_tuple = model(pixel_values, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], as_dict.loss)
    assert torch.equal(as_tuple[1], as_dict.logits)
    assert len(as_tuple) == len(as_dict.to_tuple())


def test_labels_at_another_resolution_and_int32():
    model = PCAAForSemanticSegmentation(small_config()).eval()
    labels = torch.randint(0, 5, (1, 32, 48), dtype=torch.int32)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 96), labels=labels)
    assert torch.isfinite(outputs.loss)


@pytest.mark.parametrize(
    "pixel_shape, label_shape, label_value, message",
    [
        ((1, 1, 64, 64), None, None, "pixel_values"),
        ((1, 3, 64), None, None, "pixel_values"),
        ((0, 3, 64, 64), None, None, "empty batch"),
        ((1, 3, 0, 64), None, None, "empty image size 0x64"),
        ((1, 3, 64, 64), (1, 0, 64), 0, "non-empty size"),
        ((2, 3, 64, 64), (1, 64, 64), 0, "labels"),
        ((1, 3, 64, 64), (1, 64, 64), 7, r"outside \[0, 5\).*\[7\]"),
        ((1, 3, 64, 64), (1, 64, 64), -1, r"\[-1\]"),
    ],
)
def test_bad_inputs_get_clear_errors(pixel_shape, label_shape, label_value, message):
    model = PCAAForSemanticSegmentation(small_config()).eval()
    labels = None if label_shape is None else torch.full(label_shape, label_value)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(pixel_shape), labels=labels)


def test_training_on_a_single_one_by_one_feature_map_is_refused_clearly():
    model = PCAAForSemanticSegmentation(small_config()).train()
    with pytest.raises(ValueError, match="one 8x8 image gives a 1x1 feature map"):
        model(torch.randn(1, 3, 8, 8))
    assert model(torch.randn(2, 3, 8, 8)).logits.shape[-2:] == (1, 1)


def test_float_labels_are_refused():
    model = PCAAForSemanticSegmentation(small_config()).eval()
    with pytest.raises(ValueError, match="integer class ids"):
        model(torch.randn(1, 3, 64, 64), labels=torch.zeros(1, 64, 64))


def test_init_is_kaiming_for_convs_and_small_normal_for_classifiers():
    torch.manual_seed(0)
    model = PCAAForSemanticSegmentation(PCAAConfig(backbone_depth=18, num_labels=19))
    conv = model.backbone.stages[3][0].conv1.conv.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    classifier = model.decode_head.classifier
    assert classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.all(classifier.bias == 0)
    module = model.decode_head.pcaa_modules[0]
    assert module.cam_classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    bound = 1 / math.sqrt(module.query.in_features)
    assert module.query.weight.abs().max().item() <= bound and module.query.weight.std().item() > bound / 3
    assert module.region_graph.node_conv.weight.abs().max().item() <= 1 / math.sqrt(16)
    norm = model.backbone.stem[0].norm
    assert torch.all(norm.weight == 1) and torch.all(norm.running_var == 1)


@torch.no_grad()
def test_fixed_seed_regression_pin():
    """Logits of a fixed small model on a fixed input: catches any unintended change of the computation."""
    model = randomise_weights(PCAAForSemanticSegmentation(small_config(bins=((2, 2), (4, 4)))), seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, 64, 80, generator=generator)
    labels = torch.randint(0, 5, (1, 64, 80), generator=generator)
    outputs = model(pixel_values, labels=labels)
    observed = [outputs.logits.abs().mean().item(), outputs.logits[0, :, 3, 4].tolist(),
                outputs.region_class_scores[1][0, :, 1, 2].tolist(), outputs.loss.item()]
    # Recorded with torch 2.13.0 (CPU); independent of the init code (weights come from `randomise_weights`).
    expected = [
        0.17128311097621918,
        [-0.17183981835842133, 0.04794570058584213, -0.1770736575126648, 0.25797247886657715, 0.2035961002111435],
        [0.5024627447128296, 0.5535780191421509, 0.42480722069740295, 0.62760990858078, 0.6076859831809998],
        2.4299182891845703,
    ]
    assert observed[0] == pytest.approx(expected[0], rel=1e-4)
    assert observed[1] == pytest.approx(expected[1], rel=1e-4, abs=1e-5)
    assert observed[2] == pytest.approx(expected[2], rel=1e-4, abs=1e-6)
    assert observed[3] == pytest.approx(expected[3], rel=1e-4)


def test_one_label_trains_binary_segmentation_and_predicts_where_the_logit_is_positive():
    model = PCAAForSemanticSegmentation(small_config(num_labels=1)).train()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 2, (2, 64, 64))
    outputs = model(pixel_values, labels=labels)
    # One logit; the class activation and region scores keep both labels, so the attention over classes works.
    assert outputs.logits.shape == (2, 1, 8, 8) and outputs.region_class_scores[0].shape == (2, 2, 4, 4)
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    module = model.decode_head.pcaa_modules[0]
    assert module.query.weight.grad.abs().sum() > 0 and module.key.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"outside \[0, 2\).*\[2\]"):
        model(pixel_values, labels=torch.full((2, 64, 64), 2))

    model.eval()
    with torch.no_grad():
        logits = model(pixel_values).logits
    class_maps = PCAAImageProcessor().post_process_semantic_segmentation(model(pixel_values), target_sizes=[(8, 8)] * 2)
    assert torch.equal(torch.stack(class_maps), (logits[:, 0] > 0).long())
    with torch.no_grad():
        predicted = SegmentationInference().predict(model, pixel_values, output_size=(8, 8))
    assert torch.equal(predicted, (logits[:, 0] > 0).long())
