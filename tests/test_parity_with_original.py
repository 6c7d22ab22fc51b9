"""Parity with the authors' code, run when a checkout of GitHub lsa1997/PCAA is named by PCAA_ORIGINAL_REPO.

The authors' code is not part of this project and cannot be downloaded in CI, so this test is skipped there; see
README.md ("Parity with the authors' code") for the figures and how to reproduce them. The comparison runs in this
process (pcaa_hf.conversion.parity); the command, `pcaa-compare-with-original`, once in a subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ORIGINAL = os.environ.get("PCAA_ORIGINAL_REPO")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_with_original.py"
needs_the_authors_code = pytest.mark.skipif(not ORIGINAL, reason="set PCAA_ORIGINAL_REPO to a checkout of "
                                                                  "lsa1997/PCAA")


@needs_the_authors_code
def test_logits_region_scores_and_losses_match_the_authors_code():
    from pcaa_hf.conversion.parity import CONFIGURATIONS, ParityCheck

    check = ParityCheck(ORIGINAL, tolerance=1e-6)
    rows = check.run()
    assert {row.configuration for row in rows} == set(CONFIGURATIONS)
    assert {"logits", "region_class_scores[0]", "segmentation_loss", "region_loss", "loss"} <= {
        row.output for row in rows}
    # Every baseline: its logits and loss, with and without its auxiliary head.
    baselines = {row.configuration: set() for row in rows if "model" in CONFIGURATIONS[row.configuration]}
    for row in rows:
        if row.configuration in baselines:
            baselines[row.configuration].add(row.output)
    assert len(baselines) == 11 and all({"logits", "segmentation_loss", "loss"} <= outputs
                                        for outputs in baselines.values())
    # Without an auxiliary loss: the three baselines trained without --aux-loss (their ocrnet adds it regardless).
    assert sum("auxiliary_loss" not in outputs for outputs in baselines.values()) == 3
    assert not [row for row in rows if row.failed], check.summary(rows)
    assert all(row.our_rounding is None for row in rows)  # float64: errors against each other only
    assert check.summary(rows).startswith("PASS: largest relative error")


@needs_the_authors_code
def test_float32_rounding_error_is_no_worse_than_the_authors():
    """The command itself: its report and exit status."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--original", ORIGINAL, "--dtype", "float32",
                             "--configs", "r50-cityscapes"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against float64: ours" in result.stdout and "PASS" in result.stdout


@needs_the_authors_code
def test_a_failed_comparison_is_named_in_the_verdict():
    from pcaa_hf.conversion.parity import ParityCheck, ParityRow

    check = ParityCheck(ORIGINAL, dtype=torch.float32)
    rows = [ParityRow("r50-cityscapes", "logits", 0.1, 1.0, 1e-3, 1e-4, check.failed(0.1, 1e-3, 1e-4)),
            ParityRow("r50-cityscapes", "loss", 0.1, 1.0, 1e-4, 1e-4, check.failed(0.1, 1e-4, 1e-4)),
            ParityRow("r50-cityscapes", "region_loss", 0.0, 1.0, 0.0, 0.0, check.failed(0.0, 0.0, 0.0))]
    assert [row.failed for row in rows] == [True, False, False]  # 10x theirs fails; rounding both exactly passes
    assert check.summary(rows) == ("FAIL: our rounding error at most 4x the authors' (+1e-6); failed: "
                                   "r50-cityscapes logits")
    assert ParityCheck(ORIGINAL).failed(float("nan"), None, None)


@needs_the_authors_code
def test_the_benchmark_times_the_authors_training_step_of_the_same_model():
    """Their `Seg_Model`, loss and SGD parameter groups, timed beside ours: the same network, so nearly equal FLOPs."""
    from pcaa_hf.benchmarks.model_speed import ModelCase, authors_model_builder, benchmark_model_case, paper_model

    case = ModelCase("training", 50, 64, 2, "float32", False)
    limits = {"float32": {"size": 256, "kernel": "conv1x1"}}
    builders = {"pcaa_hf": paper_model, "authors": authors_model_builder(ORIGINAL)}
    ours, theirs = benchmark_model_case(case, torch.device("cpu"), limits, calls=1, builders=builders)
    assert theirs["implementation"] == "authors" and theirs["seconds"] > 0
    assert theirs["flops"] == pytest.approx(ours["flops"], rel=0.02)
    assert theirs["peak_memory_bytes"] == pytest.approx(ours["peak_memory_bytes"], rel=0.1)


@needs_the_authors_code
def test_the_recorded_key_names_of_the_authors_heads_are_theirs():
    """tests/fixtures/authors_head_keys.json, which the converter's tests use, is what their code builds."""
    import json

    from pcaa_hf.conversion.original_checkpoints import ORIGINAL_MODELS, import_original

    *networks, _ = import_original(ORIGINAL, (*(f"networks.{model}" for model in ORIGINAL_MODELS), "loss.criterion"))
    recorded = json.loads((Path(__file__).parent / "fixtures" / "authors_head_keys.json").read_text())
    built = {}
    for model, network in zip(ORIGINAL_MODELS, networks):
        for dropout in (False, True):
            for auxiliary in (True, False):
                with torch.device("meta"):
                    seg_model = network.Seg_Model(num_classes=19, backbone="resnet50", aux_loss=auxiliary,
                                                  dropout=dropout, **({"bins": [(4, 4)]} if model == "caanet" else {}))
                built[f"{model} dropout={dropout} aux={auxiliary}"] = {
                    key: list(value.shape) for key, value in seg_model.state_dict().items()
                    if not key.startswith("backbone.")}
    assert built == recorded
