import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig

from pcaa_hf import PCAAConfig


def test_defaults_are_the_papers_cityscapes_r50_model():
    config = PCAAConfig()
    assert config.model_type == "pcaa"
    assert (config.backbone_depth, config.output_stride, config.multi_grid) == (50, 8, False)
    assert config.hidden_size == 512 and config.auxiliary_hidden_size == 256
    assert [tuple(grid) for grid in config.bins] == [(4, 4)]
    assert config.cam_dropout == 0.1 and config.classifier_dropout == 0.0
    assert config.use_auxiliary_head and config.auxiliary_loss_weight == 0.4 and config.region_loss_weight == 1.0
    assert config.focal_gamma == 2.0 and config.region_label_threshold == 0.01
    assert config.loss_ignore_index == 255
    assert not config.use_ohem and config.ohem_threshold == 0.7 and config.ohem_min_kept == 100000
    assert config.num_labels == 19


def test_labels_can_be_given_as_count_or_names():
    assert PCAAConfig(num_labels=150).num_labels == 150
    config = PCAAConfig(id2label={0: "road", 1: "sky"}, label2id={"road": 0, "sky": 1})
    assert config.num_labels == 2 and config.id2label[1] == "sky"
    assert PCAAConfig(num_labels=1).num_labels == 1  # binary segmentation, as SegFormer


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"bins": ((0, 4),)}, "bins"),
        ({"bins": ((4,),)}, "bins"),
        ({"bins": ()}, "bins"),
        ({"backbone_depth": 42}, "backbone_depth"),
        ({"output_stride": 4}, "output_stride"),
        ({"hidden_size": 511}, "hidden_size"),
        ({"cam_dropout": 1.0}, "cam_dropout"),
        ({"classifier_dropout": -0.1}, "classifier_dropout"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"region_label_threshold": 1.5}, "region_label_threshold"),
        ({"ohem_threshold": 0.0}, "ohem_threshold"),
        ({"ohem_min_kept": -1}, "ohem_min_kept"),
        ({"loss_ignore_index": 3}, "loss_ignore_index"),
        ({"num_labels": 0}, "num_labels"),
        ({"num_labels": 1, "loss_ignore_index": 1}, "loss_ignore_index"),  # binary: label values 0 and 1
    ],
)
def test_invalid_values_fail_at_construction_naming_the_field(overrides, field):
    with pytest.raises((StrictDataclassClassValidationError, StrictDataclassFieldValidationError), match=field):
        PCAAConfig(**overrides)


def test_wrong_types_fail_naming_the_field():
    with pytest.raises(StrictDataclassFieldValidationError, match="backbone_depth"):
        PCAAConfig(backbone_depth="50")
    with pytest.raises(StrictDataclassFieldValidationError, match="bins"):
        PCAAConfig(bins=[[4, "4"]])


def test_round_trip_through_save_pretrained_and_auto_config(tmp_path):
    config = PCAAConfig(backbone_depth=101, multi_grid=True, bins=((2, 2), (4, 4)), num_labels=150, use_ohem=True)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is PCAAConfig
    assert reloaded.to_diff_dict() == config.to_diff_dict()
    assert [tuple(grid) for grid in reloaded.bins] == [(2, 2), (4, 4)]
