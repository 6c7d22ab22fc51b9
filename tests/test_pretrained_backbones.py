"""open-mmlab ResNet-V1c ImageNet checkpoints: state dicts with exactly their names and shapes load strictly."""

import pytest
import torch

from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_hf.conversion.openmmlab_backbones import load_pretrained_backbone, save_backbone_safetensors
from pcaa_hf.conversion.original_checkpoints import CheckpointMismatchError
from pcaa_testing import small_config

# ResNet layouts as open-mmlab's ResNetV1c defines them: (blocks per stage, bottleneck?).
LAYOUTS = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True), 101: ((3, 4, 23, 3), True)}


def batch_norm(prefix, channels, generator):
    return {f"{prefix}.weight": torch.rand(channels, generator=generator) + 0.5,
            f"{prefix}.bias": torch.randn(channels, generator=generator),
            f"{prefix}.running_mean": torch.randn(channels, generator=generator),
            f"{prefix}.running_var": torch.rand(channels, generator=generator) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(1000)}


def openmmlab_state_dict(depth, seed=0):
    """The keys and shapes of open-mmlab's resnet{depth}_v1c, written from its architecture, with random values."""
    generator = torch.Generator().manual_seed(seed)
    conv = lambda out, inp, k: torch.randn(out, inp, k, k, generator=generator)  # noqa: E731
    state = {}
    for index, (inp, out) in zip((0, 3, 6), ((3, 32), (32, 32), (32, 64))):
        state[f"stem.{index}.weight"] = conv(out, inp, 3)
        state.update(batch_norm(f"stem.{index + 1}", out, generator))
    blocks, bottleneck = LAYOUTS[depth]
    expansion = 4 if bottleneck else 1
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            if bottleneck:
                shapes = ((inplanes, planes, 1), (planes, planes, 3), (planes, planes * 4, 1))
            else:
                shapes = ((inplanes, planes, 3), (planes, planes, 3))
            for number, (inp, out, kernel) in enumerate(shapes, start=1):
                state[f"{prefix}.conv{number}.weight"] = conv(out, inp, kernel)
                state.update(batch_norm(f"{prefix}.bn{number}", out, generator))
            if block == 0 and (stage > 1 or inplanes != planes * expansion):
                state[f"{prefix}.downsample.0.weight"] = conv(planes * expansion, inplanes, 1)
                state.update(batch_norm(f"{prefix}.downsample.1", planes * expansion, generator))
            inplanes = planes * expansion
    state["fc.weight"] = torch.randn(1000, inplanes, generator=generator)
    state["fc.bias"] = torch.randn(1000, generator=generator)
    return state


@pytest.mark.parametrize("depth, nested", [(18, False), (50, True), (101, False)])
def test_openmmlab_checkpoint_loads_every_backbone_weight(tmp_path, depth, nested):
    state = openmmlab_state_dict(depth)
    path = tmp_path / f"resnet{depth}_v1c.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 100}} if nested else state, path)
    model = PCAAForSemanticSegmentation(small_config(backbone_depth=depth))
    load_pretrained_backbone(model, path)
    loaded = model.backbone.state_dict()
    assert torch.equal(loaded["stem.1.conv.weight"], state["stem.3.weight"])
    assert torch.equal(loaded["stem.2.norm.running_var"], state["stem.7.running_var"])
    assert torch.equal(loaded["stages.3.1.conv2.conv.weight"], state["layer4.1.conv2.weight"])
    assert torch.equal(loaded["stages.1.0.shortcut.norm.bias"], state["layer2.0.downsample.1.bias"])
    used = {key for key in state if not key.startswith("fc.")}
    assert len(used) == len(loaded)  # every backbone tensor came from the file, and only fc.* was left out

    # The converted safetensors file loads the same weights into a fresh model.
    converted = save_backbone_safetensors(path, model.backbone, tmp_path / "backbone.safetensors")
    fresh = load_pretrained_backbone(PCAAForSemanticSegmentation(small_config(backbone_depth=depth)), converted)
    for key, value in fresh.backbone.state_dict().items():
        assert torch.equal(value, loaded[key]), key


def test_mismatches_are_listed_by_name(tmp_path):
    state = openmmlab_state_dict(50)
    del state["layer3.5.bn2.running_var"]
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    state["head.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    model = PCAAForSemanticSegmentation(small_config(backbone_depth=50))
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained_backbone(model, tmp_path / "broken.pth")
    message = str(error.value)
    assert "head.extra.weight" in message and "stages.2.5.conv2.norm.running_var" in message
    assert "layer1.0.conv1.weight -> stages.0.0.conv1.conv.weight" in message


def test_wrong_depth_and_missing_batch_counters(tmp_path):
    torch.save(openmmlab_state_dict(101), tmp_path / "r101.pth")
    with pytest.raises(CheckpointMismatchError, match="no place in the requested model"):
        load_pretrained_backbone(PCAAForSemanticSegmentation(small_config(backbone_depth=50)), tmp_path / "r101.pth")
    state = {key: value for key, value in openmmlab_state_dict(18).items() if "num_batches_tracked" not in key}
    torch.save(state, tmp_path / "r18.pth")
    load_pretrained_backbone(PCAAForSemanticSegmentation(small_config(backbone_depth=18)), tmp_path / "r18.pth")


def test_conversion_script_and_training_argument(tmp_path, capsys):
    from pcaa_hf.cli import convert_backbone as module
    from pcaa_hf.training.arguments import TrainingArguments
    from pcaa_hf.training.trainer import build_model

    state = openmmlab_state_dict(18)
    torch.save(state, tmp_path / "resnet18_v1c.pth")
    output = tmp_path / "r18.safetensors"
    assert module.main(["--checkpoint", str(tmp_path / "resnet18_v1c.pth"), "--depth", "18",
                        "--output", str(output)]) == 0
    assert module.main(["--checkpoint", str(tmp_path / "resnet18_v1c.pth"), "--depth", "50",
                        "--output", str(tmp_path / "r50.safetensors")]) == 2
    assert "does not fit this backbone" in capsys.readouterr().err and not (tmp_path / "r50.safetensors").exists()

    for weights in (tmp_path / "resnet18_v1c.pth", output):
        arguments = TrainingArguments(output_dir=str(tmp_path), dataset_type="cityscapes", data="unused",
                                      backbone_depth=18, hidden_size=32, auxiliary_hidden_size=16,
                                      pretrained_backbone=str(weights))
        model = build_model(arguments, {0: "a", 1: "b"})
        assert torch.equal(model.backbone.state_dict()["stages.2.1.conv1.conv.weight"], state["layer3.1.conv1.weight"])


def test_conversion_script_names_broken_inputs_and_creates_the_output_folder(tmp_path, capsys):
    from pcaa_hf.cli import convert_backbone

    def convert(checkpoint, output):
        return convert_backbone.main(["--checkpoint", str(checkpoint), "--depth", "18", "--output", str(output)])

    state = openmmlab_state_dict(18)
    torch.save(state, tmp_path / "resnet18_v1c.pth")
    output = tmp_path / "new" / "folder" / "r18.safetensors"  # once a traceback from safetensors' save_file
    assert convert(tmp_path / "resnet18_v1c.pth", output) == 0
    assert output.is_file()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(output.read_bytes()[:1000])
    assert convert(truncated, tmp_path / "out.safetensors") == 2
    assert f"error: {truncated} is not a complete safetensors file" in capsys.readouterr().err

    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["stem.1.running_var"][0] = float("inf")
    torch.save(state, tmp_path / "diverged.pth")
    assert convert(tmp_path / "diverged.pth", tmp_path / "out.safetensors") == 2
    assert ("error: " + str(tmp_path / "diverged.pth") + " holds NaN or infinite values in 2 tensor(s): "
            "layer1.0.conv1.weight, stem.1.running_var") in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
