#!/usr/bin/env python
"""Speed measurements for docs/benchmarks.md. Section "data": the training transform at Cityscapes resolution
(2048x1024 frame -> 768x768 crop, every augmentation) against an OpenCV pipeline doing the same steps, on one core.
Needs `pip install -e .[bench]` (OpenCV, for the comparison only)."""

import argparse
import json
import sys

import numpy as np
import torch

from pcaa_hf import PCAAImageProcessor
from pcaa_hf.benchmarking import benchmark_train_transform, machine_description
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
    parser.add_argument("--sections", nargs="+", choices=["data"], default=["data"])
    parser.add_argument("--repeats", type=int, default=60, help="images per pipeline")
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
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"Figures written to {args.output}")


if __name__ == "__main__":
    main()
