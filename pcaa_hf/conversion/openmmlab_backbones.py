"""ImageNet weights for the backbone: open-mmlab's ResNet-V1c checkpoints, which the paper starts from.

open-mmlab publishes `resnet18_v1c`, `resnet50_v1c` and `resnet101_v1c` (mmcv's model zoo, `open-mmlab://resnet50_v1c`
in mmsegmentation configs) as torch files whose state dict, possibly under a "state_dict" key, names the deep stem
`stem.{0,1,3,4,6,7}.*`, the residual stages `layer{1..4}.{i}.{conv,bn}{1,2,3}.*` with `layer{k}.0.downsample.{0,1}.*`,
and an ImageNet classifier `fc.*` that segmentation does not use. Dilation does not change any weight's shape, so the
same file serves output stride 8 or 16 and multi-grid.
"""

from pathlib import Path

from safetensors.torch import load_file, save_file

from pcaa_hf.inference.model_folders import check_safetensors_file

from .original_checkpoints import (
    BACKBONE_KEY_RULES,
    CheckpointMismatchError,
    check_finite,
    load_original_state_dict,
    match_state_dict,
    rename_key,
)

IMAGENET_CLASSIFIER_PREFIX = "fc."
# BatchNorm's batch counters are bookkeeping, not weights: files converted from other frameworks often lack them.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def openmmlab_backbone_state_dict(path, backbone):
    """
    Read an open-mmlab ResNet-V1c checkpoint (`weights_only=True`) and return its weights under `backbone`'s names
    (a `PCAAResNetBackbone`). Only `fc.*` is ignored; any other key without a place, any backbone weight the file does
    not provide and any shape mismatch raise `CheckpointMismatchError` listing every offending name. A safetensors file
    written by `save_backbone_safetensors` (our names already) is read as it is, with the same checks.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"Backbone weights {path} do not exist.")
        check_safetensors_file(path)
        state_dict, rename = load_file(path), lambda key: key
        check_finite(state_dict, path)
    else:
        state_dict = load_original_state_dict(path)
        state_dict = {key: value for key, value in state_dict.items()
                      if not key.startswith(IMAGENET_CLASSIFIER_PREFIX)}
        rename = lambda key: rename_key(key, BACKBONE_KEY_RULES)  # noqa: E731
    converted, problems = match_state_dict(state_dict, backbone.state_dict(), rename, OPTIONAL_SUFFIXES)
    if problems:
        raise CheckpointMismatchError(
            f"{path} does not fit this backbone: it needs the resnet<depth>_v1c file of the config's backbone_depth "
            "(V1c: the deep stem):\n" + "\n".join(problems))
    return converted


def load_pretrained_backbone(model, path):
    """Load ImageNet weights (see `openmmlab_backbone_state_dict`) into `model.backbone`; returns `model`."""
    if getattr(model.config, "backbone_config", None) is not None:
        raise ValueError(f"open-mmlab ResNet-V1c weights fit the paper's backbone, not the transformers "
                         f"{type(model.backbone).__name__} of this model.")
    weights = openmmlab_backbone_state_dict(path, model.backbone)
    model.backbone.load_state_dict(weights, strict=False)  # strict up to the optional batch counters, checked above
    return model


def save_backbone_safetensors(path, backbone, output):
    """
    Convert an open-mmlab checkpoint into a safetensors file of `backbone`'s weights under our names, creating the
    folder of `output` if needed.
    """
    weights = openmmlab_backbone_state_dict(path, backbone)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    save_file({key: value.contiguous() for key, value in weights.items()}, str(partial),
              metadata={"format": "pt", "source": Path(path).name})
    partial.replace(output)
    return output


__all__ = ["load_pretrained_backbone", "openmmlab_backbone_state_dict", "save_backbone_safetensors"]
