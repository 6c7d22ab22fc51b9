"""Training: deterministic batches, the poly schedule, atomic checkpoints, exact resume after SIGKILL, SyncBatchNorm on
CPU processes, and a two-process `accelerate launch` run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pcaa_hf.synthetic import write_cityscapes_tree
from pcaa_hf.training import TRAINER_STATE, TrainingArguments, epoch_batches, poly_schedule, resolve_checkpoint

from pcaa_testing import two_cpu_processes_launcher

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_epoch_batches_partition_each_epoch_and_are_reproducible(num_processes):
    shares = [epoch_batches(23, 3, num_processes, rank, seed=5, epoch=2) for rank in range(num_processes)]
    per_epoch = 23 // (3 * num_processes)
    assert all(len(share) == per_epoch for share in shares)
    indices = [index for share in shares for batch in share for epoch, index in batch]
    assert len(indices) == len(set(indices)) == per_epoch * 3 * num_processes  # the incomplete last batch dropped
    assert all(epoch == 2 for share in shares for batch in share for epoch, _ in batch)
    assert shares[0] == epoch_batches(23, 3, num_processes, 0, seed=5, epoch=2)
    assert shares[0] != epoch_batches(23, 3, num_processes, 0, seed=5, epoch=3)


def test_poly_schedule_is_the_authors_per_iteration_decay():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = poly_schedule(optimizer, max_steps=100, power=0.9)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.01) and rates[50] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert rates[99] == pytest.approx(0.01 * 0.01 ** 0.9)


def test_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="max_train_steps must be at least 1"):
        TrainingArguments(output_dir="x", dataset_type="cityscapes", data="d", max_train_steps=0)
    with pytest.raises(ValueError, match="push_to_hub needs hub_model_id"):
        TrainingArguments(output_dir="x", dataset_type="cityscapes", data="d", push_to_hub=True)
    with pytest.raises(ValueError, match="pretrained_backbone and model_name_or_path"):
        TrainingArguments(output_dir="x", dataset_type="cityscapes", data="d", pretrained_backbone="r50.pth",
                          model_name_or_path="pcaa-r50")


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), (".checkpoint-12.partial", True),
                           ("checkpoint-11", False)):
        (checkpoints / name).mkdir(parents=True)
        if complete:
            (checkpoints / name / TRAINER_STATE).write_text("{}")
    assert resolve_checkpoint("latest", tmp_path) == checkpoints / "checkpoint-10"
    assert resolve_checkpoint("latest", tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="checkpoint-11 is not a complete checkpoint"):
        resolve_checkpoint(str(checkpoints / "checkpoint-11"), tmp_path)


@pytest.fixture(scope="module")
def generated_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_data")
    write_cityscapes_tree(root, num_train=12, num_val=3, size=(64, 32), seed=1)
    return root


def training_arguments(data, output, steps, *extra):
    return ["--dataset_type", "cityscapes", "--data", str(data), "--output_dir", str(output),
            "--backbone_depth", "18", "--hidden_size", "32", "--auxiliary_hidden_size", "16",
            "--base_size", "64", "32", "--crop_size", "32", "32", "--per_device_train_batch_size", "4",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
            "--logging_steps", "2", "--num_workers", "0", "--learning_rate", "0.05", "--seed", "3", *extra]


def run_training(arguments, launcher=(), env=None, **kwargs):
    command = [sys.executable, *launcher, str(SCRIPT), *arguments]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def test_resume_after_sigkill_ends_with_the_weights_of_an_uninterrupted_run(generated_data, tmp_path):
    """Eight steps (three epochs of 3 batches, crossing epoch boundaries), killed after the step-4 checkpoint."""
    uninterrupted = tmp_path / "uninterrupted"
    interrupted = tmp_path / "interrupted"
    reference = run_training(training_arguments(generated_data, uninterrupted, 8))
    victim = run_training(training_arguments(generated_data, interrupted, 8))
    deadline = time.monotonic() + 300
    while not (interrupted / "checkpoints" / "checkpoint-4" / TRAINER_STATE).is_file():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finish(reference)
    assert not (interrupted / "model").exists()

    output = finish(run_training(training_arguments(generated_data, interrupted, 8, "--resume_from_checkpoint",
                                                    "latest")))
    assert "Resumed from" in output
    expected = load_file(uninterrupted / "model" / "model.safetensors")
    resumed = load_file(interrupted / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
    # Only complete checkpoints under their final names, the last two kept.
    assert sorted(path.name for path in (interrupted / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-8"]
    results = json.loads((interrupted / "all_results.json").read_text())
    assert results["completed_steps"] == 8 and results["eval_num_images"] == 3


def test_two_cpu_processes_with_sync_batch_norm_checkpoint_resume_and_evaluation(generated_data, tmp_path):
    """`accelerate launch` with 2 gloo processes: SyncBatchNorm, a checkpoint, a resume, each image scored once."""
    launcher = two_cpu_processes_launcher()
    output_dir = tmp_path / "two_processes"
    arguments = training_arguments(generated_data, output_dir, 4, "--per_device_train_batch_size", "2")
    first = finish(run_training(arguments, launcher, env={"ACCELERATE_USE_CPU": "1"}))
    assert "agree across the 2 processes" in first
    from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation

    model = PCAAForSemanticSegmentation(PCAAConfig(backbone_depth=18, hidden_size=32, auxiliary_hidden_size=16))
    batch_norms = sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert f"SyncBatchNorm: {batch_norms} BatchNorm layers synchronised across 2 processes (cpu)" in first
    uninterrupted = load_file(output_dir / "model" / "model.safetensors")
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")  # as if killed between steps 2 and 4
    arguments = training_arguments(generated_data, output_dir, 4, "--per_device_train_batch_size", "2",
                                   "--resume_from_checkpoint", "latest")
    launcher = two_cpu_processes_launcher()
    second = finish(run_training(arguments, launcher, env={"ACCELERATE_USE_CPU": "1"}))
    assert "Resumed from" in second and "checkpoint-2" in second and "agree across the 2 processes" in second
    assert second.count("Resumed from") == 1  # logged by the main process only
    resumed = load_file(output_dir / "model" / "model.safetensors")
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["completed_steps"] == 4
    assert results["eval_num_images"] == 3  # 3 validation images over 2 processes: each counted exactly once
    assert (output_dir / "model" / "README.md").is_file()


def test_main_job_runs_end_to_end_and_exports_a_model_card(tmp_path):
    """The README's main job, shortened: generated data -> training -> evaluation -> export with a model card."""
    script = SCRIPT.parent / "main_job.py"
    process = subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path / "job"), "--num_train", "8",
                              "--num_val", "2", "--max_train_steps", "2"], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stderr[-4000:]
    assert "validation mIoU" in process.stdout and str(tmp_path / "job" / "model") in process.stdout
    card = (tmp_path / "job" / "model" / "README.md").read_text()
    assert "generated" in card.lower() and "mean_iou" in card
    assert (tmp_path / "job" / "model" / "model.safetensors").is_file()


class UnreachableHub:
    """An HfApi stand-in whose uploads fail until `online` is set."""

    def __init__(self):
        self.online, self.uploads = False, []

    def create_repo(self, repo_id, **kwargs):
        if not self.online:
            raise ConnectionError("Hub unreachable")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        if not self.online:
            raise ConnectionError("Hub unreachable")
        self.uploads.append((repo_id, Path(folder_path).name))


def test_unreachable_hub_never_stops_training_and_uploads_are_retried_at_the_end(generated_data, tmp_path):
    from pcaa_hf.publishing import HubPublisher
    from pcaa_hf.training import Trainer

    hub = UnreachableHub()
    publisher = HubPublisher("you/pcaa-test", api=hub, attempts=2, sleep=lambda seconds: None)
    original_retry = publisher.retry_pending

    def retry_once_back_online():
        hub.online = True
        return original_retry()

    publisher.retry_pending = retry_once_back_online
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"), dataset_type="cityscapes", data=str(generated_data), backbone_depth=18,
        hidden_size=32, auxiliary_hidden_size=16, base_size=(64, 32), crop_size=(32, 32), num_workers=0,
        max_train_steps=2, per_device_train_batch_size=4, with_tracking=True, logging_steps=1,
        push_to_hub=True, hub_model_id="you/pcaa-test")
    metrics = Trainer(arguments, publisher=publisher).train()
    assert metrics["num_images"] == 3
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert ("you/pcaa-test", "model") in hub.uploads  # failed during training, uploaded by the retry at the end
    assert list((tmp_path / "run").rglob("events.out.tfevents*")), "no tensorboard event file"


def small_arguments(data, output, **overrides):
    settings = dict(output_dir=str(output), dataset_type="cityscapes", data=str(data), backbone_depth=18,
                    hidden_size=32, auxiliary_hidden_size=16, base_size=(64, 32), crop_size=(32, 32), num_workers=0,
                    max_train_steps=2, per_device_train_batch_size=4, checkpointing_steps=2)
    settings.update(overrides)
    return TrainingArguments(**settings)


def test_setup_refuses_a_broken_template_and_a_changed_run_before_training(generated_data, tmp_path):
    from pcaa_hf.training import Trainer

    with pytest.raises(FileNotFoundError):
        Trainer(small_arguments(generated_data, tmp_path / "a", model_card_template=str(tmp_path / "typo.md"))).prepare()
    assert not (tmp_path / "a" / "checkpoints").exists()

    Trainer(small_arguments(generated_data, tmp_path / "b")).train()
    changed = small_arguments(generated_data, tmp_path / "b", per_device_train_batch_size=2, max_train_steps=4,
                              resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="per_device_train_batch_size from 4 to 2.*max_train_steps from 2 to 4"):
        Trainer(changed).prepare()
