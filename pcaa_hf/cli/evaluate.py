r"""Evaluate a PCAA model (a saved folder or a Hub id) on a data set split: per-class IoU and accuracy, aAcc, mIoU,
mAcc, a JSON results file, and optionally the predictions as PNGs.

Examples:
    # Cityscapes val, the paper's sliding window (768 crop, overlap 1/3) at full 1024x2048 resolution
    python scripts/evaluate.py --model pcaa-r50-cityscapes --dataset cityscapes --data /data/cityscapes \
        --output_dir eval-cs --save_predictions --cityscapes_test_format
    # ADE20K val, whole image, with the paper's multi-scale + flip test
    python scripts/evaluate.py --model pcaa-r101-ade20k --dataset ade20k --data /data/ADEChallengeData2016 \
        --scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip --output_dir eval-ade
    # several processes or GPUs: each scores its share of the split, the results are summed
    accelerate launch --num_processes 2 scripts/evaluate.py --model ... --dataset ... --data ...
    # an export of scripts/export.py (ONNX, OpenVINO, an int8 ONNX model), run by its runtime on the CPU
    python scripts/evaluate.py --model pcaa-r50-cityscapes-int8 --dataset cityscapes --data /data/cityscapes

Images are prepared by the model folder's image processor (e.g. ADE20K's keep-ratio resize to 2048x512) and
predicted at their own size; predictions are scored at the label's original resolution. mIoU follows `evaluate`'s
`mean_iou` (classes absent from predictions and labels are left out); the authors' convention (absent = 0) is
reported beside it.
"""

import logging
import sys
import time
from pathlib import Path

from accelerate import Accelerator

import pcaa_hf  # noqa: F401  (registers PCAA with the Auto classes)
from pcaa_hf.cli.arguments import (
    ArgumentParser,
    image_scale,
    non_negative_int,
    output_folder,
    positive_int,
    reports_errors,
)
from pcaa_hf.data.builders import label_names, open_dataset, select_split
from pcaa_hf.data.label_sets import IGNORE_INDEX
from pcaa_hf.data.transforms import EvalTransform
from pcaa_hf.evaluation.prediction_files import PredictionWriter, read_label_map
from pcaa_hf.evaluation.scoring import evaluate_segmentation, metrics_to_json, results_table
from pcaa_hf.inference.model_folders import load_saved_image_processor, load_saved_model
from pcaa_hf.inference.segmentation_inference import MODES, SegmentationInference
from pcaa_hf.publishing.exporting import is_export_folder, load_exported
from pcaa_hf.utils.atomic_folders import write_json_atomically
from pcaa_hf.utils.process_settings import check_mixed_precision, configure_cpu_process, end_processes

logger = logging.getLogger("evaluate")

# The paper's evaluation per data set: Cityscapes by 768x768 sliding windows, ADE20K whole images.
DEFAULT_MODES = {"cityscapes": "slide", "ade20k": "whole", "datasets": "whole"}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True,
                        help="a save_pretrained folder, a Hub model id or a folder of scripts/export.py")
    parser.add_argument("--dataset", required=True, choices=sorted(DEFAULT_MODES),
                        help="cityscapes / ade20k: the data set's own folder layout; datasets: a save_to_disk folder "
                             "or anything datasets.load_dataset reads, with image and label columns")
    parser.add_argument("--data", required=True, help="the data set's root folder, save_to_disk folder or name")
    parser.add_argument("--split", default="validation", help="split to evaluate (default: validation)")
    parser.add_argument("--image_column", default="image", help="--dataset datasets: the image column")
    parser.add_argument("--label_column", default="label", help="--dataset datasets: the label column")
    parser.add_argument("--reduce_labels", action="store_true",
                        help="--dataset datasets: the labels are raw ADE20K-style values (0 ignored, v -> v - 1)")
    parser.add_argument("--label_map", type=Path,
                        help="--dataset datasets: a JSON file {raw value: train id} applied to the labels first "
                             "(e.g. Cityscapes label ids; unmapped values are kept)")
    parser.add_argument("--mode", choices=MODES,
                        help="whole image or sliding window (default: slide for cityscapes, whole otherwise)")
    parser.add_argument("--crop_size", type=positive_int, nargs=2, default=(768, 768), metavar=("H", "W"),
                        help="sliding window size (default: 768 768)")
    parser.add_argument("--stride", type=positive_int, nargs=2, metavar=("H", "W"),
                        help="sliding window stride (default: 2/3 of the crop, the paper's overlap of 1/3)")
    parser.add_argument("--scales", type=image_scale, nargs="+", default=[1.0],
                        help="input scales whose logits are averaged (the paper's multi-scale test: 0.5 0.75 1.0 "
                             "1.25 1.5 1.75)")
    parser.add_argument("--flip", action="store_true", help="also average the logits of flipped inputs")
    parser.add_argument("--window_batch_size", type=positive_int, default=4,
                        help="sliding windows per forward (default: 4)")
    parser.add_argument("--batch_size", type=positive_int, default=1,
                        help="images per batch per process; images of different sizes are predicted separately")
    parser.add_argument("--num_workers", type=non_negative_int, default=2, help="data loading workers per process")
    parser.add_argument("--max_samples", type=positive_int, help="evaluate only the first N images of the split")
    parser.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"),
                        help="autocast precision (default: accelerate's configuration, else no)")
    parser.add_argument("--output_dir", type=output_folder, default="evaluation",
                        help="where results.json and PNGs go")
    parser.add_argument("--save_predictions", action="store_true",
                        help="write each prediction as a PNG in the data set's palette (predictions/)")
    parser.add_argument("--cityscapes_test_format", action="store_true",
                        help="write each prediction as Cityscapes label ids, the test server's format "
                             "(cityscapes_label_ids/)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow running the code files of a Hub model that is not PCAA from this package")
    args = parser.parse_args(argv)
    args.mode = args.mode or DEFAULT_MODES[args.dataset]
    if (args.reduce_labels or args.label_map) and args.dataset != "datasets":
        parser.error("--reduce_labels and --label_map apply to --dataset datasets (the builders convert labels)")
    return args


def open_split(args, id2label):
    splits = open_dataset(args.dataset, args.data, image_column=args.image_column, label_column=args.label_column,
                          id2label=id2label, reduce_labels=args.reduce_labels,
                          label_map=read_label_map(args.label_map) if args.label_map else None)
    return select_split(splits, args.split, args.data, args.max_samples)


@reports_errors
def main(argv=None):
    args = parse_args(argv)
    configure_cpu_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exported = is_export_folder(args.model)
    if exported and args.mixed_precision not in (None, "no"):
        raise ValueError(f"--model {args.model} is an export, which runs in its own precision: leave out "
                         "--mixed_precision.")
    # An export runs on the CPU (its runtime's), whatever devices the machine has.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=exported)
    check_mixed_precision(accelerator)
    inference = SegmentationInference(args.mode, tuple(args.crop_size), args.stride and tuple(args.stride),
                                      tuple(args.scales), args.flip, args.window_batch_size)
    if exported:
        model = load_exported(args.model, trust_remote_code=args.trust_remote_code)
    else:
        model = load_saved_model(args.model, trust_remote_code=args.trust_remote_code)
    processor = load_saved_image_processor(args.model, trust_remote_code=args.trust_remote_code)
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    if args.dataset == "datasets" and not (args.reduce_labels or args.label_map) and (
            processor.do_reduce_labels or processor.label_map):
        logger.warning("The model's image processor converts raw labels (reduce_labels=%s, label_map=%s); this "
                       "data set's labels are scored as they are. Pass --reduce_labels or --label_map if they "
                       "are raw.", processor.do_reduce_labels, bool(processor.label_map))
    split = open_split(args, id2label)
    split_labels = label_names(split)
    if len(split_labels) != len(id2label):
        raise ValueError(f"The model predicts {len(id2label)} classes but {args.data} has {len(split_labels)}.")
    writer = None
    if args.save_predictions or args.cityscapes_test_format:
        writer = PredictionWriter(args.output_dir, split, split_labels, palette=args.save_predictions,
                                  cityscapes_label_ids=args.cityscapes_test_format)

    args.output_dir.mkdir(parents=True, exist_ok=True)  # before the work whose results go there
    if not exported:
        model.to(accelerator.device)
    logger.info("Evaluating %s on %s (%s, %d images) with %s, %d process(es)", args.model, args.data, args.split,
                len(split), inference, accelerator.num_processes)
    start = time.perf_counter()
    # Invalid label values and unreadable images are ValueErrors naming the image: one `error:` line.
    metrics = evaluate_segmentation(
        model, split.with_transform(EvalTransform(image_processor=processor)), len(id2label), inference,
        accelerator=accelerator, batch_size=args.batch_size, num_workers=args.num_workers,
        ignore_index=IGNORE_INDEX, on_prediction=writer,
    )
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        results = {"model": args.model, "dataset": args.dataset, "data": args.data, "split": args.split,
                   "inference": inference.to_dict(), "processes": accelerator.num_processes,
                   "seconds": round(seconds, 3), **metrics_to_json(metrics, split_labels)}
        write_json_atomically(args.output_dir / "results.json", results)
        print(results_table(metrics, split_labels))
        print(f"{metrics['num_images']} images in {seconds:.1f} s; results in {args.output_dir / 'results.json'}")
    end_processes(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
