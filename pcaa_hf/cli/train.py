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

Every option is a field of pcaa_hf.training.arguments.TrainingArguments, spelled as below (snake_case; the kebab-case
spelling, --output-dir, is accepted too). Recipe files: one option and its values a line, `#` starts a comment.
"""

import logging
import sys

from pcaa_hf.cli.arguments import ArgumentParser, region_grid, reports_errors
from pcaa_hf.publishing.hub import HubPublisher
from pcaa_hf.training.arguments import TrainingArguments
from pcaa_hf.training.trainer import OtherProcessFailedError, Trainer, TrainingDivergedError
from pcaa_hf.utils.process_settings import configure_cpu_process


def build_parser():
    """The options are the fields of `TrainingArguments`, with their defaults and help."""
    return ArgumentParser(TrainingArguments, types={"bins": region_grid}, description=__doc__,
                          fromfile_prefix_chars="@")


@reports_errors(also=(TrainingDivergedError, OtherProcessFailedError))  # the run's failures, not a bug's
def main(argv=None):
    (args,) = build_parser().parse_into_dataclasses(argv)
    configure_cpu_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    publisher = HubPublisher(args.hub_model_id, token=args.hub_token) if args.push_to_hub else None
    trainer = Trainer(args, publisher=publisher)
    if not trainer.accelerator.is_main_process:  # one copy of the log, from the main process
        logging.getLogger().setLevel(logging.WARNING)
    metrics = trainer.train()
    if metrics is not None and trainer.accelerator.is_main_process:
        print(f"Final mIoU {float(metrics['mean_iou']):.4f} on {metrics['num_images']} images; model in "
              f"{args.output_dir}/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
