#!/usr/bin/env python
"""Speed measurements for docs/benchmarks.md.

Sections:
  data    the training transform at Cityscapes resolution (2048x1024 frame -> 768x768 crop, every augmentation)
          against an OpenCV pipeline doing the same steps, on one core. Needs `pip install -e .[bench]` (OpenCV).
  metric  mean IoU of 40 ADE20K-sized maps (512x683, 150 classes): pcaa_hf.metrics.mean_iou against the per-image
          NumPy computation of evaluate's mean_iou, our evaluate module, and with --hub-mean-iou PATH (a copy of
          the Hub's evaluate-metric/mean_iou script) evaluate's own metric.
"""

import argparse
import json
import sys
from pathlib import Path

# This folder's evaluate.py would shadow the `evaluate` package, which the metric section loads.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

from pcaa_hf import PCAAImageProcessor
from pcaa_hf.benchmarking import benchmark_mean_iou, benchmark_train_transform, machine_description
from pcaa_hf.label_sets import CITYSCAPES_ID_TO_TRAIN_ID
from pcaa_hf.synthetic import street_scene


def data_section(repeats):
    try:
        import cv2
    except ImportError:
        sys.exit("The data benchmark compares with OpenCV: install it with `pip install -e .[bench]`.")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(4):
        image, label_ids = street_scene(2048, 1024, rng)
        train_ids = PCAAImageProcessor.apply_label_map(label_ids, CITYSCAPES_ID_TO_TRAIN_ID).astype(np.uint8)
        samples.append((image, train_ids))
    return benchmark_train_transform(samples, repeats=repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=["data", "metric"], default=["data", "metric"])
    parser.add_argument("--repeats", type=int, default=60, help="images per pipeline")
    parser.add_argument("--hub-mean-iou", help="metric section: path of the Hub's mean_iou.py, to time it too")
    parser.add_argument("--output", default="benchmark.json", help="JSON file for the figures")
    args = parser.parse_args(argv)

    results = {"machine": machine_description()}
    if "data" in args.sections:
        data = data_section(args.repeats)
        results["data"] = data
        print("Training transform, 2048x1024 -> 768x768 crop, all augmentations, 1 core (decoded images in):")
        print(f"  {'pipeline':<28}{'images/s':>10}")
        print(f"  {'pcaa_hf TrainTransform':<28}{data['pcaa_hf_images_per_second']:>10.1f}")
        print(f"  {'OpenCV ' + data['opencv_version']:<28}{data['opencv_images_per_second']:>10.1f}")
        print(f"  speed-up {data['speedup']:.2f}x")
    if "metric" in args.sections:
        metric = benchmark_mean_iou(hub_module_path=args.hub_mean_iou)
        results["metric"] = metric
        baseline = metric["pcaa_hf_seconds"]
        print(f"Mean IoU of {metric['maps']} maps of {metric['size'][0]}x{metric['size'][1]}, "
              f"{metric['num_labels']} classes (identical per-class IoU from all):")
        print(f"  {'implementation':<34}{'seconds':>9}{'vs pcaa_hf':>12}")
        for key, name in (("pcaa_hf_seconds", "pcaa_hf.metrics.mean_iou"),
                          ("per_image_numpy_seconds", "per-image NumPy (evaluate's steps)"),
                          ("pcaa_hf_evaluate_module_seconds", "evaluate.load(pcaa_hf module)"),
                          ("hub_evaluate_mean_iou_seconds", "evaluate.load(Hub mean_iou)")):
            if key in metric:
                print(f"  {name:<34}{metric[key]:>9.3f}{metric[key] / baseline:>11.1f}x")
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"Figures written to {args.output}")


if __name__ == "__main__":
    main()
