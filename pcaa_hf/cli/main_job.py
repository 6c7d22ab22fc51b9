"""The project's main job, end to end on this machine's CPU with no arguments: generate a Cityscapes-layout data set,
train a small PCAA on it, evaluate it, and export a Hub-ready folder with its model card.

The model is the paper's architecture made small enough for minutes on a 2-core CPU: ResNet-18 depth, output stride
16 (the paper's models use 8) and a 128-channel head, trained from scratch on 128x128 crops of 256x128 frames.

Every step is the real one (the data set goes through `build_cityscapes`, training through
`pcaa_hf.training.trainer`, with checkpoints; a killed run continues from its last checkpoint when started again).
Options change the defaults; `pcaa-train --help` has the full set for real data.
"""

import logging
import sys
import time

from pcaa_hf.cli.arguments import ArgumentParser, non_negative_int, output_folder, positive_int, reports_errors
from pcaa_hf.data.synthetic import write_cityscapes_tree
from pcaa_hf.training.arguments import TrainingArguments
from pcaa_hf.training.trainer import Trainer
from pcaa_hf.utils.process_settings import configure_cpu_process

logger = logging.getLogger("main_job")


@reports_errors
def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", type=output_folder, default="runs/main_job",
                        help="data, checkpoints and exports go here")
    parser.add_argument("--num_train", type=positive_int, default=96, help="generated training frames")
    parser.add_argument("--num_val", type=positive_int, default=24, help="generated validation frames")
    parser.add_argument("--max_train_steps", type=positive_int, default=900)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--mixed_precision", choices=("no", "bf16"),
                        help="autocast precision of training and evaluation (default: accelerate's configuration, "
                             "else no; bf16 on CPUs with bfloat16 instructions and on GPUs)")
    options = parser.parse_args(argv)
    configure_cpu_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()

    output = options.output_dir
    data = output / "data"
    if not (data / "gtFine").is_dir():  # leftImg8bit/ alone is what an interrupted generation left: replaced
        counts = write_cityscapes_tree(data, options.num_train, options.num_val, size=(256, 128), seed=options.seed,
                                       overwrite=True)
        logger.info("Generated a Cityscapes-layout data set in %s: %s frames of 256x128", data, counts)
    args = TrainingArguments(
        output_dir=str(output), dataset_type="cityscapes", data=str(data),
        backbone_depth=18, output_stride=16, hidden_size=128, auxiliary_hidden_size=64,
        base_size=(256, 128), crop_size=(128, 128), num_workers=1,
        max_train_steps=options.max_train_steps, per_device_train_batch_size=8, learning_rate=0.02,
        seed=options.seed, checkpointing_steps=100, checkpoints_total_limit=1, resume_from_checkpoint="latest",
        logging_steps=25, eval_steps=300, mixed_precision=options.mixed_precision,
    )
    metrics = Trainer(args).train()
    minutes = (time.perf_counter() - start) / 60
    print(f"\nMain job done in {minutes:.1f} min: validation mIoU {float(metrics['mean_iou']):.4f} "
          f"(aAcc {float(metrics['overall_accuracy']):.4f}, mAcc {float(metrics['mean_accuracy']):.4f}) on "
          f"{metrics['num_images']} generated frames.")
    print(f"Exported model: {output / 'model'} (model card: {output / 'model' / 'README.md'})")
    print(f"Best model by mIoU: {output / 'best'}; checkpoints: {output / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
