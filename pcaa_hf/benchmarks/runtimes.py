"""
Our model beside the deployment runtimes, on the export that transformers' exporters make of it (`OnnxExporter`,
`OpenVINOExporter`, through pcaa_hf.publishing.exporting): ONNX Runtime and OpenVINO on the CPU in float32, OpenVINO in
bfloat16 where the CPU has bfloat16 instructions (its inference precision hint), and the int8 ONNX model of
`int8_quantizer` run by ONNX Runtime. All run the same inputs, timed call by call in alternation with our eager model
(float32, and bfloat16 autocast), and their logits are compared with our float32 ones.
"""

import math
import tempfile
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from pcaa_hf.publishing.exporting import (
    OPENVINO_FLOAT32,
    REQUIRED_PACKAGES,
    argmax_agreement,
    export_model,
    export_to_folder,
    int8_quantizer,
    load_exported,
)

from .measurements import best_seconds

# What each contender is, in the order they are timed: (runtime, precision).
CONTENDERS = (("pcaa_hf", "float32"), ("pcaa_hf", "bfloat16"), ("onnxruntime", "float32"), ("openvino", "float32"),
              ("openvino", "bfloat16"), ("onnxruntime", "int8"))
RUNTIME_PACKAGES = {"pcaa_hf": (), "onnxruntime": REQUIRED_PACKAGES["onnx"], "openvino": REQUIRED_PACKAGES["openvino"]}
OPENVINO_BFLOAT16 = {"INFERENCE_PRECISION_HINT": "bf16"}


def eager_forward(model, bfloat16=False):
    """Our model's logits, in eval mode under `torch.inference_mode` (and bfloat16 autocast)."""
    model.eval()

    def forward(pixel_values):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bfloat16 else nullcontext()
        with torch.inference_mode(), autocast:
            return model(pixel_values).logits

    return forward


def runtime_contenders(model, size, batch_size, workdir, calibration_images, contenders):
    """
    {(runtime, precision): function(pixel_values) -> logits} for each of `contenders` (pairs of `CONTENDERS`): exports
    of `model` for (batch_size, 3, size, size) inputs, static, written under `workdir`; the int8 model calibrated on
    `calibration_images`.
    """
    functions = {}
    for runtime, precision in contenders:
        if runtime == "pcaa_hf":
            functions[runtime, precision] = eager_forward(model, bfloat16=precision == "bfloat16")
    static = dict(dynamic=False, example_size=(size, size), batch_size=batch_size)
    if ("onnxruntime", "float32") in contenders:
        functions["onnxruntime", "float32"] = exported_logits(export_model(model, "onnx", **static))
    if ("onnxruntime", "int8") in contenders:
        quantized = export_model(model, "onnx", quantizer=int8_quantizer(calibration_images), **static)
        functions["onnxruntime", "int8"] = exported_logits(quantized)
    openvino = [precision for runtime, precision in contenders if runtime == "openvino"]
    if openvino:
        folder = Path(workdir) / "openvino"
        export_to_folder(model, folder, "openvino", check_shapes=[(batch_size, size, size)], tolerance=1e-3,
                         overwrite=True, **static)
        for precision in openvino:
            config = OPENVINO_FLOAT32 if precision == "float32" else OPENVINO_BFLOAT16
            functions["openvino", precision] = exported_logits(load_exported(folder, config=dict(config)))
    return functions


def exported_logits(exported):
    """An export's logits, called as `eager_forward`'s function is."""
    return lambda pixel_values: exported(pixel_values=pixel_values).logits


def benchmark_runtimes(model, size, batch_size, contenders, calibration_images=None, calls=3, seed=0):
    """
    Time each of `contenders` on the same random (batch_size, 3, size, size) input: a first call (not timed) gives
    its logits, compared with our float32 model's (max |difference|, share of pixels with the same class), then
    `calls` rounds time one call of each in turn; the fastest call is kept. `calibration_images` (default: 4 random
    inputs of that shape) calibrate the int8 model. Returns one row per contender.
    """
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    if calibration_images is None:
        calibration_images = [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(4)]
    with tempfile.TemporaryDirectory() as workdir:
        functions = runtime_contenders(model, size, batch_size, workdir, calibration_images, contenders)
        reference = eager_forward(model)(pixel_values).float()
        rows = {}
        for (runtime, precision), function in functions.items():
            logits = function(pixel_values).float()
            rows[runtime, precision] = {
                "runtime": runtime, "precision": precision, "size": size, "batch_size": batch_size,
                "seconds": math.inf, "max_abs_difference": (logits - reference).abs().max().item(),
                "argmax_agreement": argmax_agreement(logits, reference)}
        for _ in range(calls):
            for key, function in functions.items():
                rows[key]["seconds"] = min(rows[key]["seconds"], best_seconds(partial(function, pixel_values), 1))
    baseline = rows["pcaa_hf", "float32"]["seconds"]
    for row in rows.values():
        row["images_per_second"] = batch_size / row["seconds"]
        row["speed_vs_pcaa_hf_float32"] = baseline / row["seconds"]
    return [rows[contender] for contender in CONTENDERS if contender in rows]


def runtime_target_checks(rows):
    """(target, figure, met) rows for the runtimes measured: ours at least as fast as each runtime, int8's speed-up."""
    checks = []
    by_case = {}
    for row in rows:
        by_case.setdefault((row.get("depth"), row["size"], row["batch_size"]), {})[
            row["runtime"], row["precision"]] = row
    for runtime, precision in CONTENDERS:
        if runtime == "pcaa_hf" or precision == "int8":
            continue
        ratios = [case[runtime, precision]["seconds"] / case["pcaa_hf", precision]["seconds"]
                  for case in by_case.values() if (runtime, precision) in case and ("pcaa_hf", precision) in case]
        if ratios:
            checks.append((f"pcaa_hf {precision} inference at least as fast as {runtime} {precision} (every case)",
                           f"{min(ratios):.2f}x - {max(ratios):.2f}x its speed", min(ratios) >= 1))
    int8 = [case["onnxruntime", "int8"] for case in by_case.values() if ("onnxruntime", "int8") in case]
    if int8:
        speedups = [row["speed_vs_pcaa_hf_float32"] for row in int8]
        checks.append(("int8 inference on ONNX Runtime >= 2x pcaa_hf float32 (every case)",
                       f"{min(speedups):.2f}x - {max(speedups):.2f}x", min(speedups) >= 2))
    return checks


__all__ = ["CONTENDERS", "RUNTIME_PACKAGES", "benchmark_runtimes", "runtime_contenders", "runtime_target_checks"]
