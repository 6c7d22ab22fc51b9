"""Conversion of checkpoints written by the authors' PCAA training code (GitHub lsa1997/PCAA) to transformers
folders."""

import importlib.util
import logging
import pickle
import re
import sys
import types
from pathlib import Path

import torch

from pcaa_hf.data.label_sets import IMAGE_PROCESSOR_SETTINGS, LABEL_SETS, label_maps
from pcaa_hf.model.configuration_pcaa import PCAAConfig
from pcaa_hf.model.image_processing_pcaa import PCAAImageProcessor
from pcaa_hf.model.modeling_pcaa import PCAAForSemanticSegmentation
from pcaa_hf.utils.atomic_folders import write_folder_atomically
from pcaa_hf.utils.safe_loading import weights_only_refusal
from pcaa_hf.utils.tensor_checks import non_finite_tensors

logger = logging.getLogger(__name__)

ORIGINAL_BACKBONES = {"resnet50": 50, "resnet101": 101}

# The authors' (and open-mmlab's ResNet-V1c) backbone names -> ours.
BACKBONE_KEY_RULES = (
    (r"^stem\.0\.", "stem.0.conv."),
    (r"^stem\.1\.", "stem.0.norm."),
    (r"^stem\.3\.", "stem.1.conv."),
    (r"^stem\.4\.", "stem.1.norm."),
    (r"^stem\.6\.", "stem.2.conv."),
    (r"^stem\.7\.", "stem.2.norm."),
    (r"^layer([1-4])\.(\d+)\.conv([1-3])\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.conv{m[3]}.conv."),
    (r"^layer([1-4])\.(\d+)\.bn([1-3])\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.conv{m[3]}.norm."),
    (r"^layer([1-4])\.(\d+)\.downsample\.0\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut.conv."),
    (r"^layer([1-4])\.(\d+)\.downsample\.1\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut.norm."),
)

PCAA_MODULE_KEY_RULES = (
    (r"^conv_cam\.", "cam_classifier."),
    (r"^gcn\.conv1\.", "region_graph.node_conv."),
    (r"^gcn\.conv2\.", "region_graph.channel_linear."),
    (r"^fuse\.", "global_fuse."),
    (r"^proj_query\.", "query."),
    (r"^proj_key\.", "key."),
    (r"^proj_value\.", "value."),
    (r"^conv_out\.0\.", "output_projection.conv."),
    (r"^conv_out\.1\.", "output_projection.norm."),
)


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the requested architecture."""


def rename_key(key, rules):
    """Apply the first matching (pattern, replacement) rule; None when no rule matches."""
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key, count=1)
        if count:
            return renamed
    return None


# The authors' train.py --model choices -> our `decode_head_type`.
ORIGINAL_MODELS = {"caanet": "pcaa", "basenet": "fcn", "deeplabv3": "aspp", "nlnet": "non_local", "ocrnet": "ocr"}
# A key only each authors' model has, to name the model a checkpoint holds when it does not match --model.
ORIGINAL_MODEL_MARKERS = {"caanet": "head.module_list.", "basenet": "head.0.", "deeplabv3": "head.conv1.",
                          "nlnet": "head.ctb.", "ocrnet": "spatial_ocr_head."}


def conv_norm_rules(original, ours):
    """The authors' nn.Sequential(conv, BatchNorm[, ReLU]) at `original` -> our `PCAAConvNormAct` at `ours`."""
    return ((rf"^{original}\.0\.", f"{ours}.conv."), (rf"^{original}\.1\.", f"{ours}.norm."))


def stacked_conv_norm_rules(original, ours):
    """The authors' nn.Sequential of (conv, BatchNorm, ReLU) triples at `original` -> our nn.Sequential of them."""
    return ((rf"^{original}\.(\d+)\.",
             lambda m: f"{ours}.{int(m[1]) // 3}.{'conv' if int(m[1]) % 3 == 0 else 'norm'}."),)


def classifier_index(dropout, first):
    """
    Where the authors put a classifier convolution in an nn.Sequential whose layers before it number `first`: one
    later with --dropout, after the Dropout2d.
    """
    return first + 1 if dropout else first


def caanet_rules(dropout):
    return (*conv_norm_rules(r"head\.conva", "decode_head.pre"),
            *conv_norm_rules(r"head\.convb", "decode_head.post"),
            *conv_norm_rules(r"head\.conv_seg", "decode_head.fuse"),
            (rf"^head\.conv_seg\.{classifier_index(dropout, 3)}\.", "decode_head.classifier."))


def basenet_rules(dropout):
    return (*stacked_conv_norm_rules(r"head", "decode_head.convs"),
            (rf"^classifier\.{classifier_index(dropout, 0)}\.", "decode_head.classifier."))


def deeplabv3_rules(dropout):
    return ((r"^head\.conv1\.1\.", "decode_head.image_pool.conv."),  # conv1.0 is its pooling layer
            (r"^head\.conv1\.2\.", "decode_head.image_pool.norm."),
            (r"^head\.conv([2-9])\.0\.", lambda m: f"decode_head.branches.{int(m[1]) - 2}.conv."),
            (r"^head\.conv([2-9])\.1\.", lambda m: f"decode_head.branches.{int(m[1]) - 2}.norm."),
            *conv_norm_rules(r"head\.bottleneck", "decode_head.bottleneck"),
            (rf"^classifier\.{classifier_index(dropout, 0)}\.", "decode_head.classifier."))


def nlnet_rules(dropout):
    return (*conv_norm_rules(r"head\.conva", "decode_head.pre"),
            (r"^head\.ctb\.conv_query\.", "decode_head.non_local.query."),
            (r"^head\.ctb\.conv_key\.", "decode_head.non_local.key."),
            (r"^head\.ctb\.conv_value\.", "decode_head.non_local.value."),
            *conv_norm_rules(r"head\.ctb\.conv_out", "decode_head.non_local.output_projection"),
            *conv_norm_rules(r"head\.convb", "decode_head.post"),
            *conv_norm_rules(r"head\.bottleneck", "decode_head.fuse"),
            (rf"^head\.bottleneck\.{classifier_index(dropout, 3)}\.", "decode_head.classifier."))


def ocrnet_rules(dropout):
    block = r"spatial_ocr_head\.object_context_block"
    return (*conv_norm_rules(r"conv_3x3", "decode_head.pre"),
            *stacked_conv_norm_rules(rf"{block}\.f_pixel", "decode_head.object_context.pixel_query"),
            *stacked_conv_norm_rules(rf"{block}\.f_object", "decode_head.object_context.object_key"),
            *stacked_conv_norm_rules(rf"{block}\.f_down", "decode_head.object_context.object_value"),
            *conv_norm_rules(rf"{block}\.f_up", "decode_head.object_context.output_projection"),
            *conv_norm_rules(r"spatial_ocr_head\.conv_bn_dropout", "decode_head.fuse"),
            (rf"^classifier\.{classifier_index(dropout, 0)}\.", "decode_head.classifier."))


# Renaming rules of each authors' model's decode head, by its --model name, given --dropout.
DECODE_HEAD_RULES = {"caanet": caanet_rules, "basenet": basenet_rules, "deeplabv3": deeplabv3_rules,
                     "nlnet": nlnet_rules, "ocrnet": ocrnet_rules}


def original_key_to_hf(key, dropout, model="caanet"):
    """The name of a key of the authors' `model` (`networks/<model>.py`'s `Seg_Model`) in ours, or None if unknown."""
    if key.startswith("backbone."):
        renamed = rename_key(key[len("backbone."):], BACKBONE_KEY_RULES)
        return None if renamed is None else "backbone." + renamed
    match = re.match(r"^head\.module_list\.(\d+)\.(.*)$", key)
    if model == "caanet" and match:
        renamed = rename_key(match[2], PCAA_MODULE_KEY_RULES)
        return None if renamed is None else f"decode_head.pcaa_modules.{match[1]}.{renamed}"
    auxiliary_rules = (
        *conv_norm_rules(r"dsn", "auxiliary_head.conv"),
        (rf"^dsn\.{classifier_index(dropout, 3)}\.", "auxiliary_head.classifier."),
    )
    return rename_key(key, (*DECODE_HEAD_RULES[model](dropout), *auxiliary_rules))


def load_original_state_dict(path):
    """
    Read a torch checkpoint without unpickling code (`weights_only=True`). Accepts a plain state dict or one under a
    "state_dict" or "model" key; strips the `module.` prefix DataParallel/DistributedDataParallel add.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist or is not a file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds objects other than tensors, which could run code when loaded: refused "
                         f"({weights_only_refusal(error)}).") from None
    except Exception as error:
        raise ValueError(f"Cannot read {path} as a torch checkpoint of tensors: {error}") from error
    for nested in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(nested), dict):
            checkpoint = checkpoint[nested]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    check_finite(checkpoint, path)
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def check_finite(state_dict, path):
    """Refuse weights holding NaN or infinite values, naming the tensors: they come from a diverged or damaged run."""
    broken = non_finite_tensors(state_dict)
    if broken:
        raise ValueError(f"{path} holds NaN or infinite values in {len(broken)} tensor(s): {', '.join(broken[:10])}"
                         + (f" and {len(broken) - 10} more" if len(broken) > 10 else "")
                         + "; weights from a diverged or damaged run cannot be converted.")


def _listing(items):
    return "\n".join(f"  {item}" for item in sorted(items))


def match_state_dict(state_dict, expected, rename, optional=()):
    """
    Rename `state_dict`'s keys with `rename` (None: no place) and compare them with the `expected` state dict.
    Returns (converted, problems): the tensors that fit, and a description of each unexpected, missing (except keys
    ending with one of `optional`) and mismatched-shape key — nothing is dropped silently.
    """
    converted, provided, unexpected, mismatched = {}, set(), [], []
    for key, value in state_dict.items():
        new_key = rename(key)
        if new_key is None or new_key not in expected:
            unexpected.append(key)
            continue
        provided.add(new_key)
        if tuple(value.shape) != tuple(expected[new_key].shape):
            mismatched.append(
                f"{key} -> {new_key}: checkpoint {tuple(value.shape)}, model {tuple(expected[new_key].shape)}"
            )
        else:
            converted[new_key] = value
    missing = [key for key in expected if key not in provided and not key.endswith(tuple(optional))]
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint key(s) with no place in the requested model:\n{_listing(unexpected)}"
        )
    if missing:
        problems.append(f"{len(missing)} model key(s) the checkpoint does not provide:\n{_listing(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} key(s) with mismatched shapes:\n{_listing(mismatched)}")
    return converted, problems


def convert_original_state_dict(state_dict, model, dropout, original_model="caanet"):
    """
    Rename the keys of the authors' `original_model` to ours and check them against `model`: every key of the
    checkpoint must map to a key of the model with the same shape, and every key of the model must be given. Raises
    `CheckpointMismatchError` listing every offending key otherwise; nothing is dropped silently.
    """
    def matched(with_dropout):
        return match_state_dict(state_dict, model.state_dict(),
                                lambda key: original_key_to_hf(key, with_dropout, original_model))

    converted, problems = matched(dropout)
    if problems:
        hints = []
        held = [name for name, marker in ORIGINAL_MODEL_MARKERS.items()
                if any(key.startswith(marker) for key in state_dict)]
        if held and original_model not in held:
            hints.append(f"it holds an authors' {held[0]} model: pass --model {held[0]}")
        elif not matched(not dropout)[1]:
            hints.append("its classifiers sit after a dropout layer: it was trained with --dropout" if not dropout
                         else "its classifiers sit where they do without dropout: drop --dropout")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise CheckpointMismatchError(
            "The checkpoint does not match the requested architecture; check --model, --backbone, --num-labels, the "
            f"number of --bins grids and --dropout{hint}:\n" + "\n".join(problems)
        )
    return converted


def original_config(backbone, num_labels, bins, multi_grid, dropout, auxiliary_head=True, dataset=None,
                    original_model="caanet"):
    """The `PCAAConfig` of an authors' `original_model` trained with the given command-line settings."""
    if backbone not in ORIGINAL_BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}: expected one of {sorted(ORIGINAL_BACKBONES)}.")
    if original_model not in ORIGINAL_MODELS:
        raise ValueError(f"Unknown model {original_model!r}: expected one of {sorted(ORIGINAL_MODELS)}.")
    labels = {"num_labels": num_labels}
    if dataset is not None:
        names = LABEL_SETS[dataset]
        if len(names) != num_labels:
            raise ValueError(f"--dataset {dataset} has {len(names)} classes but --num-labels is {num_labels}.")
        id2label, label2id = label_maps(names)
        labels = {"id2label": id2label, "label2id": label2id}
    return PCAAConfig(
        decode_head_type=ORIGINAL_MODELS[original_model],
        backbone_depth=ORIGINAL_BACKBONES[backbone],
        multi_grid=multi_grid,
        bins=tuple(tuple(grid) for grid in bins),
        classifier_dropout=0.1 if dropout else 0.0,
        use_auxiliary_head=auxiliary_head,
        **labels,
    )


def convert_original_checkpoint(checkpoint, output, backbone, num_labels, bins, multi_grid=False, dropout=False,
                                dataset=None, overwrite=False, original_model="caanet"):
    """
    Convert a checkpoint of the authors' `original_model` (their train.py's --model: `caanet`, PCAA, or a baseline of
    `ORIGINAL_MODELS`) into a `save_pretrained` folder with its image processor (set up for `dataset` when given),
    written atomically and checked to reload with no missing or unexpected keys and identical weights before it
    replaces anything. Returns the reloaded model.
    """
    checkpoint, output = Path(checkpoint).resolve(), Path(output).resolve()
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; choose another --output or pass --overwrite.")
    if overwrite and checkpoint.is_relative_to(output):
        raise ValueError(f"--overwrite would delete the checkpoint {checkpoint}, which lies inside --output {output}.")
    if dataset == "ade20k" and not multi_grid:
        logger.warning("The authors' ADE20K models were trained with --multi-grid; the weights cannot tell, so "
                       "check that this one was not (pass --multi-grid otherwise).")
    state_dict = load_original_state_dict(checkpoint)
    # OCR's object regions are its auxiliary head's scores: an ocrnet checkpoint without one is reported as incomplete.
    auxiliary_head = original_model == "ocrnet" or any(key.startswith("dsn.") for key in state_dict)
    if not auxiliary_head:
        logger.info("The checkpoint has no auxiliary head (dsn.*): converting without one.")
    config = original_config(backbone, num_labels, bins, multi_grid, dropout, auxiliary_head, dataset, original_model)
    model = PCAAForSemanticSegmentation(config)
    model.load_state_dict(convert_original_state_dict(state_dict, model, dropout, original_model), strict=True)
    model.eval()

    processor = PCAAImageProcessor(**IMAGE_PROCESSOR_SETTINGS.get(dataset, {}))

    def save_and_check(folder):
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        reloaded, info = PCAAForSemanticSegmentation.from_pretrained(folder, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
            raise RuntimeError(f"The converted folder does not reload cleanly: {info}")
        reloaded_state = reloaded.state_dict()
        for key, value in model.state_dict().items():
            if not torch.equal(reloaded_state[key], value):
                raise RuntimeError(f"The converted folder reloads {key} with different values.")

    write_folder_atomically(save_and_check, output, overwrite)
    return PCAAForSemanticSegmentation.from_pretrained(output)


def import_original(root, modules=("networks.caanet", "loss.criterion")):
    """
    Import modules of a checkout of GitHub lsa1997/PCAA, for comparisons only; by default the authors' model and loss
    modules (`networks.caanet`, `loss.criterion`), returned in the order asked. Their utils import cv2, unused on
    these paths: a stand-in serves while they load when OpenCV is missing. Afterwards `sys.path` and `sys.modules` are
    as before (the checkout's evaluate.py would shadow the `evaluate` package, and its generic module names those of
    other checkouts).
    """
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    if importlib.util.find_spec("cv2") is None:
        sys.modules["cv2"] = types.ModuleType("cv2")
    root = Path(root).resolve()
    sys.path.insert(0, str(root))
    try:
        imported = tuple(importlib.import_module(name) for name in modules)
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            origin = getattr(sys.modules[name], "__file__", None)
            stand_in = name == "cv2" and origin is None
            if stand_in or (origin is not None and root in Path(origin).resolve().parents):
                del sys.modules[name]
    return imported
