"""The measuring tools behind scripts/benchmark.py: peak tensor memory, the case matrix, the matmul limit, the
sliding-window and bfloat16 comparisons, the target checks, and the script end to end on a tiny matrix."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_hf.benchmarks.model_speed import (
    ModelCase,
    PeakTensorMemory,
    authors_model_builder,
    benchmark_model_case,
    benchmark_sliding_window,
    bfloat16_agreement,
    bfloat16_unsupported,
    matmul_throughput,
    matrix_product,
    model_cases,
    target_checks,
)
from pcaa_hf.conversion.original_checkpoints import import_original
from pcaa_hf.inference.segmentation_inference import sliding_windows
from pcaa_testing import small_config

CPU = torch.device("cpu")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_peak_tensor_memory_counts_live_storages_once():
    existing = torch.zeros(1000)  # 4000 bytes
    with PeakTensorMemory([existing, existing[:10]]) as memory:
        first = torch.ones(250_000)  # 1 MB
        second = first * 2  # 2 MB live
        del first
        third = second + 1  # the first is gone: still 2 MB
        third[:10].add_(1)  # a view and an in-place operation allocate nothing
    assert memory.peak == 4000 + 2_000_000
    assert memory.current_bytes() == 4000 + 2_000_000
    del second, third


def saved_activation_bytes(checkpointing):
    """Bytes a training forward leaves alive for the backward pass, beyond the weights and the inputs."""
    model = PCAAForSemanticSegmentation(small_config()).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    pixel_values, labels = torch.randn(2, 3, 128, 128), torch.randint(0, 5, (2, 128, 128))
    existing = list(model.parameters()) + list(model.buffers()) + [pixel_values, labels]
    with PeakTensorMemory(existing) as memory:
        base = memory.current_bytes()
        loss = model(pixel_values, labels=labels).loss
        alive = memory.current_bytes() - base
        loss.backward()
    assert memory.peak > base + alive  # the backward pass is seen too: gradients come on top
    return alive


def test_checkpointing_keeps_far_fewer_activations_for_the_backward_pass():
    plain, checkpointed = saved_activation_bytes(False), saved_activation_bytes(True)
    # 35 MB -> 19 MB: the blocks keep only their inputs; the stem, the heads and the loss keep theirs (at this
    # small size they weigh more than at the paper's, where R101 768x768 training saves 55 %, docs/benchmarks.md).
    assert checkpointed < 0.65 * plain, (plain, checkpointed)


def test_model_cases_cover_the_matrix_and_inference_ignores_checkpointing():
    cases = model_cases(["inference", "training"], [50, 101], [512, 768], [1, 2], ["float32", "bfloat16"],
                        [False, True], [False, True], [False])
    assert len(cases) == 32 + 64
    assert not any(case.checkpointing for case in cases if case.task == "inference")
    assert len(set(cases)) == len(cases)
    assert cases[0].label() == "inference R50 512x512 batch 1 float32"
    fast_path_ab = model_cases(["inference", "training"], [50], [512], [1], ["float32"], [False], [False], [False],
                               [True, False])
    assert [case.label() for case in fast_path_ab] == [
        "inference R50 512x512 batch 1 float32", "inference R50 512x512 batch 1 float32 no_cpu_fast_path",
        "training R50 512x512 batch 1 float32"]  # an inference path: training runs it never
    assert ModelCase("training", 101, 768, 2, "bfloat16", True, True, True).label() == (
        "training R101 768x768 batch 2 bfloat16 channels_last checkpointing compile")


def test_matmul_throughput_grows_the_size_until_a_product_takes_long():
    limit = matmul_throughput(CPU, torch.float32, max_call_seconds=1e-9, block_seconds=0.01)
    # Both of the CPU's kernels, each stopped at the first size: the next would exceed the (tiny) budget.
    assert {kernel: list(by_size) for kernel, by_size in limit["by_kernel"].items()} == {"mm": [256],
                                                                                          "conv1x1": [256]}
    assert limit["size"] == 256 and limit["flop_per_second"] == max(
        by_size[256] for by_size in limit["by_kernel"].values()) > 1e8
    assert limit["flop_per_second"] == limit["by_kernel"][limit["kernel"]][256]


@pytest.mark.parametrize("kernel", ["mm", "conv1x1"])
def test_each_matmul_kernel_computes_the_product_it_is_timed_for(kernel):
    torch.manual_seed(0)
    product, flops = matrix_product(CPU, torch.float64, 32, kernel)
    result = product()
    torch.manual_seed(0)  # the same operands again
    if kernel == "mm":
        expected = torch.randn(32, 32).double() @ torch.randn(32, 32).double()
        assert flops == 2 * 32 ** 3
    else:  # 32 channels of 16 * 32 pixels, then the weights (output channels x input channels)
        pixels, weights = torch.randn(32, 16 * 32).double(), torch.randn(32, 32).double()
        expected = (weights @ pixels)[None, :, :, None]
        assert flops == 2 * (16 * 32) * 32 * 32
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected)


def test_sliding_window_comparison_times_every_window():
    model = PCAAForSemanticSegmentation(small_config()).eval()
    frame = torch.randn(1, 3, 96, 160)
    figures = benchmark_sliding_window(model, CPU, frame, crop_size=64, window_batch_size=2, calls=1)
    windows = sliding_windows(96, 160, (64, 64), (43, 43))
    assert figures["windows"] == len(windows) == len(figures["window_forward_seconds"]) == 8
    assert figures["stride"] == [43, 43] and figures["frame"] == [96, 160]
    assert figures["sum_of_window_forwards_seconds"] == pytest.approx(sum(figures["window_forward_seconds"]))
    assert figures["slide_seconds"] > 0


class Scaled(torch.nn.Module):
    """Logits from a matrix product (bfloat16 under autocast) or from a multiplication (float32 under autocast)."""

    def __init__(self, through_matmul):
        super().__init__()
        self.through_matmul = through_matmul

    def forward(self, pixel_values):
        if self.through_matmul:
            # Class 1 beats class 0 by 2^-12, which bfloat16 (8 significant bits) rounds away: ties go to class 0.
            weight = torch.tensor([[1.0, 0.0, 0.0], [1.0 + 2 ** -12, 0.0, 0.0]])
            logits = torch.einsum("kc,bchw->bkhw", weight, pixel_values.abs() + 1)
        else:
            logits = torch.stack([pixel_values[:, 0], pixel_values[:, 0] * 1.0001], dim=1)
        return types.SimpleNamespace(logits=F.avg_pool2d(logits, 1))


def test_bfloat16_agreement_is_the_share_of_unchanged_argmax_pixels():
    frame = torch.rand(1, 3, 16, 24)
    assert bfloat16_agreement(Scaled(through_matmul=False), CPU, frame, crop_size=16) == 1.0
    assert bfloat16_agreement(Scaled(through_matmul=True), CPU, frame, crop_size=16) == 0.0


def row(task="inference", depth=101, size=768, batch_size=2, dtype="float32", channels_last=False,
        checkpointing=False, implementation="pcaa_hf", **figures):
    return dict(task=task, depth=depth, size=size, batch_size=batch_size, dtype=dtype, channels_last=channels_last,
                checkpointing=checkpointing, compile=False, implementation=implementation, **figures)


def test_target_checks_read_the_figures():
    results = {
        "model": [
            row(seconds=2.0, flop_per_second=1.0, fraction_of_limit=0.93, peak_memory_bytes=1),
            row(implementation="authors", seconds=2.5, flop_per_second=0.8, fraction_of_limit=0.74,
                peak_memory_bytes=1),
            row(channels_last=True, seconds=1.9, fraction_of_limit=0.89, peak_memory_bytes=1),
            row(dtype="bfloat16", seconds=0.8, fraction_of_limit=0.96, peak_memory_bytes=1),
            row(dtype="bfloat16", channels_last=True, skipped="no bfloat16"),
            row(task="training", seconds=9.0, fraction_of_limit=0.86, peak_memory_bytes=100),
            row(task="training", implementation="authors", seconds=8.1, fraction_of_limit=0.9, peak_memory_bytes=100),
            row(task="training", dtype="bfloat16", seconds=6.0, fraction_of_limit=0.7, peak_memory_bytes=100),
            row(task="training", checkpointing=True, seconds=12.0, fraction_of_limit=0.7, peak_memory_bytes=55),
        ],
        "slide": {"slide_seconds": 10.0, "sum_of_window_forwards_seconds": 10.5, "bfloat16_argmax_agreement": 0.99},
    }
    checks = {target.split(" (")[0]: (figure, met) for target, figure, met in target_checks(results)}
    assert checks["bfloat16 inference >= 95 % of the bfloat16 matmul limit"] == ("96.0 - 96.0 %", True)
    assert checks["float32 training step >= 85 % of the float32 matmul limit"] == ("70.0 - 86.0 %", False)
    assert checks["bfloat16 training step >= 1.6x faster than float32"] == ("1.50x - 1.50x", False)
    assert checks["bfloat16 argmax equals float32's on >= 99.5 % of a 1024x2048 frame's pixels"] == ("99.000 %",
                                                                                                     False)
    assert checks["pcaa_hf inference at least as fast as the authors' code"] == ("1.250x - 1.250x their speed", True)
    assert checks["pcaa_hf training step at least as fast as the authors' code"] == ("0.900x - 0.900x their speed",
                                                                                     False)
    assert checks["activation checkpointing lowers R101 768x768 peak training memory by >= 40 %"] == (
        "45.0 - 45.0 %", True)
    assert checks["sliding-window evaluation costs <= the sum of its windows' forwards"] == ("0.952 of the sum",
                                                                                            True)
    layouts = [(figure, met) for target, figure, met in target_checks(results) if target.startswith("float32 inf")]
    assert layouts == [("93.0 - 93.0 %", True), ("89.0 - 89.0 %", False)]


def test_benchmark_script_measures_a_small_matrix(tmp_path):
    output = tmp_path / "figures.json"
    environment = {name: value for name, value in os.environ.items() if name != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--sections", "limit", "model", "--tasks", "inference", "training",
         "--depths", "18", "--sizes", "64", "--batch_sizes", "2", "--dtypes", "float32", "bfloat16",
         "--checkpointing", "off", "on", "--channels-last", "off", "--calls", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    assert figures["machine"]["torch"] == torch.__version__
    assert figures["machine"]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert figures["limits"]["float32"]["flop_per_second"] > 1e9
    rows = {(row["task"], row["dtype"], row["checkpointing"]): row for row in figures["model"]}
    assert len(rows) == len(figures["model"]) == 6
    measured = rows["inference", "float32", False]
    assert measured["flops"] > 1e9 and measured["seconds"] > 0 and measured["peak_memory_bytes"] > 0
    assert measured["fraction_of_limit"] == pytest.approx(
        measured["flops"] / measured["seconds"] / measured["limit_flop_per_second"])
    assert measured["limit_flop_per_second"] > 0.5 * figures["limits"]["float32"]["flop_per_second"]
    # Recomputing the checkpointed blocks in the backward pass adds to the FLOPs of a training step.
    assert rows["training", "float32", True]["flops"] > rows["training", "float32", False]["flops"]
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert "bfloat16 instructions" in rows["inference", "bfloat16", False]["skipped"]
    assert "Targets:" in result.stdout and "float32 inference >= 90 %" in result.stdout


def test_benchmark_script_refuses_a_missing_cuda_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, str(SCRIPT), "--sections", "model", "--device", "cuda",
                             "--output", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--device cuda: this torch sees no CUDA device" in result.stderr
    assert "Traceback" not in result.stderr


def fake_checkout(root, scale):
    """
    A stand-in for a checkout of lsa1997/PCAA: the three modules the benchmark loads (model, loss, train.py's parameter
    groups), cv2 and an evaluate.py.
    """
    for folder in ("networks", "loss", "utils"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "networks" / "caanet.py").write_text(
        "import cv2\nimport torch\n\n\n"
        "class Seg_Model(torch.nn.Module):\n"
        "    def __init__(self, num_classes, backbone, bins, criterion=None, aux_loss=False):\n"
        "        super().__init__()\n"
        f"        self.scale, self.settings = {scale}, (num_classes, backbone, bins, aux_loss)\n"
        "        self.classifier, self.criterion = torch.nn.Conv2d(3, num_classes, 1), criterion\n\n"
        "    def forward(self, x, labels=None, labels_onehot=None):\n"
        "        logits = self.classifier(x) * self.scale\n"
        "        if labels is None:\n"
        "            return logits, []\n"
        "        return self.criterion([logits], labels, labels_onehot)\n")
    (root / "loss" / "criterion.py").write_text(
        "import torch.nn.functional as F\n\n\n"
        "class JointClsLoss:\n"
        "    def __init__(self, ignore_index, bins):\n"
        "        self.ignore_index = ignore_index\n\n"
        "    def __call__(self, preds, labels, labels_onehot):\n"
        "        assert labels_onehot.shape == preds[0].shape and labels_onehot.sum(1).eq(1).all()\n"
        "        return {'total_loss': F.cross_entropy(preds[0], labels, ignore_index=self.ignore_index)}\n")
    (root / "utils" / "pyt_utils.py").write_text(
        "import cv2\n\n\n"
        "def get_parameters(model, lr):\n"
        "    return [{'params': [model.classifier.weight], 'lr': lr},\n"
        "            {'params': [model.classifier.bias], 'lr': lr, 'weight_decay': 0.0}]\n")
    (root / "evaluate.py").write_text("raise ImportError('the checkout shadows evaluate')\n")
    return root


def test_the_authors_model_is_built_from_a_checkout_without_leaving_traces(tmp_path):
    path_before = list(sys.path)
    build = authors_model_builder(fake_checkout(tmp_path / "first", 1.0))
    model = build(101, num_labels=19)
    assert model.seg_model.settings == (19, "resnet101", [(4, 4)], True)
    assert sys.path == path_before
    assert sys.modules.get("cv2") is None or sys.modules["cv2"].__spec__ is not None  # no stand-in left behind
    assert not {"networks.caanet", "loss.criterion", "utils.pyt_utils"} & set(sys.modules)
    import evaluate  # the real package, not the checkout's evaluate.py

    assert hasattr(evaluate, "load")
    # A second checkout is imported afresh, not served from the first one's modules.
    caanet, criterion = import_original(fake_checkout(tmp_path / "second", 2.0))
    assert caanet.Seg_Model(19, "resnet50", [(4, 4)]).scale == 2.0 and criterion.JointClsLoss(255, []).ignore_index

    def ours(depth, num_labels):
        return PCAAForSemanticSegmentation(small_config(num_labels=num_labels))

    case = ModelCase("inference", 50, 32, 1, "float32", False)
    limits = {"float32": {"size": 256, "kernel": "conv1x1"}}
    rows = benchmark_model_case(case, CPU, limits, calls=2, builders={"pcaa_hf": ours, "authors": build})
    assert [row["implementation"] for row in rows] == ["pcaa_hf", "authors"]
    assert rows[1]["flops"] == 2 * 3 * 19 * 32 * 32 and rows[1]["peak_memory_bytes"] > 0
    # Their training step: their loss, given the one-hot maps their data loader makes, and their parameter groups.
    training = ModelCase("training", 50, 32, 2, "float32", False)
    rows += benchmark_model_case(training, CPU, limits, calls=1, builders={"authors": build})
    assert rows[2]["flops"] == 2 * (2 * 2 * 3 * 19 * 32 * 32)  # forward, backward to the weights alone
    assert rows[2]["peak_memory_bytes"] >= 2 * 19 * 32 * 32 * 4  # the one-hot maps are inputs the step holds
    # Both against the same matmul limit, re-read beside the case at the given size.
    assert rows[0]["limit_flop_per_second"] == rows[1]["limit_flop_per_second"] > 1e8
    for row in rows:
        assert row["fraction_of_limit"] == pytest.approx(row["flops"] / row["seconds"] / row["limit_flop_per_second"])


def test_the_runtimes_run_the_export_of_the_same_model_on_the_same_inputs():
    from pcaa_hf.benchmarks.runtimes import CONTENDERS, RUNTIME_PACKAGES, benchmark_runtimes

    available = [(runtime, precision) for runtime, precision in CONTENDERS
                 if all(importlib.util.find_spec(package) for package in RUNTIME_PACKAGES[runtime])
                 and (precision != "bfloat16" or bfloat16_unsupported(CPU) is None)]
    model = PCAAForSemanticSegmentation(small_config(num_labels=5)).eval()
    rows = benchmark_runtimes(model, 48, 1, available, calls=1)
    assert [(row["runtime"], row["precision"]) for row in rows] == available
    by_contender = {(row["runtime"], row["precision"]): row for row in rows}
    assert by_contender["pcaa_hf", "float32"]["max_abs_difference"] == 0
    assert by_contender["pcaa_hf", "float32"]["speed_vs_pcaa_hf_float32"] == 1
    for contender in (("onnxruntime", "float32"), ("openvino", "float32")):
        if contender in by_contender:  # the same float32 arithmetic up to rounding
            assert by_contender[contender]["max_abs_difference"] < 1e-3
            assert by_contender[contender]["argmax_agreement"] > 0.99
    for row in rows:
        assert row["seconds"] > 0 and row["images_per_second"] == pytest.approx(1 / row["seconds"])


def test_runtime_targets_compare_the_same_precision():
    from pcaa_hf.benchmarks.runtimes import runtime_target_checks

    def runtime_row(runtime, precision, seconds):
        return dict(runtime=runtime, precision=precision, depth=50, size=512, batch_size=1, seconds=seconds,
                    speed_vs_pcaa_hf_float32=2.0 / seconds)

    rows = [runtime_row("pcaa_hf", "float32", 2.0), runtime_row("pcaa_hf", "bfloat16", 1.0),
            runtime_row("onnxruntime", "float32", 1.6), runtime_row("openvino", "bfloat16", 1.25),
            runtime_row("onnxruntime", "int8", 0.8)]
    checks = {target.split(" (")[0]: (figure, met) for target, figure, met in runtime_target_checks(rows)}
    assert checks == {
        "pcaa_hf float32 inference at least as fast as onnxruntime float32": ("0.80x - 0.80x its speed", False),
        "pcaa_hf bfloat16 inference at least as fast as openvino bfloat16": ("1.25x - 1.25x its speed", True),
        "int8 inference on ONNX Runtime >= 2x pcaa_hf float32": ("2.50x - 2.50x", True),
    }


def test_the_runtimes_need_our_float32_model_to_compare_with(capsys):
    from pcaa_hf.cli.benchmark import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--sections", "runtimes", "--contenders", "onnxruntime int8"])
    assert exit_info.value.code == 2
    assert "--contenders must include 'pcaa_hf float32'" in capsys.readouterr().err


def test_the_flop_count_includes_the_cpu_attention_of_the_baseline_heads():
    """The Non-local block's attention (2 products of h*w x h*w x C/2, forward; 4 more backward) is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from pcaa_hf.benchmarks.model_speed import CPU_ATTENTION_FLOPS
    from pcaa_hf.model.decode_heads_pcaa import PCAANonLocalBlock

    block, features = PCAANonLocalBlock(16), torch.randn(2, 16, 6, 10, requires_grad=True)
    with FlopCounterMode(display=False) as without:
        block(features)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        output = block(features)
    attention = 2 * (2 * 2 * 60 * 60 * 8)  # batch 2, two products, 2 FLOPs per multiply-add
    assert counter.get_total_flops() - without.get_total_flops() == attention
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        output.sum().backward()
    assert counter.get_total_flops() >= 2 * attention
