"""
Export PCAA models for deployment with transformers' exporters (`transformers.exporters`, transformers >= 5.25).

Formats: "dynamo" (a `torch.export` program, `model.pt2`), "onnx" (`model.onnx` with its weights in
`model.onnx.data`, run with ONNX Runtime) and "openvino" (`openvino_model.xml` / `.bin`). With `dynamic=True` the batch
size, height and width stay symbolic: one export serves every input size whose feature map is at least 2x2 (inputs
larger than the backbone's output stride: 8 pixels for the paper's backbone, 32 for transformers' ResNet).

An export folder holds the program, `export.json` (what was traced, how), `config.json` (with `configuration_pcaa.py`)
and, when the model folder has one, the image processor. Load it with `load_exported` (or
`transformers.exporters.ExportedModel.from_pretrained`) and call it like the model:

```python
>>> from pcaa_hf.publishing.exporting import export_to_folder, load_exported
>>> report = export_to_folder("pcaa-r50-cityscapes", "pcaa-r50-cityscapes-onnx", format="onnx")
>>> exported = load_exported("pcaa-r50-cityscapes-onnx")
>>> exported(pixel_values=pixel_values).logits  # (batch, num_labels, height / 8, width / 8)
```
"""

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcaa_hf.data.builders import open_dataset, select_split
from pcaa_hf.data.transforms import EvalTransform
from pcaa_hf.inference.model_folders import load_saved_image_processor, load_saved_model
from pcaa_hf.utils.atomic_folders import write_folder_atomically
from pcaa_hf.utils.signal_stack import keep_signal_stack

EXPORT_FORMATS = ("dynamo", "onnx", "openvino")
# The packages each format needs to export and run, beyond torch and transformers.
REQUIRED_PACKAGES = {"dynamo": (), "onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("openvino",)}
DEFAULT_EXAMPLE_SIZE = (256, 256)
# OpenVINO's CPU plugin infers float32 models in bfloat16 on CPUs that support it (max |difference| 4e-3 on logits of
# about 0.6 in the tests), and openvino 2026.4 does not apply the float32 precision that transformers records in the
# exported model: float32 exports run with this compile property unless the caller passes another.
OPENVINO_FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32"}
# What every export folder holds (transformers writes it): what was traced, how.
EXPORT_MANIFEST = "export.json"


def check_format(format):
    """Raise a ValueError for an unknown `format`, an ImportError when a package it needs is missing."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(EXPORT_FORMATS)}; got {format!r}.")
    if importlib.util.find_spec("transformers.exporters") is None:
        raise ImportError("Exporting needs transformers >= 5.25 (transformers.exporters): pip install -U transformers")
    missing = [package for package in REQUIRED_PACKAGES[format] if importlib.util.find_spec(package) is None]
    if missing:
        raise ImportError(f"`format={format!r}` needs {', '.join(missing)}, which is not installed: "
                          f"pip install {' '.join(missing)}")


def export_config(format, dynamic=True, **options):
    """
    The transformers export config of `format`. `dynamic=True` makes the batch size, height and width of
    `pixel_values` symbolic (`Dim.AUTO`), its channels fixed; `options` go to the config (e.g. `opset_version`).
    """
    check_format(format)
    from transformers.exporters import DynamoConfig, OnnxConfig, OpenVINOConfig

    config_class = {"dynamo": DynamoConfig, "onnx": OnnxConfig, "openvino": OpenVINOConfig}[format]
    if dynamic and options.get("dynamic_shapes") is None:
        automatic = torch.export.Dim.AUTO
        options["dynamic_shapes"] = {"pixel_values": {0: automatic, 2: automatic, 3: automatic}}
    return config_class(dynamic=dynamic, **options)


def check_pcaa_model(model, name="model"):
    # By model_type, not isinstance: a model loaded with trust_remote_code has its own copy of the class.
    if not isinstance(model, torch.nn.Module) or getattr(getattr(model, "config", None), "model_type", None) != "pcaa":
        raise TypeError(f"`{name}` must be a PCAA model (PCAAForSemanticSegmentation) or the path of its folder; got "
                        f"{type(model).__name__}.")


def input_channels(model):
    backbone_config = model.config.backbone_config
    return model.config.num_channels if backbone_config is None else backbone_config.num_channels


def example_inputs(model, size, batch_size, seed=0):
    """Normal random `pixel_values` of `batch_size` x channels x `size`, in the model's dtype and on its device."""
    height, width = size
    if not all(isinstance(value, int) and value > 0 for value in (height, width, batch_size)):
        raise ValueError(f"`example_size` and `batch_size` must be positive integers; got {size} and {batch_size}.")
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, input_channels(model), height, width, generator=generator)
    return {"pixel_values": pixel_values.to(device=model.device, dtype=model.dtype)}


def export_model(model, format="onnx", dynamic=True, example_size=DEFAULT_EXAMPLE_SIZE, batch_size=None, **options):
    """
    Export a PCAA model (put in eval mode) with transformers' exporter of `format`, traced on random `pixel_values`
    of `batch_size` (default 2 when dynamic, else 1) x channels x `example_size`. Returns the
    `transformers.exporters.ExportedModel`; `options` go to the export config (see `export_config`).
    """
    check_pcaa_model(model)
    config = export_config(format, dynamic, **options)
    if batch_size is None:
        batch_size = 2 if dynamic else 1
    if dynamic and batch_size == 1:
        raise ValueError("`batch_size` must be at least 2 with `dynamic=True`: torch.export fixes an axis traced at "
                         "size 1.")
    from transformers.exporters import AutoHfExporter

    inputs = example_inputs(model, tuple(example_size), batch_size)
    model.eval()
    with keep_signal_stack():  # OpenVINO compiles the exported model (pcaa_hf.utils.signal_stack)
        return AutoHfExporter.from_config(config).export(model, inputs, config)


def is_export_folder(folder):
    """Whether `folder` holds an export (its EXPORT_MANIFEST), rather than a model folder."""
    return (Path(folder) / EXPORT_MANIFEST).is_file()


def load_exported(folder, device=None, trust_remote_code=False, **runner_kwargs):
    """
    `ExportedModel.from_pretrained(folder, ...)`, ready to run. `trust_remote_code` is needed for "dynamo" exports
    (loading a `.pt2` unpickles it) and, without pcaa_hf installed, for the config's code. A float32 OpenVINO export
    runs in float32 (`OPENVINO_FLOAT32`) unless `runner_kwargs` has a `config` of its own.
    """
    folder = Path(folder)
    if not is_export_folder(folder):
        raise FileNotFoundError(f"`folder` {folder} holds no export (no {EXPORT_MANIFEST}).")
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    check_format(manifest["export_format"])
    from transformers.exporters import ExportedModel

    if manifest["export_format"] == "openvino" and "config" not in runner_kwargs:
        dtypes = {component["metadata"].get("export_dtype") for component in manifest["components"].values()}
        if dtypes == {"float32"}:
            runner_kwargs["config"] = dict(OPENVINO_FLOAT32)
    with keep_signal_stack():  # OpenVINO compiles the model here (pcaa_hf.utils.signal_stack)
        return ExportedModel.from_pretrained(folder, device=device, trust_remote_code=trust_remote_code,
                                             **runner_kwargs)


@dataclass
class ExportCheck:
    """One comparison of an export with the eager model on inputs of `shape` (batch, channels, H, W)."""

    shape: tuple
    max_abs_difference: float  # over the logits and the region class scores
    logits_scale: float  # max |eager logits|
    argmax_agreement: float  # share of the logits' pixels whose class is the eager model's

    def __str__(self):
        return (f"{'x'.join(map(str, self.shape))}: max |exported - eager| = {self.max_abs_difference:.2e} "
                f"(logits up to {self.logits_scale:.3g}), same class on {100 * self.argmax_agreement:.2f} % of "
                "the pixels")


def compare_with_eager(model, exported, shapes=(), seed=1, inputs=()):
    """
    Run `exported` and the eager `model` on random inputs of each (batch, height, width) in `shapes`, and on each
    `pixel_values` tensor of `inputs` (images, for a quantized export).
    """
    batches = [example_inputs(model, (height, width), batch_size, seed=seed + index)["pixel_values"]
               for index, (batch_size, height, width) in enumerate(shapes)]
    batches += [pixel_values.to(device=model.device, dtype=model.dtype) for pixel_values in inputs]
    checks = []
    for pixel_values in batches:
        with torch.no_grad():
            expected = model(pixel_values=pixel_values)
        actual = exported(pixel_values=pixel_values)
        pairs = [(actual.logits, expected.logits)]
        pairs += list(zip(actual.region_class_scores or (), expected.region_class_scores or ()))
        difference = max((a.float() - e.float()).abs().max().item() for a, e in pairs)
        checks.append(ExportCheck(tuple(pixel_values.shape), difference, expected.logits.abs().max().item(),
                                  argmax_agreement(actual.logits, expected.logits)))
    return checks


def argmax_agreement(logits, reference):
    """The share of pixels of (B, K, H, W) `logits` whose class (argmax over K) is that of `reference`."""
    return (logits.argmax(1) == reference.argmax(1)).double().mean().item()


def dataset_images(dataset_type, data, processor, **counts):
    """
    The first images of splits of a data set (`pcaa_hf.data.builders.open_dataset`'s types), prepared by `processor`
    as evaluation prepares them, for calibration and checks: `counts` maps a split to how many (`train=8,
    validation=4`); returns {split: a list of (1, 3, H, W) `pixel_values`}. The data set is opened once.
    """
    splits = open_dataset(dataset_type, data)
    images = {}
    for split, count in counts.items():
        examples = select_split(splits, split, data, count)
        if not len(examples):
            raise ValueError(f"{data} has no images in its '{split}' split.")
        examples = examples.with_transform(EvalTransform(image_processor=processor))
        images[split] = [torch.as_tensor(example["pixel_values"])[None] for example in examples]
    return images


def int8_quantizer(calibration_images, per_channel=True):
    """
    transformers' `OnnxRuntimeQuantizer` for an "onnx" export (pass it as `quantizer=` to `export_model` or
    `export_to_folder`): ONNX Runtime's static int8 quantization in the QDQ format, int8 weights (one scale per output
    channel with `per_channel`) and uint8 activations whose ranges are calibrated on `calibration_images`, a few
    (B, 3, H, W) `pixel_values` of preprocessed training images (`dataset_images`). On CPUs with VNNI instructions the
    convolutions then run on int8 kernels.
    """
    check_format("onnx")
    from onnxruntime.quantization import QuantFormat, QuantType
    from transformers.exporters import OnnxRuntimeQuantizer, OnnxRuntimeStaticConfig

    calibration = [{"pixel_values": pixel_values} for pixel_values in calibration_images]
    if not calibration:
        raise ValueError("int8 quantization needs at least one calibration image (`calibration_images` is empty).")
    config = OnnxRuntimeStaticConfig(quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                     activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return OnnxRuntimeQuantizer(config, calibration_dataset=calibration)


@dataclass
class ExportReport:
    """What `export_to_folder` did: where, how long the export took, and its checks against the eager model."""

    output_dir: Path
    format: str
    dynamic: bool
    example_shape: tuple
    export_seconds: float
    dtype: torch.dtype = torch.float32
    checks: list = field(default_factory=list)
    files: list = field(default_factory=list)


def default_check_shapes(example_size, batch_size, dynamic):
    """Static: the example's shape. Dynamic: batch 1 at the example size, and batch + 1 at another size."""
    height, width = example_size
    if not dynamic:
        return [(batch_size, height, width)]
    return [(1, height, width), (batch_size + 1, height * 3 // 4 + 5, width * 5 // 4 + 3)]


def export_to_folder(model, output_dir, format="onnx", dynamic=True, example_size=DEFAULT_EXAMPLE_SIZE,
                     batch_size=None, check_shapes=None, tolerance=1e-4, overwrite=False, check_inputs=(),
                     min_agreement=None, **options):
    """
    Export `model` (a PCAA model, or the path of its `save_pretrained` folder) with `export_model` and write the
    export to `output_dir` atomically: it is saved in a sibling folder, reloaded from there and compared with the eager
    model on random inputs of each (batch, height, width) of `check_shapes` (default `default_check_shapes`) and on
    the `pixel_values` tensors of `check_inputs`, and moved into place only when every check passes: each max
    |difference| at most `tolerance` x max(1, max |logits|) or, given `min_agreement` (a quantized export, whose
    logits move by design), each share of pixels keeping the eager model's class at least that. A model folder's
    image processor is saved with it. Returns an `ExportReport`.
    """
    check_format(format)
    output = Path(output_dir)
    if output.is_dir() and any(output.iterdir()) and not overwrite:  # before the export's minutes, not after
        raise FileExistsError(f"`output_dir` {output} exists and is not empty; choose another or overwrite it "
                              "(overwrite=True, --overwrite).")
    processor = None
    if isinstance(model, (str, Path)):
        folder = model
        model = load_saved_model(folder)
        if (Path(folder) / "preprocessor_config.json").is_file():
            processor = load_saved_image_processor(folder)
    check_pcaa_model(model)
    if batch_size is None:
        batch_size = 2 if dynamic else 1
    example_size = tuple(example_size)
    if check_shapes is None:
        check_shapes = default_check_shapes(example_size, batch_size, dynamic)
    started = time.perf_counter()
    exported = export_model(model, format, dynamic, example_size, batch_size, **options)
    report = ExportReport(Path(output_dir), format, dynamic, (batch_size, input_channels(model), *example_size),
                          time.perf_counter() - started, model.dtype)

    def save_and_check(staging):
        exported.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        # The dynamo export was written here just now, so loading it runs no code but ours.
        reloaded = load_exported(staging, trust_remote_code=True)
        report.checks = compare_with_eager(model, reloaded, check_shapes, inputs=check_inputs)
        if min_agreement is not None:
            failed = [check for check in report.checks if not check.argmax_agreement >= min_agreement]
            criterion = f"gives the eager model's class on less than {100 * min_agreement:g} % of the pixels"
        else:
            failed = [check for check in report.checks
                      if not check.max_abs_difference <= tolerance * max(1.0, check.logits_scale)]
            criterion = (f"differs from the eager model by more than the tolerance {tolerance} (relative to max(1, "
                         "max |logits|))")
        if failed:
            raise ValueError(f"The {format} export {criterion}: " + "; ".join(map(str, failed)))
        report.files = sorted(path.name for path in Path(staging).iterdir())

    report.output_dir = write_folder_atomically(save_and_check, output_dir, overwrite)
    return report


__all__ = [
    "DEFAULT_EXAMPLE_SIZE",
    "EXPORT_FORMATS",
    "EXPORT_MANIFEST",
    "ExportCheck",
    "ExportReport",
    "argmax_agreement",
    "check_format",
    "compare_with_eager",
    "dataset_images",
    "export_config",
    "export_model",
    "export_to_folder",
    "int8_quantizer",
    "is_export_folder",
    "load_exported",
]
