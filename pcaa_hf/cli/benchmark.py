"""Speed and memory measurements for docs/benchmarks.md.

Sections:
  limit   the machine's own limit: FLOP/s of the fastest large matrix product in each --dtypes (and TF32 on NVIDIA
          GPUs), by torch.mm or, on CPUs, by the library that runs the convolutions (oneDNN, as a 1x1 convolution),
          which the model section reports its FLOP/s against. Run whenever it is.
  model   forward (inference) and training-step (SGD, the paper's loss) throughput, FLOPs (torch's flop counter) and
          peak memory of the paper's model (output stride 8, one 4x4 PCAA module, 19 classes, random weights) for
          every combination of --tasks, --depths, --decode_head_types (PCAA and the baselines of the paper's Table 3
          on the same backbone), --sizes (square), --batch_sizes, --dtypes (bfloat16 = autocast), --channels_last,
          --checkpointing (training only) and --compile; with --original, the authors' PCAA model too (uncompiled
          cases; their training step with their loss and train.py's SGD parameter groups).
  runtimes
          our model beside the deployment runtimes on its export by transformers' exporters (pcaa_hf.benchmarks.
          runtimes): ONNX Runtime and OpenVINO on the CPU, float32 and bfloat16, and the int8 ONNX model, for every
          --depths, --sizes and --batch_sizes (or the model of --weights), same inputs, in alternation; int8 is
          calibrated on --calibration_data's training images when given (else random inputs: speed only).
  slide   sliding-window evaluation of a generated 1024x2048 Cityscapes-like frame (768x768 windows, stride 512,
          --window_batch_size per forward) against the sum of its windows' single forwards, and the share of pixels
          whose argmax under bfloat16 autocast equals float32's (where the device has bfloat16 arithmetic).
  data    the training transform at Cityscapes resolution (2048x1024 frame -> 768x768 crop, every augmentation)
          against an OpenCV pipeline doing the same steps, on one core. Needs `pip install -e .[bench]` (OpenCV).
  metric  mean IoU of 40 ADE20K-sized maps (512x683, 150 classes): pcaa_hf.evaluation.metrics.mean_iou against the
          per-image NumPy computation of evaluate's mean_iou, our evaluate module, and with --hub_mean_iou PATH (a
          copy of the Hub's evaluate-metric/mean_iou script) evaluate's own metric.

Every finished measurement is written to --output at once (atomically), so an interrupted run keeps its figures.
"""

import functools
import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pcaa_hf.benchmarks.measurements import benchmark_mean_iou, benchmark_train_transform, machine_description
from pcaa_hf.benchmarks.model_speed import (
    TASKS,
    authors_model_builder,
    benchmark_model_case,
    benchmark_sliding_window,
    bfloat16_agreement,
    bfloat16_unsupported,
    machine_limits,
    model_cases,
    paper_model,
    target_checks,
)
from pcaa_hf.benchmarks.runtimes import CONTENDERS, RUNTIME_PACKAGES, benchmark_runtimes, runtime_target_checks
from pcaa_hf.cli.arguments import ArgumentParser, positive_int
from pcaa_hf.data.builders import FOLDER_LAYOUTS
from pcaa_hf.data.label_sets import CITYSCAPES_ID_TO_TRAIN_ID
from pcaa_hf.data.synthetic import street_scene
from pcaa_hf.model.configuration_pcaa import BACKBONE_DEPTHS, DECODE_HEAD_TYPES
from pcaa_hf.model.image_processing_pcaa import PCAAImageProcessor
from pcaa_hf.model.modeling_pcaa import PCAAForSemanticSegmentation
from pcaa_hf.publishing.exporting import dataset_images
from pcaa_hf.utils.atomic_folders import write_json_atomically
from pcaa_hf.utils.process_settings import configure_cpu_process

SECTIONS = ("limit", "model", "runtimes", "slide", "data", "metric")
SWITCH = {"off": False, "on": True}
GIB = 2 ** 30


def cityscapes_frames(count, rng):
    """Generated 2048x1024 street scenes and their train-id label maps."""
    frames = []
    for _ in range(count):
        image, label_ids = street_scene(2048, 1024, rng)
        train_ids = PCAAImageProcessor.apply_label_map(label_ids, CITYSCAPES_ID_TO_TRAIN_ID)
        frames.append((image, train_ids.astype(np.uint8)))
    return frames


def data_section(repeats):
    try:
        import cv2
    except ImportError:
        sys.exit("The data benchmark compares with OpenCV: install it with `pip install -e .[bench]`.")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    data = benchmark_train_transform(cityscapes_frames(4, np.random.default_rng(0)), repeats=repeats)
    print("Training transform, 2048x1024 -> 768x768 crop, all augmentations, 1 core (decoded images in):")
    print(f"  {'pipeline':<28}{'images/s':>10}")
    print(f"  {'pcaa_hf TrainTransform':<28}{data['pcaa_hf_images_per_second']:>10.1f}")
    print(f"  {'OpenCV ' + data['opencv_version']:<28}{data['opencv_images_per_second']:>10.1f}")
    print(f"  speed-up {data['speedup']:.2f}x")
    return data


def metric_section(hub_mean_iou):
    metric = benchmark_mean_iou(hub_module_path=hub_mean_iou)
    baseline = metric["pcaa_hf_seconds"]
    print(f"Mean IoU of {metric['maps']} maps of {metric['size'][0]}x{metric['size'][1]}, "
          f"{metric['num_labels']} classes (identical per-class IoU from all):")
    print(f"  {'implementation':<34}{'seconds':>9}{'vs pcaa_hf':>12}")
    for key, name in (("pcaa_hf_seconds", "pcaa_hf.evaluation.metrics.mean_iou"),
                      ("per_image_numpy_seconds", "per-image NumPy (evaluate's steps)"),
                      ("pcaa_hf_evaluate_module_seconds", "evaluate.load(pcaa_hf module)"),
                      ("hub_evaluate_mean_iou_seconds", "evaluate.load(Hub mean_iou)")):
        if key in metric:
            print(f"  {name:<34}{metric[key]:>9.3f}{metric[key] / baseline:>11.1f}x")
    return metric


def limit_section(device, dtypes):
    limits = machine_limits(device, dtypes)
    print("Machine limit, the fastest large matrix product (torch.mm; on CPUs also the convolutions' library):")
    for name, limit in limits.items():
        kernels = ", ".join(f"{kernel} {max(by_size.values()) / 1e12:.3f}"
                            for kernel, by_size in limit["by_kernel"].items())
        print(f"  {name:<10}{limit['flop_per_second'] / 1e12:>9.3f} TFLOP/s  ({limit['kernel']} at size "
              f"{limit['size']}; best of each kernel: {kernels})")
    return limits


def format_fraction(fraction):
    return "" if fraction is None else f"{100 * fraction:.1f} %"


def format_memory(size):
    return "" if size is None else f"{size / GIB:.2f}"


def row_label(case, implementation):
    return ("authors' " if implementation == "authors" else "") + case.label()


def model_section(args, device, limits, results, save):
    cases = model_cases(args.tasks, args.depths, args.sizes, args.batch_sizes, args.dtypes, args.channels_last,
                        args.checkpointing, args.compile, args.cpu_fast_path, args.decode_head_types)
    print(f"Model, {len(cases)} cases ({args.calls} timed calls each, the fastest kept; fractions of the matmul limit "
          "re-read beside each case):")
    print(f"  {'case':<74}{'img/s':>8}{'GFLOP/img':>11}{'TFLOP/s':>9}{'of limit':>10}{'peak GiB':>10}")
    implementations = {"pcaa_hf": paper_model}
    if args.original:
        implementations["authors"] = authors_model_builder(args.original)
    rows = results.setdefault("model", [])
    for case in cases:
        builders, skipped = {}, {}
        for implementation, build_model in implementations.items():
            if implementation == "authors" and (case.compile or case.decode_head != "pcaa"):
                continue
            if implementation == "pcaa_hf":
                build_model = functools.partial(build_model, decode_head_type=case.decode_head)
            reason = bfloat16_unsupported(device) if case.dtype == "bfloat16" else None
            if implementation == "authors" and case.depth not in (50, 101):
                reason = "the authors' code builds ResNet-50 and ResNet-101 only"
            if implementation == "authors" and case.checkpointing:
                reason = "the authors' code has no activation checkpointing"
            if reason:
                skipped[implementation] = reason
            else:
                builders[implementation] = build_model
        measured = benchmark_model_case(case, device, limits, calls=args.calls, builders=builders) if builders else []
        for row in measured:
            rows.append(row)
            print(f"  {row_label(case, row['implementation']):<74}{row['images_per_second']:>8.2f}"
                  f"{row['flops'] / case.batch_size / 1e9:>11.1f}{row['flop_per_second'] / 1e12:>9.3f}"
                  f"{format_fraction(row['fraction_of_limit']):>10}{format_memory(row['peak_memory_bytes']):>10}",
                  flush=True)
        for implementation, reason in skipped.items():
            rows.append({**asdict(case), "implementation": implementation, "skipped": reason})
            print(f"  {row_label(case, implementation):<74}skipped: {reason}")
        save()


def contender_label(runtime, precision):
    return f"{runtime} {precision}"


def runtimes_section(args, results, save):
    unavailable = {runtime: [package for package in packages if importlib.util.find_spec(package) is None]
                   for runtime, packages in RUNTIME_PACKAGES.items()}
    contenders = [(runtime, precision) for runtime, precision in CONTENDERS
                  if contender_label(runtime, precision) in args.contenders]
    skipped = {contender: f"needs {', '.join(unavailable[contender[0]])}" for contender in contenders
               if unavailable[contender[0]]}
    no_bfloat16 = bfloat16_unsupported(torch.device("cpu"))
    if no_bfloat16:
        skipped.update({contender: no_bfloat16 for contender in contenders if contender[1] == "bfloat16"})
    contenders = [contender for contender in contenders if contender not in skipped]
    for contender, reason in skipped.items():
        print(f"  {contender_label(*contender)} skipped: {reason}")
    if args.weights:
        models = {args.weights: PCAAForSemanticSegmentation.from_pretrained(args.weights)}
    else:
        models = {f"paper R{depth}, random weights": paper_model(depth) for depth in args.depths}
    images = []
    if args.calibration_data:
        processor = PCAAImageProcessor.from_pretrained(args.weights) if args.weights else PCAAImageProcessor()
        images = dataset_images(args.dataset_type, args.calibration_data, processor,
                                train=args.calibration_images)["train"]
    rows = results.setdefault("runtimes", [])
    print(f"Deployment runtimes on the CPU ({args.calls} timed calls each, the fastest kept; agreement: share of "
          "pixels with our float32 model's class):")
    print(f"  {'model':<34}{'input':>14}  {'runtime':<22}{'img/s':>8}{'vs ours fp32':>14}{'agreement':>11}")
    for name, model in models.items():
        for size in args.sizes:
            # The training images at the exports' static input shape, batch_size of them per batch.
            resized = [F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
                       for image in images]
            for batch_size in args.batch_sizes:
                calibration = [torch.cat([resized[(start + offset) % len(resized)] for offset in range(batch_size)])
                               for start in range(0, len(resized), batch_size)] or None
                measured = benchmark_runtimes(model, size, batch_size, contenders, calibration, calls=args.calls)
                for row in measured:
                    row.update(model=name, depth=model.config.backbone_depth)
                    rows.append(row)
                    print(f"  {name:<34}{f'{batch_size}x3x{size}x{size}':>14}  "
                          f"{contender_label(row['runtime'], row['precision']):<22}{row['images_per_second']:>8.2f}"
                          f"{row['speed_vs_pcaa_hf_float32']:>13.2f}x{100 * row['argmax_agreement']:>10.2f}%",
                          flush=True)
                save()


def slide_section(args, device, results, save):
    if args.weights:
        model = PCAAForSemanticSegmentation.from_pretrained(args.weights)
        name = args.weights
    else:
        model = paper_model(args.slide_depth)
        name = f"paper R{args.slide_depth}, random weights"
    model.to(device).eval()
    image, _ = cityscapes_frames(1, np.random.default_rng(1))[0]
    processor = PCAAImageProcessor(do_resize=False)
    frame = processor(image, return_tensors="pt")["pixel_values"].to(device)
    slide = benchmark_sliding_window(model, device, frame, window_batch_size=args.window_batch_size, calls=args.calls)
    slide["model"] = name
    results["slide"] = slide
    save()
    print(f"Sliding-window evaluation of a {slide['frame'][0]}x{slide['frame'][1]} frame, {name}:")
    print(f"  {slide['windows']} windows of {slide['crop_size']}x{slide['crop_size']}, "
          f"{slide['window_batch_size']} per forward: {slide['slide_seconds']:.3f} s; the windows' single forwards "
          f"sum to {slide['sum_of_window_forwards_seconds']:.3f} s "
          f"(ratio {slide['slide_seconds'] / slide['sum_of_window_forwards_seconds']:.3f})")
    unsupported = bfloat16_unsupported(device)
    if unsupported:
        slide["bfloat16_argmax_agreement"] = None
        slide["bfloat16_skipped"] = unsupported
        print(f"  bfloat16 agreement skipped: {unsupported}")
    else:
        slide["bfloat16_argmax_agreement"] = bfloat16_agreement(model, device, frame)
        print(f"  bfloat16 autocast gives float32's argmax on {100 * slide['bfloat16_argmax_agreement']:.3f} % of "
              "the pixels")
    save()


def main(argv=None):
    freed_cpu_memory_reused = configure_cpu_process()
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="model, limit and slide sections (default: cuda when available, else cpu)")
    parser.add_argument("--output", default="benchmark.json", help="JSON file for the figures")
    parser.add_argument("--calls", type=positive_int, default=3, help="timed calls per measurement (fastest kept)")
    model = parser.add_argument_group("model section")
    model.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    model.add_argument("--depths", nargs="+", type=int, choices=BACKBONE_DEPTHS, default=[50, 101])
    model.add_argument("--sizes", nargs="+", type=positive_int, default=[512, 768])
    model.add_argument("--batch_sizes", nargs="+", type=positive_int, default=[1, 2])
    model.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    model.add_argument("--channels_last", nargs="+", choices=SWITCH, default=["off", "on"])
    model.add_argument("--decode_head_types", nargs="+", choices=DECODE_HEAD_TYPES, default=["pcaa"],
                       help="the decode heads to measure on the same backbone and inputs: pcaa and the baselines of "
                            "the paper's Table 3 (the authors' model is timed for pcaa only)")
    model.add_argument("--cpu_fast_path", nargs="+", choices=SWITCH, default=["on"],
                       help="PCAA's CPU inference fast path (pcaa_hf.cpu_fast_paths); off on: an A/B of it")
    model.add_argument("--checkpointing", nargs="+", choices=SWITCH, default=["off", "on"],
                       help="activation checkpointing of the backbone blocks (training cases)")
    model.add_argument("--compile", nargs="+", choices=SWITCH, default=["off"], help="torch.compile the model")
    model.add_argument("--original", type=Path,
                       help="a checkout of GitHub lsa1997/PCAA: time the authors' model too (uncompiled cases)")
    runtimes = parser.add_argument_group("runtimes section")
    labels = [contender_label(*contender) for contender in CONTENDERS]
    runtimes.add_argument("--contenders", nargs="+", choices=labels, default=labels,
                          help="what runs the model (default: all; those whose package is missing are skipped)")
    runtimes.add_argument("--calibration_data", help="a data set folder whose training images calibrate int8")
    runtimes.add_argument("--dataset_type", choices=FOLDER_LAYOUTS, default="cityscapes",
                          help="the layout of --calibration_data")
    runtimes.add_argument("--calibration_images", type=positive_int, default=8)
    slide = parser.add_argument_group("slide section")
    slide.add_argument("--slide_depth", type=int, choices=BACKBONE_DEPTHS, default=101)
    slide.add_argument("--weights", help="a saved PCAA folder to use instead of the random paper model (runtimes "
                                         "and slide sections)")
    slide.add_argument("--window_batch_size", type=positive_int, default=4)
    other = parser.add_argument_group("data and metric sections")
    other.add_argument("--repeats", type=positive_int, default=60, help="data section: images per pipeline")
    other.add_argument("--hub_mean_iou", help="metric section: path of the Hub's mean_iou.py, to time it too")
    args = parser.parse_args(argv)
    args.channels_last = [SWITCH[value] for value in args.channels_last]
    args.cpu_fast_path = [SWITCH[value] for value in args.cpu_fast_path]
    args.checkpointing = [SWITCH[value] for value in args.checkpointing]
    args.compile = [SWITCH[value] for value in args.compile]
    if "runtimes" in args.sections and contender_label("pcaa_hf", "float32") not in args.contenders:
        parser.error("--contenders must include 'pcaa_hf float32', which every runtime is compared with")
    if args.original and not (args.original / "networks" / "caanet.py").is_file():
        parser.error(f"--original {args.original}: not a checkout of lsa1997/PCAA (networks/caanet.py is missing)")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every case has fixed shapes (as mmsegmentation trains)

    results = {"machine": machine_description(device), "arguments": sys.argv[1:] if argv is None else list(argv)}
    results["machine"]["freed_cpu_memory_reused"] = freed_cpu_memory_reused

    def save():
        write_json_atomically(args.output, results)

    if {"limit", "model"} & set(args.sections):
        results["limits"] = limit_section(device, args.dtypes)
        save()
    if "model" in args.sections:
        model_section(args, device, results["limits"], results, save)
    if "runtimes" in args.sections:
        runtimes_section(args, results, save)
    if "slide" in args.sections:
        slide_section(args, device, results, save)
    checks = target_checks(results) + runtime_target_checks(results.get("runtimes", []))
    if checks:
        results["targets"] = [{"target": target, "measured": figure, "met": met} for target, figure, met in checks]
        save()
        print("Targets:")
        for target, figure, met in checks:
            print(f"  {'met' if met else 'NOT MET':<8}{target}: {figure}")
    if "data" in args.sections:
        results["data"] = data_section(args.repeats)
        save()
    if "metric" in args.sections:
        results["metric"] = metric_section(args.hub_mean_iou)
        save()
    print(f"Figures written to {args.output}")


if __name__ == "__main__":
    main()
