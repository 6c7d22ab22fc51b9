"""The converter, against state dicts named as the authors' `Seg_Model` names them (GitHub lsa1997/PCAA)."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor

from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_hf.conversion.original_checkpoints import (
    CheckpointMismatchError,
    convert_original_checkpoint,
    convert_original_state_dict,
    load_original_state_dict,
    original_config,
)
from pcaa_hf.utils.atomic_folders import write_folder_atomically
from pcaa_testing import randomise_weights, small_config

REPO = Path(__file__).resolve().parents[1]


def authors_key(key, dropout=False):
    """Our key -> the authors' key, written independently of the converter's rules."""
    classifier = 4 if dropout else 3
    rules = [
        (r"^backbone\.stem\.(\d)\.conv\.", lambda m: f"backbone.stem.{3 * int(m[1])}."),
        (r"^backbone\.stem\.(\d)\.norm\.", lambda m: f"backbone.stem.{3 * int(m[1]) + 1}."),
        (r"^backbone\.stages\.(\d)\.(\d+)\.conv(\d)\.conv\.",
         lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
        (r"^backbone\.stages\.(\d)\.(\d+)\.conv(\d)\.norm\.",
         lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.bn{m[3]}."),
        (r"^backbone\.stages\.(\d)\.(\d+)\.shortcut\.conv\.",
         lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
        (r"^backbone\.stages\.(\d)\.(\d+)\.shortcut\.norm\.",
         lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
        (r"^decode_head\.pre\.(conv|norm)\.", lambda m: f"head.conva.{int(m[1] == 'norm')}."),
        (r"^decode_head\.post\.(conv|norm)\.", lambda m: f"head.convb.{int(m[1] == 'norm')}."),
        (r"^decode_head\.fuse\.(conv|norm)\.", lambda m: f"head.conv_seg.{int(m[1] == 'norm')}."),
        (r"^decode_head\.classifier\.", f"head.conv_seg.{classifier}."),
        (r"^auxiliary_head\.conv\.(conv|norm)\.", lambda m: f"dsn.{int(m[1] == 'norm')}."),
        (r"^auxiliary_head\.classifier\.", f"dsn.{classifier}."),
        (r"^decode_head\.pcaa_modules\.(\d+)\.cam_classifier\.", r"head.module_list.\1.conv_cam."),
        (r"^decode_head\.pcaa_modules\.(\d+)\.region_graph\.node_conv\.", r"head.module_list.\1.gcn.conv1."),
        (r"^decode_head\.pcaa_modules\.(\d+)\.region_graph\.channel_linear\.", r"head.module_list.\1.gcn.conv2."),
        (r"^decode_head\.pcaa_modules\.(\d+)\.global_fuse\.", r"head.module_list.\1.fuse."),
        (r"^decode_head\.pcaa_modules\.(\d+)\.(query|key|value)\.", r"head.module_list.\1.proj_\2."),
        (r"^decode_head\.pcaa_modules\.(\d+)\.output_projection\.(conv|norm)\.",
         lambda m: f"head.module_list.{m[1]}.conv_out.{int(m[2] == 'norm')}."),
    ]
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    raise AssertionError(f"no authors' name for {key}")


def authors_state_dict(model, dropout=False, prefix="module."):
    return {prefix + authors_key(key, dropout): value.clone() for key, value in model.state_dict().items()}


def test_authors_names_for_known_keys():
    keys = set(authors_state_dict(PCAAForSemanticSegmentation(small_config(bins=((2, 2), (4, 4)))), prefix=""))
    for key in ["backbone.stem.0.weight", "backbone.stem.7.running_var", "backbone.layer1.0.conv1.weight",
                "backbone.layer2.0.downsample.0.weight", "backbone.layer4.1.bn2.num_batches_tracked",
                "head.conva.0.weight", "head.convb.1.bias", "head.conv_seg.3.bias", "dsn.3.weight",
                "head.module_list.1.gcn.conv1.weight", "head.module_list.0.gcn.conv2.weight",
                "head.module_list.0.fuse.bias", "head.module_list.1.proj_value.weight",
                "head.module_list.0.conv_out.1.running_mean"]:
        assert key in keys


@pytest.mark.parametrize("dropout", [False, True])
def test_state_dict_conversion_is_exact(dropout):
    config = small_config(bins=((2, 2), (4, 4)), classifier_dropout=0.1 if dropout else 0.0)
    source = randomise_weights(PCAAForSemanticSegmentation(config))
    original = {key.removeprefix("module."): value for key, value in authors_state_dict(source, dropout).items()}
    target = PCAAForSemanticSegmentation(config)
    converted = convert_original_state_dict(original, target, dropout)
    assert converted.keys() == source.state_dict().keys()
    assert all(torch.equal(converted[key], value) for key, value in source.state_dict().items())


def test_mismatches_are_refused_listing_every_key():
    source = PCAAForSemanticSegmentation(small_config(backbone_depth=34))
    original = authors_state_dict(source, prefix="")
    with pytest.raises(CheckpointMismatchError) as error:
        convert_original_state_dict(original, PCAAForSemanticSegmentation(small_config(num_labels=7)), False)
    message = str(error.value)
    assert "backbone.layer1.2.conv1.weight" in message  # ResNet-34 has blocks ResNet-18 lacks
    assert ("head.conv_seg.3.weight -> decode_head.classifier.weight: checkpoint (5, 64, 1, 1), model (7, 64, 1, 1)"
            in message)
    assert "head.module_list.0.conv_cam.bias" in message

    with pytest.raises(CheckpointMismatchError, match=r"trained with --dropout[\s\S]*head\.conv_seg\.4\.weight"):
        convert_original_state_dict(authors_state_dict(source, dropout=True, prefix=""),
                                    PCAAForSemanticSegmentation(small_config(backbone_depth=34)), False)

    extra = dict(original, **{"criterion.seg_criterion.weight": torch.ones(5)})
    with pytest.raises(CheckpointMismatchError, match=r"criterion\.seg_criterion\.weight"):
        convert_original_state_dict(extra, PCAAForSemanticSegmentation(small_config(backbone_depth=34)), False)


def test_loading_strips_module_prefix_and_nesting(tmp_path):
    state = {"module.backbone.stem.0.weight": torch.ones(2)}
    torch.save({"state_dict": state}, tmp_path / "nested.pth")
    assert list(load_original_state_dict(tmp_path / "nested.pth")) == ["backbone.stem.0.weight"]


class NotATensor:
    pass


def test_loading_never_unpickles_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"backbone.stem.0.weight": NotATensor()}, handle)
    with pytest.raises(ValueError, match="evil.pth.*weights_only"):
        load_original_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_original_state_dict(tmp_path / "missing.pth")


def run_converter(*arguments):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "convert_original_pcaa.py"), *arguments],
                          capture_output=True, text=True, env=environment, timeout=600)


def test_command_line_converts_a_resnet50_checkpoint_and_refuses_a_mismatch(tmp_path):
    config = original_config("resnet50", 19, [(4, 4)], multi_grid=False, dropout=False)
    source = randomise_weights(PCAAForSemanticSegmentation(config)).eval()
    checkpoint = tmp_path / "CS_scenes_60000.pth"
    torch.save(authors_state_dict(source), checkpoint)

    output = tmp_path / "converted"
    result = run_converter("--checkpoint", str(checkpoint), "--output", str(output), "--backbone", "resnet50",
                           "--num-labels", "19", "--bins", "4x4", "--dataset", "cityscapes")
    assert result.returncode == 0, result.stderr
    assert "no missing or unexpected keys" in result.stdout
    assert (output / "model.safetensors").is_file() and not list(output.glob("*.bin"))
    converted = PCAAForSemanticSegmentation.from_pretrained(output)
    assert converted.config.id2label[0] == "road" and converted.config.id2label[18] == "bicycle"
    processor = AutoImageProcessor.from_pretrained(output)
    assert processor.label_map and int(processor.label_map["26"]) == 13 and not processor.do_resize
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted(pixel_values).logits, source(pixel_values).logits)

    refused = run_converter("--checkpoint", str(checkpoint), "--output", str(tmp_path / "wrong"), "--backbone",
                            "resnet101", "--num-labels", "19")
    assert refused.returncode == 2
    assert "model key(s) the checkpoint does not provide" in refused.stderr and "Traceback" not in refused.stderr
    assert "backbone.stages.2.22.conv1.conv.weight" in refused.stderr
    assert not (tmp_path / "wrong").exists()

    existing = run_converter("--checkpoint", str(checkpoint), "--output", str(output), "--backbone", "resnet50",
                             "--num-labels", "19")
    assert existing.returncode == 2 and "--overwrite" in existing.stderr

    # --num-labels, the first spelling that other tools pass, and --num_labels, the snake_case one, are one option.
    invalid = run_converter("--checkpoint", str(checkpoint), "--output", str(tmp_path / "invalid"), "--backbone",
                            "resnet50", "--num_labels", "0")
    assert invalid.returncode == 2 and "num_labels" in invalid.stderr and "Traceback" not in invalid.stderr

    inside = run_converter("--checkpoint", str(checkpoint), "--output", str(tmp_path), "--backbone", "resnet50",
                           "--num-labels", "19", "--overwrite")
    assert inside.returncode == 2 and "would delete the checkpoint" in inside.stderr and checkpoint.is_file()


def test_conversion_writes_atomically_and_keeps_existing_output_on_failure(tmp_path):
    output = tmp_path / "model"
    output.mkdir()
    (output / "keep.txt").write_text("previous export")
    bad = tmp_path / "bad.pth"
    torch.save({"unrelated.weight": torch.ones(1)}, bad)
    with pytest.raises(CheckpointMismatchError):
        convert_original_checkpoint(bad, output, "resnet50", 19, [(4, 4)], overwrite=True)
    assert (output / "keep.txt").read_text() == "previous export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_writer_keeps_the_previous_folder_when_the_new_one_fails_its_check(tmp_path):
    output = tmp_path / "export"
    output.mkdir()
    (output / "model.safetensors").write_text("previous")

    def write_then_fail(folder):
        (folder / "model.safetensors").write_text("new")
        raise RuntimeError("reload check failed")

    with pytest.raises(RuntimeError, match="reload check failed"):
        write_folder_atomically(write_then_fail, output, overwrite=True)
    assert (output / "model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    written = write_folder_atomically(lambda folder: (folder / "model.safetensors").write_text("new"), output,
                                      overwrite=True)
    assert (written / "model.safetensors").read_text() == "new"
    assert oct(written.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_non_finite_weights_are_named_before_any_conversion(tmp_path, capsys):
    # They once surfaced after the conversion as "The converted folder reloads ... with different values" (NaN != NaN).
    from pcaa_hf.cli import convert_original

    checkpoint = tmp_path / "diverged.pth"
    torch.save({"module.head.conv_seg.0.weight": torch.tensor([[1.0, float("nan")]]),
                "module.dsn.0.weight": torch.tensor([float("-inf")]), "module.backbone.stem.0.weight": torch.ones(2),
                "module.backbone.stem.1.num_batches_tracked": torch.tensor(3)}, checkpoint)
    with pytest.raises(ValueError, match=r"diverged.pth holds NaN or infinite values in 2 tensor\(s\): "
                                         r"module.dsn.0.weight, module.head.conv_seg.0.weight;"):
        load_original_state_dict(checkpoint)
    assert convert_original.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--backbone",
                                  "resnet50", "--num_labels", "19"]) == 2
    assert "error: " + str(checkpoint) + " holds NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
