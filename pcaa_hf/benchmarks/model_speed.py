"""
Speed, memory and FLOPs of PCAA behind scripts/benchmark.py, against the machine's own limit: the throughput of large
matrix products measured in the same run.

FLOPs come from torch's `FlopCounterMode` (convolutions and matrix products, 2 per multiply-add) on the first, untimed
call of each case. Peak memory is `torch.cuda.max_memory_allocated` on GPUs; on CPUs, where torch keeps no such
statistic, `PeakTensorMemory` counts the same thing: the bytes of all live tensors (weights, gradients, optimiser
state, activations).
"""

import gc
import io
import itertools
import math
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import asdict, dataclass, fields
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pcaa_hf.conversion.original_checkpoints import import_original
from pcaa_hf.conversion.parity import authors_onehot_labels
from pcaa_hf.inference.segmentation_inference import SegmentationInference, sliding_windows
from pcaa_hf.model.backbone_pcaa import cpu_fast_paths
from pcaa_hf.model.configuration_pcaa import PCAAConfig
from pcaa_hf.model.modeling_pcaa import PCAAForSemanticSegmentation

from .measurements import best_seconds


def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's flop counter knows the fused attention kernels of GPUs but not the CPU one, which the Non-local and OCR
# heads run: the same formulas count it.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MATMUL_KERNELS = {"cpu": ("mm", "conv1x1"), "cuda": ("mm",)}
TASKS = ("inference", "training")


def bfloat16_unsupported(device):
    """None when `device` has bfloat16 arithmetic, else why not (emulation would be hundreds of times slower)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no bfloat16 arithmetic"
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so oneDNN runs reference kernels"
    return None


def matrix_product(device, dtype, size, kernel):
    """
    A function computing one matrix product with `kernel`, and its FLOPs. "mm": `torch.mm` of two (size, size)
    matrices (MKL or OpenBLAS on CPUs, cuBLAS on GPUs; output written in place). "conv1x1": the library that runs the
    convolutions (oneDNN on x86 CPUs), as a 1x1 convolution of a channels-last map of 16 * size pixels and `size`
    channels: a (16 * size, size) @ (size, size) product, the shape of a layer on a feature map.
    """
    if kernel == "mm":
        left = torch.randn(size, size, device=device).to(dtype)
        right = torch.randn(size, size, device=device).to(dtype)
        product = torch.empty(size, size, device=device, dtype=dtype)
        return (lambda: torch.mm(left, right, out=product)), 2 * size ** 3
    pixels = torch.randn(1, size, 16 * size, 1, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(size, size, 1, 1, device=device).to(dtype)
    return (lambda: F.conv2d(pixels, weight)), 2 * 16 * size ** 3


def matmul_flop_per_second(device, dtype, size, kernel="mm", block_seconds=0.25, blocks=3):
    """
    FLOP/s of `kernel`'s products at `size` (see `matrix_product`), the best of `blocks` blocks of calls lasting
    `block_seconds` or more. Returns it and the seconds of one product.
    """
    product, flops = matrix_product(device, dtype, size, kernel)

    def products(count):
        for _ in range(count):
            product()

    products(1)  # library set-up (handles, kernels) is not the product's time
    first = best_seconds(lambda: products(1), 1, device)
    calls = max(1, math.ceil(block_seconds / first))
    return flops * calls / best_seconds(lambda: products(calls), blocks, device), first


def matmul_throughput(device, dtype, max_call_seconds=2.0, block_seconds=0.25):
    """
    FLOP/s of the fastest large matrix product on `device`: `torch.mm`, and on CPUs also the convolution library's
    product (MKL's and oneDNN's kernels differ by over 20 % on some CPUs), each at size = 256, 512, ... doubling while
    the next size's product would take under `max_call_seconds`. Returns {"flop_per_second": best, "kernel" and
    "size": where, "by_kernel": {kernel: {size: FLOP/s}}}.
    """
    by_kernel = {}
    for kernel in MATMUL_KERNELS.get(device.type, ("mm",)):
        by_size = by_kernel[kernel] = {}
        size = 256
        while size <= 16384:
            by_size[size], first = matmul_flop_per_second(device, dtype, size, kernel, block_seconds)
            if first * 8 > max_call_seconds:
                break
            size *= 2
    kernel, size = max(((kernel, size) for kernel, by_size in by_kernel.items() for size in by_size),
                       key=lambda where: by_kernel[where[0]][where[1]])
    return {"flop_per_second": by_kernel[kernel][size], "kernel": kernel, "size": size, "by_kernel": by_kernel}


@contextmanager
def matmul_precision(limit):
    """float32 matrix products in TF32 while measuring the "tfloat32" limit (NVIDIA GPUs), as they are by default."""
    previous = torch.backends.cuda.matmul.fp32_precision
    if limit == "tfloat32":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def machine_limits(device, dtypes):
    """Matmul throughput for each dtype name (and TF32, the format of float32 convolutions, on NVIDIA GPUs)."""
    names = list(dtypes) + (["tfloat32"] if device.type == "cuda" and "float32" in dtypes else [])
    limits = {}
    for name in names:
        with matmul_precision(name):
            limits[name] = matmul_throughput(device, DTYPES.get(name, torch.float32))
    return limits


def limit_name(device, dtype):
    """The matmul limit a case's convolutions run against: TF32 for float32 convolutions where cuDNN allows it."""
    if device.type == "cuda" and dtype == "float32" and torch.backends.cudnn.conv.fp32_precision == "tf32":
        return "tfloat32"
    return dtype


class PeakTensorMemory(TorchDispatchMode):
    """
    While active, the peak bytes of live tensor storages: those of the `existing` tensors (weights, optimiser state,
    inputs) plus every storage an operator returns, until it is freed. Sampled after each operator, so memory that an
    operator allocates and frees inside itself is not seen. The CPU counterpart of `torch.cuda.max_memory_allocated`.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live = {}
        for tensor in existing:
            self.track(tensor)
        self.peak = self.current_bytes()

    def track(self, tensor):
        storage = tensor.untyped_storage()
        self.live.setdefault(StorageWeakRef(storage), storage.nbytes())

    def current_bytes(self):
        self.live = {storage: size for storage, size in self.live.items() if not storage.expired()}
        return sum(self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        self.current_bytes()  # forget the freed storages first: a new one may take a freed one's place
        for output in tree_leaves(outputs):
            if isinstance(output, torch.Tensor):
                self.track(output)
        self.peak = max(self.peak, self.current_bytes())
        return outputs


@dataclass(frozen=True)
class ModelCase:
    """
    One measured configuration: the paper's model (output stride 8, one 4x4 PCAA module, 19 classes), or with
    `decode_head` a baseline head of its Table 3 in the PCAA head's place.
    """

    task: str
    depth: int
    size: int
    batch_size: int
    dtype: str
    channels_last: bool
    checkpointing: bool = False
    compile: bool = False
    cpu_fast_path: bool = True  # `pcaa_hf.cpu_fast_paths`: what PCAA's CPU inference runs by default
    decode_head: str = "pcaa"

    def label(self):
        flags = [flag for flag, on in (("channels_last", self.channels_last), ("checkpointing", self.checkpointing),
                                       ("compile", self.compile), ("no_cpu_fast_path", not self.cpu_fast_path)) if on]
        head = "" if self.decode_head == "pcaa" else f" {self.decode_head}"
        return (f"{self.task} R{self.depth}{head} {self.size}x{self.size} batch {self.batch_size} {self.dtype}"
                + "".join(f" {flag}" for flag in flags))


def model_cases(tasks, depths, sizes, batch_sizes, dtypes, channels_last, checkpointing, compile,
                cpu_fast_path=(True,), decode_heads=("pcaa",)):
    """
    Every combination; inference cases ignore `checkpointing` (there is no backward pass to save memory for), training
    cases `cpu_fast_path` (an inference path).
    """
    cases = []
    for task, depth, head, size, batch, dtype, layout, saving, compiled, fast in itertools.product(
            tasks, depths, decode_heads, sizes, batch_sizes, dtypes, channels_last, checkpointing, compile,
            cpu_fast_path):
        case = ModelCase(task, depth, size, batch, dtype, layout, saving and task == "training", compiled,
                         fast or task == "training", head)
        if case not in cases:
            cases.append(case)
    return cases


def paper_model(depth, num_labels=19, seed=0, decode_head_type="pcaa"):
    """
    The paper's Cityscapes PCAA (output stride 8, one 4x4 PCAA module, 512-channel head), or the baseline of its
    Table 3 that `decode_head_type` names in the PCAA head's place, randomly initialised.
    """
    torch.manual_seed(seed)
    return PCAAForSemanticSegmentation(PCAAConfig(backbone_depth=depth, num_labels=num_labels,
                                                  decode_head_type=decode_head_type))


class AuthorsSegModel(torch.nn.Module):
    """
    The authors' `Seg_Model` as their train.py builds it for the paper (their `JointClsLoss`, the auxiliary head,
    `--aux-loss`, no dropout), called the way `case_step` calls ours: `model(pixel_values)` for inference,
    `model(pixel_values, **label_inputs).loss` for a training step. Their data loader makes one-hot label maps beside
    the label maps, so `label_inputs` makes them once, outside the timed step, as the label maps are made for ours.
    """

    def __init__(self, seg_model, get_parameters, num_labels):
        super().__init__()
        self.seg_model = seg_model
        self.get_parameters = get_parameters  # their utils.pyt_utils.get_parameters: train.py's SGD parameter groups
        self.num_labels = num_labels

    def label_inputs(self, labels):
        return {"labels": labels, "labels_onehot": authors_onehot_labels(labels, self.num_labels, torch.float32)}

    def parameter_groups(self, learning_rate):
        with redirect_stdout(io.StringIO()):  # it prints every parameter it exempts from weight decay
            return self.get_parameters(self.seg_model, learning_rate)

    def forward(self, pixel_values, labels=None, labels_onehot=None):
        if labels is None:
            return self.seg_model(pixel_values)
        return SimpleNamespace(loss=self.seg_model(pixel_values, labels, labels_onehot)["total_loss"])


def authors_model_builder(checkout):
    """
    A `paper_model`-like builder of the authors' model (GitHub lsa1997/PCAA at `checkout`) in the same configuration,
    to time their code beside ours: an `AuthorsSegModel`.
    """
    caanet, criterion, training_utils = import_original(
        checkout, ("networks.caanet", "loss.criterion", "utils.pyt_utils"))

    def authors_model(depth, num_labels=19, seed=0):
        torch.manual_seed(seed)
        bins = [(4, 4)]
        loss = criterion.JointClsLoss(ignore_index=255, bins=bins)
        seg_model = caanet.Seg_Model(num_classes=num_labels, criterion=loss, backbone=f"resnet{depth}", bins=bins,
                                     aux_loss=True)
        return AuthorsSegModel(seg_model, training_utils.get_parameters, num_labels)

    return authors_model


def case_step(case, model, device, num_labels):
    """
    The measured call of `case` (a forward, or a training step with SGD), taking the module to call (default: the
    model, compiled for a compiled case), and a function listing the tensors that exist between calls besides the
    model's: inputs and optimiser state.
    """
    generator = torch.Generator(device).manual_seed(0)
    pixel_values = torch.randn(case.batch_size, 3, case.size, case.size, device=device, generator=generator)
    labels = torch.randint(0, num_labels, (case.batch_size, case.size, case.size), device=device, generator=generator)
    theirs = isinstance(model, AuthorsSegModel)
    label_inputs = model.label_inputs(labels) if theirs else {"labels": labels}
    if case.channels_last:
        model.to(memory_format=torch.channels_last)
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    runner = torch.compile(model) if case.compile else model

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if case.dtype == "bfloat16" else nullcontext()

    if case.task == "inference":
        model.eval()

        def step(module=runner):
            with torch.inference_mode(), autocast(), cpu_fast_paths(case.cpu_fast_path):
                module(pixel_values)

        return step, lambda: [pixel_values]

    model.train()
    if case.checkpointing:
        model.activation_checkpointing_enable()
    # The paper's optimiser, with the parameter groups each code's training builds; momentum buffers exist from the
    # first step on.
    learning_rate = 0.01
    parameters = model.parameter_groups(learning_rate) if theirs else model.parameters()
    optimizer = torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, weight_decay=1e-4)

    def step(module=runner):
        with autocast():
            loss = module(pixel_values, **label_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def existing():
        return [pixel_values, *label_inputs.values()] + [
            value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]

    return step, existing


def benchmark_model_case(case, device, limits, calls=3, num_labels=19, builders=None):
    """
    Measure one `ModelCase` on each model of `builders` ({name: build(depth, num_labels)}, default: ours). For each,
    a first call counts FLOPs (eager, uncompiled) and a second measures peak memory; then `calls` rounds time one
    call of each model in turn (so that a slower or faster spell of the machine meets all of them), between two
    re-readings of the machine's matmul limit at its best size: a case's fraction of the limit is against the
    higher of the two. Returns one row of the case's fields and figures per model, in `builders`' order.
    """
    builders = builders or {"pcaa_hf": paper_model}
    gc.collect()  # the previous case's tensors, before this one allocates
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if case.compile:
        torch._dynamo.reset()  # each case compiles afresh, never hitting the previous cases' recompile limit
    runs = {}
    for name, build_model in builders.items():
        model = build_model(case.depth, num_labels).to(device)
        step, existing = case_step(case, model, device, num_labels)
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            step(model)
        if case.compile:
            step()  # compiles (the counted call ran the eager model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peak_bytes = torch.cuda.max_memory_allocated(device)
        elif case.compile:  # dynamo does not compile under a Python dispatch mode: the tracker would see eager memory
            peak_bytes = None
        else:
            with PeakTensorMemory(list(model.parameters()) + list(model.buffers()) + existing()) as memory:
                step()
            peak_bytes = memory.peak
        runs[name] = {"step": step, "flops": counter.get_total_flops(), "peak_memory_bytes": peak_bytes,
                      "seconds": math.inf}

    limit_key = limit_name(device, case.dtype)
    fastest = limits.get(limit_key)  # the kernel and size of the fastest product

    def limit_now():
        with matmul_precision(limit_key):
            return matmul_flop_per_second(device, DTYPES[case.dtype], fastest["size"], fastest["kernel"], blocks=1)[0]

    limit_before = limit_now() if fastest else None
    for _ in range(calls):
        for run in runs.values():
            run["seconds"] = min(run["seconds"], best_seconds(run["step"], 1, device))
    limit = max(limit_before, limit_now()) if fastest else None
    rows = []
    for name, run in runs.items():
        flop_per_second = run["flops"] / run["seconds"]
        rows.append({**asdict(case), "implementation": name, "seconds": run["seconds"],
                     "images_per_second": case.batch_size / run["seconds"], "flops": run["flops"],
                     "flop_per_second": flop_per_second, "limit": limit_key, "limit_flop_per_second": limit,
                     "fraction_of_limit": flop_per_second / limit if limit else None,
                     "peak_memory_bytes": run["peak_memory_bytes"]})
    return rows


def benchmark_sliding_window(model, device, frame, crop_size=768, window_batch_size=4, calls=2):
    """
    Sliding-window logits of one frame (1, 3, H, W) as the paper evaluates Cityscapes (768x768 windows, stride 512),
    against the sum of plain forwards of its windows one at a time, each a (1, 3, 768, 768) image. Each of `calls`
    rounds times every window's forward and then the sliding pass, so that both meet the machine's slower and faster
    spells; the fastest of each is kept.
    """
    inference = SegmentationInference("slide", crop_size, window_batch_size=window_batch_size)
    windows = sliding_windows(*frame.shape[-2:], inference.crop_size, inference.stride)
    crops = [frame[..., top:bottom, left:right] for top, left, bottom, right in windows]

    def forward(crop):
        with torch.inference_mode():
            model(pixel_values=crop)

    forward(crops[0])
    inference.logits(model, frame)
    window_seconds, slide_seconds = [math.inf] * len(crops), math.inf
    for _ in range(calls):
        window_seconds = [min(seconds, best_seconds(partial(forward, crop), 1, device))
                          for seconds, crop in zip(window_seconds, crops)]
        slide_seconds = min(slide_seconds, best_seconds(lambda: inference.logits(model, frame), 1, device))
    return {"frame": list(frame.shape[-2:]), "crop_size": crop_size, "stride": list(inference.stride),
            "windows": len(windows), "window_batch_size": window_batch_size, "slide_seconds": slide_seconds,
            "sum_of_window_forwards_seconds": sum(window_seconds), "window_forward_seconds": window_seconds}


def bfloat16_agreement(model, device, frame, crop_size=768):
    """Fraction of the frame's pixels whose sliding-window argmax under bfloat16 autocast equals float32's."""
    inference = SegmentationInference("slide", crop_size)
    reference = inference.predict(model, frame)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        low_precision = inference.predict(model, frame)
    return (low_precision == reference).double().mean().item()


def target_checks(results):
    """
    The targets docs/benchmarks.md sets, read from a run's figures: (target, figure, met) rows for what the run
    measured.
    """
    measured = [row for row in results.get("model", []) if "skipped" not in row]
    rows = [row for row in measured if row.get("implementation", "pcaa_hf") == "pcaa_hf"
            and row.get("cpu_fast_path", True) and row.get("decode_head", "pcaa") == "pcaa"]
    checks = []

    def fraction_check(target, minimum, **where):
        fractions = [row["fraction_of_limit"] for row in rows if row["fraction_of_limit"] is not None
                     and all(row[key] == value for key, value in where.items())]
        if fractions:
            checks.append((target, f"{100 * min(fractions):.1f} - {100 * max(fractions):.1f} %",
                           min(fractions) >= minimum))

    for channels_last in (False, True):
        fraction_check(f"float32 inference >= 90 % of the float32 matmul limit (channels_last "
                       f"{'on' if channels_last else 'off'}, every case)", 0.9, task="inference", dtype="float32",
                       channels_last=channels_last)
    fraction_check("bfloat16 inference >= 95 % of the bfloat16 matmul limit (every case)", 0.95, task="inference",
                   dtype="bfloat16")
    fraction_check("float32 training step >= 85 % of the float32 matmul limit (every case)", 0.85, task="training",
                   dtype="float32")

    defaults = {field.name: field.default for field in fields(ModelCase)}  # fields that older runs did not record

    def twin(row, **changes):
        wanted = {**{name: row.get(name, default) for name, default in defaults.items()}, **changes}
        return next((other for other in rows
                     if all(other.get(key, defaults.get(key)) == value for key, value in wanted.items())), None)

    bfloat16_pairs = [(row, twin(row, dtype="float32")) for row in rows
                      if row["task"] == "training" and row["dtype"] == "bfloat16"]
    speedups = [float32["seconds"] / row["seconds"] for row, float32 in bfloat16_pairs if float32]
    if speedups:
        checks.append(("bfloat16 training step >= 1.6x faster than float32 (every case)",
                       f"{min(speedups):.2f}x - {max(speedups):.2f}x", min(speedups) >= 1.6))
    agreement = results.get("slide", {}).get("bfloat16_argmax_agreement")
    if agreement is not None:
        checks.append(("bfloat16 argmax equals float32's on >= 99.5 % of a 1024x2048 frame's pixels",
                       f"{100 * agreement:.3f} %", agreement >= 0.995))
    for task, what in (("inference", "inference"), ("training", "training step")):
        authors_pairs = [(row, twin(row)) for row in measured
                         if row.get("implementation") == "authors" and row["task"] == task]
        speedups = [row["seconds"] / ours["seconds"] for row, ours in authors_pairs if ours]
        if speedups:
            checks.append((f"pcaa_hf {what} at least as fast as the authors' code (every case)",
                           f"{min(speedups):.3f}x - {max(speedups):.3f}x their speed", min(speedups) >= 1))
    checkpointing_pairs = [(row, twin(row, checkpointing=False)) for row in rows if row["task"] == "training"
                           and row["checkpointing"] and row["depth"] == 101 and row["size"] == 768]
    savings = [1 - row["peak_memory_bytes"] / plain["peak_memory_bytes"] for row, plain in checkpointing_pairs
               if plain]
    if savings:
        checks.append(("activation checkpointing lowers R101 768x768 peak training memory by >= 40 % (every case)",
                       f"{100 * min(savings):.1f} - {100 * max(savings):.1f} %", min(savings) >= 0.4))
    slide = results.get("slide")
    if slide:
        ratio = slide["slide_seconds"] / slide["sum_of_window_forwards_seconds"]
        checks.append(("sliding-window evaluation costs <= the sum of its windows' forwards",
                       f"{ratio:.3f} of the sum", ratio <= 1))
    return checks


__all__ = ["AuthorsSegModel", "ModelCase", "PeakTensorMemory", "authors_model_builder", "benchmark_model_case",
           "benchmark_sliding_window", "bfloat16_agreement", "bfloat16_unsupported", "machine_limits",
           "matmul_throughput", "model_cases", "paper_model", "target_checks"]
