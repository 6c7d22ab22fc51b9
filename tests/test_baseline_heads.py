"""
The baseline decode heads of the paper's Table 3 (`PCAAConfig.decode_head_type`): what each computes, against
definitions written here; any input size; clear configuration errors; the authors' checkpoints' key names; saving,
remote code and export. Parity with the authors' modules themselves: tests/test_parity_with_original.py.
"""

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForSemanticSegmentation, ResNetConfig

from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.cli.predict import main as predict_main
from pcaa_hf.conversion.original_checkpoints import (
    ORIGINAL_MODELS,
    CheckpointMismatchError,
    convert_original_state_dict,
    original_config,
)
from pcaa_hf.model.configuration_pcaa import DECODE_HEAD_TYPES
from pcaa_hf.model.decode_heads_pcaa import PCAANonLocalBlock, PCAAObjectContextBlock
from pcaa_hf.publishing.exporting import export_to_folder, load_exported
from pcaa_testing import randomise_weights, run_without_the_package, small_config

BASELINES = [head for head in DECODE_HEAD_TYPES if head != "pcaa"]
AUTO = torch.export.Dim.AUTO
# Every non-backbone key of the authors' Seg_Model of each --model (ResNet-50, 19 classes), with and without
# --dropout and --aux-loss, as their code at lsa1997/PCAA f281b07 names them (tests/test_parity_with_original.py
# checks this record against a checkout).
AUTHORS_HEAD_KEYS = Path(__file__).parent / "fixtures" / "authors_head_keys.json"


def small_model(head, **overrides):
    return randomise_weights(PCAAForSemanticSegmentation(small_config(decode_head_type=head, **overrides)))


@pytest.mark.parametrize("head", DECODE_HEAD_TYPES)
@pytest.mark.parametrize("size", [(64, 64), (67, 45), (9, 15), (1, 1)])
def test_every_head_takes_any_size_in_eval_and_training(head, size):
    model = small_model(head).eval()
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        output = model(pixel_values)
    feature_size = tuple(math.ceil(side / 8) for side in size)
    assert output.logits.shape == (2, 5, *feature_size) and torch.isfinite(output.logits).all()
    assert (output.region_class_scores is None) == (head != "pcaa")
    # OCR's object regions are the auxiliary head's scores: computed in eval mode too.
    assert (output.auxiliary_logits is not None) == (head == "ocr")
    if min(size) >= 9:
        model.train()
        labels = torch.randint(0, 5, (2, *size))
        output = model(pixel_values, labels=labels)
        output.loss.backward()
        for name, parameter in model.named_parameters():
            if name.startswith("decode_head."):
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("head", BASELINES)
def test_baseline_loss_is_the_authors_dsn_loss(head):
    """Cross-entropy + 0.4 x auxiliary cross-entropy, both on logits upsampled to the labels; no region term."""
    model = small_model(head).eval()
    pixel_values, labels = torch.randn(2, 3, 48, 40), torch.randint(0, 5, (2, 48, 40))
    labels[:, :5] = 255
    output = model(pixel_values, labels=labels)

    def cross_entropy(logits):
        upsampled = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
        return F.cross_entropy(upsampled, labels, ignore_index=255)

    assert output.region_loss is None
    torch.testing.assert_close(output.segmentation_loss, cross_entropy(output.logits))
    torch.testing.assert_close(output.auxiliary_loss, cross_entropy(output.auxiliary_logits))
    torch.testing.assert_close(output.loss, output.segmentation_loss + 0.4 * output.auxiliary_loss)
    without = small_model(head, use_auxiliary_head=False) if head != "ocr" else None
    if without is not None:
        output = without.eval()(pixel_values, labels=labels)
        assert output.auxiliary_loss is None and torch.equal(output.loss, output.segmentation_loss)


@torch.no_grad()
def test_non_local_block_is_the_embedded_gaussian_of_its_definition():
    block = PCAANonLocalBlock(16).double().eval()
    randomise_weights(block)
    features = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    query, key, value = (layer(features).flatten(2) for layer in (block.query, block.key, block.value))
    similarity = torch.einsum("bci,bcj->bij", query, key) / math.sqrt(8)
    attended = torch.einsum("bij,bcj->bci", similarity.softmax(dim=2), value).view(2, 8, 5, 7)
    torch.testing.assert_close(block(features), features + block.output_projection(attended))


@torch.no_grad()
def test_non_local_attention_runs_on_the_fused_kernel_that_holds_no_positions_map():
    """torch's flash attention kernel on the CPU, asked for alone, accepts the block's inputs (contiguous)."""
    block = PCAANonLocalBlock(16).eval()
    features = torch.randn(1, 16, 24, 40)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        fused = block(features)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch.testing.assert_close(fused, block(features))


@pytest.mark.parametrize("head", BASELINES)
def test_every_baseline_trains_on_a_transformers_backbone(head):
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            out_features=["stage3", "stage4"])
    model = small_model(head, backbone_config=backbone, hidden_size=16, auxiliary_hidden_size=8).train()
    output = model(torch.randn(2, 3, 64, 96), labels=torch.randint(0, 5, (2, 64, 96)))
    assert output.logits.shape == (2, 5, 2, 3)
    output.loss.backward()
    assert model.decode_head.classifier.weight.grad.abs().sum() > 0


def test_ocr_on_a_transformers_backbone_whose_last_two_stages_differ_in_resolution():
    """ResNet's stages 3 and 4 at strides 16 and 32: the auxiliary scores are resized to the last map's size."""
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            out_features=["stage3", "stage4"])
    model = small_model("ocr", backbone_config=backbone, hidden_size=16, auxiliary_hidden_size=8).train()
    pixel_values, labels = torch.randn(2, 3, 96, 130), torch.randint(0, 5, (2, 96, 130))
    output = model(pixel_values, labels=labels)
    assert output.logits.shape == (2, 5, 3, 5) and output.auxiliary_logits.shape == (2, 5, 6, 9)
    output.loss.backward()
    assert model.decode_head.object_context.pixel_query[0].conv.weight.grad.abs().sum() > 0
    model.eval()
    program = torch.export.export(model, (pixel_values,), dynamic_shapes=({0: AUTO, 2: AUTO, 3: AUTO},))
    for size in ((64, 64), (100, 70)):
        check = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(check)[0], model(check).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_object_context_block_attends_over_object_regions_as_ocr_defines():
    block = PCAAObjectContextBlock(16).double().eval()
    randomise_weights(block)
    features, objects = torch.randn(2, 16, 5, 7, dtype=torch.float64), torch.randn(2, 16, 3, 1, dtype=torch.float64)
    query = block.pixel_query(features).flatten(2)  # (B, 8, 35)
    key, value = block.object_key(objects).flatten(2), block.object_value(objects).flatten(2)  # (B, 8, 3)
    similarity = (torch.einsum("bci,bck->bik", query, key) * 8 ** -0.5).softmax(dim=2)
    context = torch.einsum("bik,bck->bci", similarity, value).view(2, 8, 5, 7)
    torch.testing.assert_close(block(features, objects), block.output_projection(context))


@torch.no_grad()
def test_ocr_object_regions_are_the_auxiliary_scores_softmax_over_positions():
    model = small_model("ocr").eval()
    pixel_values = torch.randn(1, 3, 40, 56)
    output = model(pixel_values)
    head = model.decode_head
    features = head.pre(model.backbone(pixel_values)[-1])
    regions = output.auxiliary_logits.flatten(2).softmax(dim=2)  # (1, K, h*w)
    objects = torch.einsum("bki,bci->bck", regions, features.flatten(2)).unsqueeze(3)
    expected = head.classifier(head.fuse(torch.cat([head.object_context(features, objects), features], dim=1)))
    torch.testing.assert_close(output.logits, expected)


@torch.no_grad()
def test_aspp_concatenates_image_pooling_upsampled_and_one_branch_per_rate():
    model = small_model("aspp", aspp_dilations=[2, 3]).eval()
    features = torch.randn(1, 512, 6, 9)
    head = model.decode_head
    pooled = head.image_pool(F.adaptive_avg_pool2d(features, 1))
    branches = [F.interpolate(pooled, size=(6, 9), mode="bilinear", align_corners=False)]
    branches += [branch(features) for branch in head.branches]
    assert len(head.branches) == 3  # 1x1 and one per rate
    expected = head.classifier(head.bottleneck(torch.cat(branches, dim=1)))
    torch.testing.assert_close(head(features)[0], expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(decode_head_type="psp"), "`decode_head_type` must be one of"),
    (dict(decode_head_type="ocr", use_auxiliary_head=False), "`use_auxiliary_head` must be True"),
    (dict(decode_head_type="ocr", num_labels=1), "`decode_head_type='ocr'` needs at least 2 labels"),
    (dict(decode_head_type="aspp", aspp_dilations=[]), "`aspp_dilations` must be positive integers"),
    (dict(decode_head_type="aspp", aspp_dilations=[6, 0]), "`aspp_dilations` must be positive integers"),
    (dict(decode_head_type="non_local", hidden_size=63), "`hidden_size` must be a positive even number"),
])
def test_bad_configurations_fail_at_construction_naming_the_field(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        PCAAConfig(**overrides)


def test_aspp_refuses_training_on_one_image_clearly():
    model = small_model("aspp").train()
    with pytest.raises(ValueError, match="at least 2 images per process"):
        model(torch.randn(1, 3, 64, 64), labels=torch.zeros(1, 64, 64, dtype=torch.long))


def test_binary_segmentation_with_every_baseline_but_ocr():
    for head in ("fcn", "aspp", "non_local"):
        model = small_model(head, num_labels=1).train()
        output = model(torch.randn(2, 3, 32, 32), labels=torch.randint(0, 2, (2, 32, 32)))
        assert output.logits.shape == (2, 1, 4, 4) and torch.isfinite(output.loss)


def authors_checkpoint(label):
    """Tensors named and shaped as the authors' Seg_Model of `label` ("<model> dropout=<bool> aux=<bool>")."""
    shapes = json.loads(AUTHORS_HEAD_KEYS.read_text())[label]
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


class HeadOnly:
    """The decode and auxiliary heads of the configuration `config` of ours, as the converter checks against them."""

    def __init__(self, config):
        with torch.device("meta"):
            model = PCAAForSemanticSegmentation(config)
        self.head = {key: value for key, value in model.state_dict().items() if not key.startswith("backbone.")}

    def state_dict(self):
        return self.head


@pytest.mark.parametrize("model_name", list(ORIGINAL_MODELS))
@pytest.mark.parametrize("dropout, auxiliary", [(False, True), (True, False)])
def test_every_authors_key_finds_its_place_and_shape(model_name, dropout, auxiliary):
    """Their head's keys (ResNet-50 shapes, recorded from their code) convert to ours one to one, values unchanged."""
    checkpoint = authors_checkpoint(f"{model_name} dropout={dropout} aux={auxiliary}")
    auxiliary = auxiliary or model_name == "ocrnet"  # their ocrnet always builds its auxiliary head
    config = original_config("resnet50", 19, [(4, 4)], False, dropout, auxiliary, None, model_name)
    assert config.decode_head_type == ORIGINAL_MODELS[model_name]
    ours = HeadOnly(config)
    converted = convert_original_state_dict(checkpoint, ours, dropout, model_name)
    assert set(converted) == set(ours.state_dict())
    assert sorted(map(id, converted.values())) == sorted(map(id, checkpoint.values()))


def test_a_checkpoint_of_another_model_or_dropout_setting_is_named_in_the_error():
    nlnet = HeadOnly(original_config("resnet50", 19, [(4, 4)], False, False, True, None, "nlnet"))
    with pytest.raises(CheckpointMismatchError, match="it holds an authors' ocrnet model: pass --model ocrnet"):
        convert_original_state_dict(authors_checkpoint("ocrnet dropout=False aux=True"), nlnet, False, "nlnet")
    deeplabv3 = HeadOnly(original_config("resnet50", 19, [(4, 4)], False, False, True, None, "deeplabv3"))
    with pytest.raises(CheckpointMismatchError, match="it was trained with --dropout"):
        convert_original_state_dict(authors_checkpoint("deeplabv3 dropout=True aux=True"), deeplabv3, False,
                                    "deeplabv3")


@pytest.mark.parametrize("head", BASELINES)
def test_saved_baseline_reloads_with_auto_classes_and_the_same_outputs(head, tmp_path):
    model = small_model(head).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.decode_head_type == head
    pixel_values = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


def test_a_baseline_folder_runs_with_remote_code_without_the_package(tmp_path):
    """OCR, the head with the most parts (auxiliary logits in eval mode), through transformers and its pipeline."""
    model = small_model("ocr", id2label={i: f"class {i}" for i in range(5)},
                        label2id={f"class {i}": i for i in range(5)}).eval()
    folder = tmp_path / "ocr"
    model.save_pretrained(folder)
    PCAAImageProcessor().save_pretrained(folder)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 83, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    report = run_without_the_package(folder, tmp_path / "image.png", tmp_path)
    assert report["blocked"] and report["model_module"].startswith("transformers_modules.")
    with torch.no_grad():
        logits = model(**PCAAImageProcessor()(image, return_tensors="pt")).logits
    assert torch.equal(torch.tensor(report["logits"]), logits.flatten())
    assert report["masks"] and report["not_supported"] == []


@pytest.fixture(scope="module")
def ocr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ocr") / "model"
    small_model("ocr", hidden_size=16, auxiliary_hidden_size=8).eval().save_pretrained(folder)
    PCAAImageProcessor().save_pretrained(folder)
    return folder


def test_the_export_command_exports_and_checks_a_baseline(ocr_folder, tmp_path):
    report = export_to_folder(ocr_folder, tmp_path / "export", "dynamo", example_size=(48, 64))
    assert all(check.max_abs_difference <= 1e-4 and check.argmax_agreement == 1.0 for check in report.checks)
    exported = load_exported(tmp_path / "export", trust_remote_code=True)
    assert exported(pixel_values=torch.randn(1, 3, 40, 56)).logits.shape == (1, 5, 5, 7)


def test_predict_refuses_cams_for_a_baseline_by_name(ocr_folder, tmp_path, capsys):
    PIL.Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    returncode = predict_main([str(ocr_folder), str(tmp_path / "image.png"), "--output_dir", str(tmp_path / "out"),
                               "--cams"])
    error = capsys.readouterr().err
    assert returncode != 0 and "--cams: class activations are what PCAA modules attend to" in error
    assert "'ocr' head" in error
