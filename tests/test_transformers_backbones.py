"""PCAA on transformers backbones (`PCAAConfig(backbone_config=...)`): training, saving, remote code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import ConvNextConfig, ResNetConfig, SwinConfig

from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation
from pcaa_testing import small_config

BACKBONES = {
    "convnext": lambda: ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                       out_features=["stage3", "stage4"]),
    "swin": lambda: SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64, window_size=2,
                               out_features=["stage3", "stage4"]),
    "resnet": lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                   out_features=["stage2", "stage3", "stage4"]),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_a_few_training_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = PCAAForSemanticSegmentation(small_config(backbone_config=BACKBONES[name]()))
    # The heads sit on the last two feature maps, whatever their widths.
    channels = model.backbone.channels
    assert model.decode_head.pre.conv.in_channels == channels[-1]
    assert model.auxiliary_head.conv.conv.in_channels == channels[-2]
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        outputs = model(pixel_values, labels=labels)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(outputs.loss.item())
    assert losses[-1] < losses[0] * 0.98, losses
    assert outputs.logits.shape == (2, 5, 2, 2)  # stride 32: ConvNeXt's and ResNet's last stage


def test_saved_folder_keeps_the_backbone_and_loads_without_the_package(tmp_path):
    model = PCAAForSemanticSegmentation(small_config(backbone_config=BACKBONES["convnext"]())).eval()
    model.save_pretrained(tmp_path / "folder")
    stored = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert stored["backbone_config"]["model_type"] == "convnext"
    assert stored["backbone_config"]["out_features"] == ["stage3", "stage4"]
    reloaded = PCAAForSemanticSegmentation.from_pretrained(tmp_path / "folder").eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values).logits
        assert torch.equal(reloaded(pixel_values).logits, expected)
    torch.save(pixel_values, tmp_path / "pixel_values.pt")

    script = textwrap.dedent("""
        import importlib.abc, sys, torch

        class BlockPCAA(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "pcaa_hf" or name.startswith("pcaa_hf."):
                    raise ImportError("pcaa_hf is blocked in this process")

        sys.meta_path.insert(0, BlockPCAA())
        from transformers import AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
        print(type(model).__module__, type(model.backbone).__name__)
    """)
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "folder"),
                                str(tmp_path / "pixel_values.pt"), str(tmp_path / "logits.pt")],
                               capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    module, backbone = completed.stdout.split()
    assert module.startswith("transformers_modules.") and backbone == "ConvNextBackbone"
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_backbone_configs_are_checked():
    with pytest.raises(StrictDataclassClassValidationError, match="at least 2 stages"):
        PCAAConfig(backbone_config=ConvNextConfig(out_features=["stage4"]))
    assert PCAAConfig(backbone_config=ConvNextConfig(out_features=["stage4"]), use_auxiliary_head=False)
    with pytest.raises(ValueError, match="model_type"):
        PCAAConfig(backbone_config={"hidden_sizes": [8]})
    config = PCAAConfig(backbone_config={"model_type": "resnet", "out_features": ["stage3", "stage4"]})
    assert type(config.backbone_config).__name__ == "ResNetConfig"


def test_paper_only_settings_are_refused_or_described_for_another_backbone(tmp_path):
    from pcaa_hf.conversion.openmmlab_backbones import load_pretrained_backbone
    from pcaa_hf.publishing.model_cards import backbone_name, default_template

    config = small_config(backbone_config=BACKBONES["convnext"](), hidden_size=512)
    model = PCAAForSemanticSegmentation(config)
    with pytest.raises(ValueError, match="ConvNextBackbone has none"):
        model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="not the transformers ConvNextBackbone"):
        load_pretrained_backbone(model, tmp_path / "resnet50_v1c.pth")
    assert default_template(config, "cityscapes").name == "pcaa_generic.md"
    assert backbone_name(config) == "ConvNext" and backbone_name(small_config()) == "ResNet-18"
    swin = PCAAForSemanticSegmentation(small_config(backbone_config=BACKBONES["swin"]()))
    swin.activation_checkpointing_enable()  # Swin's layers can be checkpointed
    swin(torch.randn(2, 3, 64, 64), labels=torch.randint(0, 5, (2, 64, 64))).loss.backward()
