#!/usr/bin/env python
r"""Train PCAA with Accelerate on Cityscapes, ADE20K or any image/label data set, resumable, with evaluation and a
Hub-ready export (model, image processor, code and model card).

Examples:
    # the paper's recipes are plain argument files (one argument per line) under scripts/recipes/
    accelerate launch --num_processes 4 scripts/train.py @scripts/recipes/cityscapes_r50.args \
        --data /data/cityscapes --output_dir runs/pcaa-r50-cityscapes
    # resume after a crash from the newest complete checkpoint (same command plus):
        --resume_from_checkpoint latest
    # several CPU processes (gloo):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...

Outputs in --output_dir: checkpoints/checkpoint-N (accelerate state, every --checkpointing_steps), best/ (best
mIoU so far) and model/ (the final model), each a save_pretrained folder with a README.md model card.
"""

import os

# Large CPU tensors on transparent huge pages (torch reads THP_MEM_ALLOC_ENABLE at its first allocation): 7x fewer
# page faults, about 4 % faster inference on CPUs (docs/benchmarks.md). An explicit setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import logging
import sys

from huggingface_hub.errors import StrictDataclassError

from pcaa_hf.argument_types import region_grid
from pcaa_hf.cpu_memory import reuse_freed_cpu_memory
from pcaa_hf.inference import MODES
from pcaa_hf.publishing import HubPublisher
from pcaa_hf.training import DATASET_TYPES, Trainer, TrainingArguments




class RecipeArgumentParser(argparse.ArgumentParser):
    """Reads @FILE recipes: one option and its values per line, `#` starting a comment."""

    def convert_arg_line_to_args(self, line):
        return line.split("#", 1)[0].split()


def parse_args(argv=None):
    parser = RecipeArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  fromfile_prefix_chars="@")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_type", required=True, choices=DATASET_TYPES,
                      help="cityscapes / ade20k: the data set's own folder layout; datasets: a save_to_disk folder or "
                           "anything datasets.load_dataset reads, with image and label columns")
    data.add_argument("--data", required=True, help="the data set's root folder, save_to_disk folder or Hub name")
    data.add_argument("--train_split", default="train")
    data.add_argument("--eval_split", default="validation")
    data.add_argument("--image_column", default="image", help="--dataset_type datasets: the image column")
    data.add_argument("--label_column", default="label", help="--dataset_type datasets: the label column")
    data.add_argument("--base_size", type=int, nargs=2, default=(2048, 1024), metavar=("LONG", "SHORT"),
                      help="random rescale target, scaled by 0.5-2.0 (Cityscapes 2048 1024, ADE20K 2048 512)")
    data.add_argument("--crop_size", type=int, nargs=2, default=(768, 768), metavar=("H", "W"),
                      help="training crop (Cityscapes 768 768, ADE20K 512 512)")
    data.add_argument("--num_workers", type=int, default=2, help="data loading workers per process")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="start from a saved PCAA folder or Hub id (fine-tuning)")
    model.add_argument("--pretrained_backbone",
                       help="ImageNet weights for the backbone: open-mmlab's resnet{18,50,101}_v1c .pth file (as the "
                            "paper), or its safetensors conversion (scripts/convert_openmmlab_backbone.py)")
    model.add_argument("--backbone_depth", type=int, default=50, choices=(18, 34, 50, 101))
    model.add_argument("--output_stride", type=int, default=8, choices=(8, 16))
    model.add_argument("--multi_grid", action="store_true", help="stage-4 dilations x(1, 2, 4) (ADE20K recipe)")
    model.add_argument("--bins", nargs="+", type=region_grid, default=[(4, 4)], metavar="RxC",
                       help="region grid of each PCAA module (default: 4x4)")
    model.add_argument("--hidden_size", type=int, default=512)
    model.add_argument("--auxiliary_hidden_size", type=int, default=256)
    model.add_argument("--classifier_dropout", type=float, default=0.0, help="the authors' --dropout is 0.1")
    model.add_argument("--use_ohem", action="store_true", help="online hard example mining cross-entropy")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute residual blocks in the backward pass (less memory, more time)")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--max_train_steps", type=int, default=60000, help="optimiser updates")
    optimisation.add_argument("--per_device_train_batch_size", type=int, default=8)
    optimisation.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optimisation.add_argument("--learning_rate", type=float, default=0.01, help="SGD, decayed by (1 - i/max)^0.9")
    optimisation.add_argument("--momentum", type=float, default=0.9)
    optimisation.add_argument("--weight_decay", type=float, default=1e-4)
    optimisation.add_argument("--poly_power", type=float, default=0.9)
    optimisation.add_argument("--seed", type=int, default=0)
    optimisation.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                              help="default: accelerate's configuration, else no")

    run = parser.add_argument_group("checkpoints, logging, evaluation")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--checkpointing_steps", type=int, help="save the accelerate state every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the last N checkpoints")
    run.add_argument("--resume_from_checkpoint", metavar="PATH|latest",
                     help="a checkpoint folder, or latest: the newest complete one in --output_dir (none: start)")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--with_tracking", action="store_true", help="log to the trackers of --report_to")
    run.add_argument("--report_to", default="tensorboard", help="accelerate tracker(s): tensorboard, wandb, all, ...")
    run.add_argument("--eval_steps", type=int, help="evaluate every N steps (always at the end)")
    run.add_argument("--per_device_eval_batch_size", type=int, default=1)
    run.add_argument("--eval_mode", choices=MODES, default="whole",
                     help="whole image, or sliding windows (Cityscapes: slide with --eval_crop_size 768 768)")
    run.add_argument("--eval_crop_size", type=int, nargs=2, default=(768, 768), metavar=("H", "W"))
    run.add_argument("--eval_stride", type=int, nargs=2, metavar=("H", "W"), help="default: 2/3 of the crop")
    run.add_argument("--max_eval_samples", type=int, help="evaluate on the first N images only")

    hub = parser.add_argument_group("publishing")
    hub.add_argument("--model_card_template", help="Jinja template (default: model_cards/ by configuration)")
    hub.add_argument("--push_to_hub", action="store_true", help="upload best/ and model/ to --hub_model_id")
    hub.add_argument("--hub_model_id", help="the Hub repository, e.g. you/pcaa-r50-cityscapes")
    hub.add_argument("--hub_token", help="default: the token saved by `hf auth login`")
    hub.add_argument("--push_checkpoints", action="store_true", help="also upload every checkpoint")
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, namespace = parse_args(argv)
    reuse_freed_cpu_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = TrainingArguments(**vars(namespace))
    except ValueError as error:
        parser.error(str(error))
    publisher = HubPublisher(args.hub_model_id, token=args.hub_token) if args.push_to_hub else None
    try:
        trainer = Trainer(args, publisher=publisher)
        if not trainer.accelerator.is_main_process:  # one copy of the log, from the main process
            logging.getLogger().setLevel(logging.WARNING)
        trainer.prepare()  # data, model, resume, model card template: where a wrong argument or file shows up
    except (OSError, ValueError, KeyError, StrictDataclassError) as error:  # CheckpointMismatchError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = trainer.train()
    if metrics is not None and trainer.accelerator.is_main_process:
        print(f"Final mIoU {float(metrics['mean_iou']):.4f} on {metrics['num_images']} images; model in "
              f"{args.output_dir}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
