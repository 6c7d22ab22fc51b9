"""The arguments of a training run: one dataclass, which is also `pcaa-train`'s command line.

Each field's `metadata` holds what the command line shows for it (transformers' `HfArgumentParser` reads them): its
`help`, its `choices`, its `metavar` and the `group` it is listed under in `--help`; `resumable_change=True` marks an
option a resumed run may change (where data is read from, with how many workers, how often to log, evaluate and
checkpoint, where to publish, the card's template): the others fix the weights a run ends with, or the facts its
model card states. The defaults are the fields'.
Fields are in the order a model card's recipe table shows them.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields

from pcaa_hf.data.builders import DATASET_TYPES
from pcaa_hf.data.transforms import RESCALE_RATIOS
from pcaa_hf.inference.segmentation_inference import MODES
from pcaa_hf.model.configuration_pcaa import BACKBONE_DEPTHS, DECODE_HEAD_TYPES

GROUPS = DATA, MODEL, OPTIMISATION, RUN, PUBLISHING = (
    "data", "model", "optimisation", "checkpoints, logging, evaluation", "publishing")


def option(default=None, *, group, help, **metadata):
    """A field with a default and what the command line shows for it (`metadata`: choices, metavar, ...)."""
    return field(default=default, metadata={"group": group, "help": help, **metadata})


def required(*, group, help, **metadata):
    """A field without a default: a required option."""
    return field(metadata={"group": group, "help": help, **metadata})


@dataclass
class TrainingArguments:
    """Everything a run needs. `Trainer(TrainingArguments(...)).train()` runs it; `pcaa-train --help` lists it."""

    _argument_groups = GROUPS  # the order of the groups in --help

    output_dir: str = required(group=RUN, resumable_change=True,
                               help="checkpoints/, best/ (best mIoU so far) and model/ (the final model) go here; one "
                                    "run at a time")
    dataset_type: str = required(
        group=DATA, choices=DATASET_TYPES,
        help="cityscapes / ade20k: the data set's own folder layout; datasets: a save_to_disk folder or anything "
             "datasets.load_dataset reads, with image and label columns")
    data: str = required(group=DATA, resumable_change=True,
                         help="the data set's root folder, save_to_disk folder or Hub name")
    train_split: str = option("train", group=DATA, help="the split to train on")
    eval_split: str = option("validation", group=DATA, help="the split to evaluate on")
    image_column: str = option("image", group=DATA, help="--dataset_type datasets: the image column")
    label_column: str = option("label", group=DATA, help="--dataset_type datasets: the label column")
    # model
    model_name_or_path: str | None = option(group=MODEL,
                                            help="start from a saved PCAA folder or Hub id (fine-tuning)")
    pretrained_backbone: str | None = option(
        group=MODEL, help="ImageNet weights for the backbone: open-mmlab's resnet{18,50,101}_v1c .pth file (as the "
                          "paper), or its safetensors conversion (pcaa-convert-backbone)")
    backbone_depth: int = option(50, group=MODEL, choices=BACKBONE_DEPTHS, help="the ResNet's depth")
    output_stride: int = option(8, group=MODEL, choices=(8, 16), help="the backbone's output stride")
    multi_grid: bool = option(False, group=MODEL, help="stage-4 dilations x(1, 2, 4) (ADE20K recipe)")
    decode_head_type: str = option(DECODE_HEAD_TYPES[0], group=MODEL, choices=DECODE_HEAD_TYPES,
                                   help="the context head: pcaa, or a baseline of the paper's Table 3 (fcn, aspp, "
                                        "non_local, ocr) trained the same way")
    bins: list[tuple[int, int]] = field(default_factory=lambda: [(4, 4)], metadata={
        "group": MODEL, "metavar": "RxC", "help": "region grid of each PCAA module, one RxC a module (pcaa head)"})
    hidden_size: int = option(512, group=MODEL, help="channels of the decode head")
    auxiliary_hidden_size: int = option(256, group=MODEL, help="channels of the auxiliary head")
    classifier_dropout: float = option(0.0, group=MODEL, help="dropout before the classifier (the authors' "
                                                              "--dropout is 0.1)")
    use_ohem: bool = option(False, group=MODEL, help="online hard example mining cross-entropy")
    gradient_checkpointing: bool = option(False, group=MODEL, help="recompute residual blocks in the backward pass "
                                                                   "(less memory, more time)")
    # data
    base_size: tuple[int, int] = option((2048, 1024), group=DATA, metavar=("LONG", "SHORT"),
                                        help="random rescale target, scaled by 0.5-2.0 (Cityscapes 2048 1024, "
                                             "ADE20K 2048 512)")
    crop_size: tuple[int, int] = option((768, 768), group=DATA, metavar=("H", "W"),
                                        help="training crop (Cityscapes 768 768, ADE20K 512 512)")
    num_workers: int = option(2, group=DATA, resumable_change=True, help="data loading workers per process")
    # optimisation
    max_train_steps: int = option(60000, group=OPTIMISATION, help="optimiser updates")
    per_device_train_batch_size: int = option(8, group=OPTIMISATION, help="images per process per step")
    gradient_accumulation_steps: int = option(1, group=OPTIMISATION, help="steps per optimiser update")
    learning_rate: float = option(0.01, group=OPTIMISATION, help="SGD, decayed by (1 - i/max)^poly_power")
    momentum: float = option(0.9, group=OPTIMISATION, help="SGD momentum")
    weight_decay: float = option(1e-4, group=OPTIMISATION, help="SGD weight decay")
    poly_power: float = option(0.9, group=OPTIMISATION, help="power of the learning rate's polynomial decay")
    seed: int = option(0, group=OPTIMISATION, help="seeds the weights, the batch order and the augmentation")
    mixed_precision: str | None = option(group=OPTIMISATION, choices=("no", "fp16", "bf16"),
                                         help="default: accelerate's configuration, else no")
    # checkpoints and logging
    checkpointing_steps: int | None = option(group=RUN, resumable_change=True,
                                             help="save a checkpoint (model, optimiser, schedule, random states) every "
                                                  "N steps")
    checkpoints_total_limit: int | None = option(2, group=RUN, resumable_change=True,
                                                 help="keep the last N checkpoints")
    resume_from_checkpoint: str | None = option(
        group=RUN, metavar="PATH|latest", resumable_change=True,
        help="continue this run from a checkpoint folder, or latest: the newest intact one in --output_dir (none: "
             "start); the other options must be the run's")
    overwrite_output_dir: bool = option(False, group=RUN, resumable_change=True,
                                        help="delete an earlier run's checkpoints, best/ and model/ in --output_dir "
                                             "and start afresh")
    logging_steps: int = option(10, group=RUN, resumable_change=True, help="log the loss every N steps")
    with_tracking: bool = option(False, group=RUN, resumable_change=True, help="log to the trackers of --report_to")
    report_to: str = option("tensorboard", group=RUN, resumable_change=True,
                            help="accelerate tracker(s): tensorboard, wandb, all, ...")
    # evaluation
    eval_steps: int | None = option(group=RUN, resumable_change=True, help="evaluate every N steps (always at the end)")
    per_device_eval_batch_size: int = option(1, group=RUN, resumable_change=True,
                                             help="images per process per evaluation batch")
    eval_mode: str = option("whole", group=RUN, choices=MODES,
                            help="whole image, or sliding windows (Cityscapes: slide with --eval_crop_size 768 768)")
    eval_crop_size: tuple[int, int] = option((768, 768), group=RUN, metavar=("H", "W"),
                                             help="sliding window size")
    eval_stride: tuple[int, int] | None = option(group=RUN, metavar=("H", "W"),
                                                 help="sliding window stride (default: 2/3 of the crop)")
    max_eval_samples: int | None = option(group=RUN, help="evaluate on the first N images only")
    # publishing
    model_card_template: str | None = option(group=PUBLISHING, resumable_change=True,
                                             help="Jinja template (default: model_cards/ by configuration)")
    push_to_hub: bool = option(False, group=PUBLISHING, resumable_change=True,
                               help="upload best/ and model/ to --hub_model_id")
    hub_model_id: str | None = option(group=PUBLISHING, resumable_change=True,
                                      help="the Hub repository, e.g. you/pcaa-r50-cityscapes")
    hub_token: str | None = option(group=PUBLISHING, resumable_change=True,
                                   help="default: the token saved by `hf auth login`")
    push_checkpoints: bool = option(False, group=PUBLISHING, resumable_change=True,
                                    help="also upload every checkpoint")

    def __post_init__(self):
        problems = []
        if self.dataset_type not in DATASET_TYPES:
            problems.append(f"dataset_type must be one of {DATASET_TYPES}, got {self.dataset_type!r}")
        for name in ("max_train_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpointing_steps", "checkpoints_total_limit", "eval_steps", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (or left out), got {getattr(self, name)}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be 0 or more, got {self.num_workers}")
        for name in ("base_size", "crop_size", "eval_crop_size") + (("eval_stride",) if self.eval_stride else ()):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                problems.append(f"{name} must be two positive integers, got {value}")
        largest_side = int(max(self.base_size) * RESCALE_RATIOS[1])
        if max(self.crop_size) > largest_side:
            problems.append(f"crop_size {tuple(self.crop_size)} is larger than any rescaled image (at most "
                            f"{RESCALE_RATIOS[1]:g} x base_size {tuple(self.base_size)}: {largest_side} pixels a "
                            "side), so every crop would be mostly padding")
        for name in ("learning_rate", "poly_power"):  # NaN fails every comparison: `not > 0` catches it
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                problems.append(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a finite number of at least 0, got {self.weight_decay}")
        if not 0 <= self.classifier_dropout < 1:
            problems.append(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            problems.append("overwrite_output_dir deletes the checkpoints resume_from_checkpoint would continue: pass "
                            "one")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("push_to_hub needs hub_model_id (e.g. you/pcaa-r50-cityscapes)")
        if self.pretrained_backbone is not None and self.model_name_or_path is not None:
            problems.append("pretrained_backbone and model_name_or_path both give backbone weights: pass one")
        if problems:
            raise ValueError("Invalid training arguments: " + "; ".join(problems) + ".")

    def to_dict(self):
        return {key: value for key, value in asdict(self).items() if key != "hub_token"}

    def changes_breaking_resume(self, earlier):
        """
        (name, earlier value, value) of each option that differs from `earlier` (a `to_dict()` of the run being
        resumed) and is not a `resumable_change`: changing it would break the resumed run's exactness or its model
        card's truth.
        """
        current = json.loads(json.dumps(self.to_dict()))  # tuples as lists, as `earlier` was read from JSON
        return [(item.name, earlier.get(item.name), current[item.name]) for item in fields(self)
                if item.name in current and not item.metadata.get("resumable_change")
                and earlier.get(item.name) != current[item.name]]


__all__ = ["TrainingArguments"]
