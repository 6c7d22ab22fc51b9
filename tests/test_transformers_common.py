"""
transformers' own shared tests run against PCAA, as an in-tree model's `tests/models/<name>/test_modeling_<name>.py`
runs them (SegFormer's and UperNet's are the pattern): the common model, config, image-processor and post-processing
tests, with the paper's backbone (ResNet-18 depth, a narrow head) and with a transformers backbone (a tiny Swin).
The mixins come from the sdist of the installed transformers (tests/transformers_test_suite.py). Tests that cannot
apply to a convolutional model without attention, embeddings or a base model are skipped with their reason below.
"""

import unittest

import pytest
import torch
from transformers import SwinConfig
from transformers.modeling_outputs import SemanticSegmenterOutput

from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation, PCAAImageProcessor
from transformers_test_suite import import_shared_tests

modeling_common = import_shared_tests("test_modeling_common")
configuration_common = import_shared_tests("test_configuration_common")
image_processing_common = import_shared_tests("test_image_processing_common")

NOT_APPLICABLE = {
    "test_inputs_embeds": "PCAA does not use inputs_embeds",
    "test_model_get_set_embeddings": "PCAA has no input or output embeddings",
    "test_attention_outputs": "PCAA's attention is not one of transformers' attention layers and returns none",
    "test_retain_grad_hidden_states_attentions": "PCAA's own attention (over region classes) is not returned",
    "test_model_base_model_prefix": "PCAA has no base model (as UperNet)",
    "test_base_model_prefix_loads_base_weights": "PCAA has no base model (as UperNet)",
}


class PCAAModelTester:
    """Small PCAA configurations and inputs for the shared tests: 32x32 images give 4x4 maps at output stride 8."""

    def __init__(self, parent, batch_size=2, image_size=32, num_channels=3, num_labels=3, backbone_config=None,
                 decode_head_type="pcaa"):
        self.parent = parent
        self.decode_head_type = decode_head_type
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.num_labels = num_labels
        self.backbone_config = backbone_config
        self.is_training = True
        # The paper's backbone at output stride 8; Swin's last stage is at 32.
        self.logits_stride = 8 if backbone_config is None else 32

    def get_config(self):
        return PCAAConfig(
            decode_head_type=self.decode_head_type,
            backbone_config=self.backbone_config,
            backbone_depth=18,
            hidden_size=16,
            auxiliary_hidden_size=8,
            num_channels=self.num_channels,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs(self):
        pixel_values = modeling_common.floats_tensor(
            [self.batch_size, self.num_channels, self.image_size, self.image_size]
        )
        labels = modeling_common.ids_tensor([self.batch_size, self.image_size, self.image_size], self.num_labels)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class PCAAModelTest(modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (PCAAForSemanticSegmentation,)
    has_attentions = False
    test_resize_embeddings = False
    test_torch_exportable = True
    decode_head_type = "pcaa"

    def setUp(self):
        self.model_tester = PCAAModelTester(self, decode_head_type=self.decode_head_type)
        self.config_tester = configuration_common.ConfigTester(
            self, config_class=PCAAConfig, has_text_modality=False, common_properties=["hidden_size", "num_channels"]
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin adds segmentation labels to transformers' own segmentation models only (by class name).
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            batch, _, height, width = inputs_dict["pixel_values"].shape
            inputs_dict["labels"] = torch.zeros(batch, height, width, dtype=torch.long)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="The paper's backbone is a ResNet of fixed widths: the smallest (ResNet-18) has 11M "
                   "parameters; the transformers-backbone variant below is under 1M")
    def test_model_is_small(self):
        pass

    def test_hidden_states_output(self):
        # A convolutional backbone's hidden states: the stem's (or embeddings') output and one map per stage.
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for output_hidden_states_in_config in (False, True):
            config.output_hidden_states = output_hidden_states_in_config
            call_inputs = inputs if output_hidden_states_in_config else {**inputs, "output_hidden_states": True}
            model = PCAAForSemanticSegmentation(config).eval()
            with torch.no_grad():
                hidden_states = model(**call_inputs).hidden_states
            self.assertEqual(len(hidden_states), 5)
            self.assertEqual(list(hidden_states[0].shape[-2:]), [self.model_tester.image_size // 4] * 2)
            for state in hidden_states:
                self.assertEqual(state.shape[0], self.model_tester.batch_size)

    def test_semantic_segmentation_outputs(self):
        config, pixel_values, labels = self.model_tester.prepare_config_and_inputs()
        model = PCAAForSemanticSegmentation(config).eval()
        with torch.no_grad():
            outputs = model(pixel_values, labels=labels)
        size = self.model_tester.image_size // self.model_tester.logits_stride
        self.assertEqual(outputs.logits.shape, (self.model_tester.batch_size, self.model_tester.num_labels, size, size))
        self.assertTrue(torch.isfinite(outputs.loss))


for _name, _reason in NOT_APPLICABLE.items():
    setattr(PCAAModelTest, _name, unittest.skip(reason=_reason)(lambda self: None))


class PCAAWithTransformersBackboneModelTest(PCAAModelTest):
    """
    The same tests with PCAA's heads on transformers' Swin (two feature maps): an attention backbone, so that
    `attn_implementation` and `dtype` reaching it are tested, and one whose layers transformers can checkpoint.
    """

    def setUp(self):
        super().setUp()
        backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                              window_size=2, out_features=["stage3", "stage4"])
        self.model_tester = PCAAModelTester(self, backbone_config=backbone)

    test_model_is_small = modeling_common.ModelTesterMixin.test_model_is_small
    # transformers' SwinBackbone keeps SwinModel's final LayerNorm, which none of its feature maps goes through.
    test_all_params_have_gradient = False

    def test_attention_outputs(self):
        # PCAA returns the backbone's attention maps (its own attention, over region classes, is not returned).
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config._attn_implementation = "eager"  # sdpa computes no attention weights to return
        model = PCAAForSemanticSegmentation(config).eval()
        self.assertEqual(model.backbone.config._attn_implementation, "eager")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
            self.assertIsNone(model(**inputs).attentions)
        self.assertEqual(len(attentions), 4)  # one layer per stage
        self.assertEqual(attentions[0].shape[0] % self.model_tester.batch_size, 0)  # (batch x windows, heads, ...)


# The shared tests with each baseline of the paper's Table 3 in the PCAA head's place, 12 s each; the two plain
# convolutional heads in the slow set.
@pytest.mark.slow
class PCAAWithFCNHeadModelTest(PCAAModelTest):
    decode_head_type = "fcn"


@pytest.mark.slow
class PCAAWithASPPHeadModelTest(PCAAModelTest):
    decode_head_type = "aspp"


class PCAAWithNonLocalHeadModelTest(PCAAModelTest):
    decode_head_type = "non_local"


class PCAAWithOCRHeadModelTest(PCAAModelTest):
    decode_head_type = "ocr"


class PCAAImageProcessingTester(image_processing_common.ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("num_labels", 3)
        # PCAA keeps each image's size by default (as mmsegmentation's test pipeline); the shared tests batch images
        # of different sizes, so they resize to one.
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("size", {"height": 18, "width": 20})
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # transformers finds an in-tree model's processors by its test folder's name; PCAA's is registered instead.
        return {"pil": PCAAImageProcessor}


class PCAAImageProcessingTest(
    image_processing_common.ImageProcessingTestMixin,
    image_processing_common.PostProcessSemanticSegmentationTestMixin,
    unittest.TestCase,
):
    image_processor_tester_class = PCAAImageProcessingTester

    @unittest.skip(reason="torchvision is not installable beside the pinned CPU torch, and pcaa_hf does not depend on "
                   "it: PCAA's processor has the PIL/NumPy backend only")
    def test_new_models_require_torchvision_backend(self):
        pass

    def test_post_process_outputs_are_class_maps(self):
        processor = PCAAImageProcessor()
        logits = torch.randn(2, 3, 4, 5)
        maps = processor.post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits),
                                                            target_sizes=[(8, 10), (4, 5)])
        self.assertEqual([tuple(m.shape) for m in maps], [(8, 10), (4, 5)])
        self.assertTrue(torch.equal(maps[1], logits[1].argmax(0)))
