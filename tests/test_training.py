"""Training: deterministic batches, the poly schedule, atomic checkpoints, exact resume after SIGKILL, SyncBatchNorm on
CPU processes, a two-process `accelerate launch` run, and `pcaa-train`'s command line (the fields of
`TrainingArguments`, the recipes)."""

import dataclasses
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

from pcaa_hf.cli.train import build_parser
from pcaa_hf.cli.train import main as train_main
from pcaa_hf.data.synthetic import write_cityscapes_tree
from pcaa_hf.training.arguments import TrainingArguments
from pcaa_hf.training.checkpoints import TRAINER_STATE, resolve_checkpoint
from pcaa_hf.training.trainer import epoch_batches, poly_schedule
from pcaa_hf.utils.atomic_folders import write_manifest
from pcaa_testing import finish_script, start_script, two_processes_launcher

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
RECIPES = SCRIPT.parent / "recipes"
REQUIRED = ["--dataset_type", "cityscapes", "--data", "d", "--output_dir", "o"]


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


def parse(*arguments):
    (args,) = build_parser().parse_into_dataclasses(list(arguments))
    return args


def test_the_command_line_is_the_dataclass_with_its_defaults():
    assert parse(*REQUIRED) == TrainingArguments(dataset_type="cityscapes", data="d", output_dir="o")
    parser = build_parser()
    options = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert list(options) == [field.name for field in dataclasses.fields(TrainingArguments)]
    for field in dataclasses.fields(TrainingArguments):
        assert options[field.name].help, f"--{field.name} has no help"
        assert options[field.name].option_strings == [f"--{field.name}"]  # one spelling shown: the snake_case one


@pytest.mark.parametrize("recipe, expected", [
    ("cityscapes_r50.args", dict(dataset_type="cityscapes", backbone_depth=50, multi_grid=False,
                                 per_device_train_batch_size=2, eval_mode="slide", eval_steps=5000,
                                 checkpointing_steps=2000, base_size=[2048, 1024], crop_size=[768, 768],
                                 eval_crop_size=[768, 768])),
    ("cityscapes_r101.args", dict(dataset_type="cityscapes", backbone_depth=101, multi_grid=False,
                                  per_device_train_batch_size=2, eval_mode="slide", eval_steps=5000,
                                  checkpointing_steps=2000, base_size=[2048, 1024], crop_size=[768, 768],
                                  eval_crop_size=[768, 768])),
    ("ade20k_r101.args", dict(dataset_type="ade20k", backbone_depth=101, multi_grid=True,
                              per_device_train_batch_size=4, eval_mode="whole", eval_steps=10000,
                              checkpointing_steps=5000, base_size=[2048, 512], crop_size=[512, 512],
                              max_train_steps=150000)),
])
def test_every_recipe_parses_to_the_papers_settings(recipe, expected):
    args = parse(f"@{RECIPES / recipe}", "--data", "d", "--output_dir", "o")
    common = dict(output_stride=8, bins=[(4, 4)], learning_rate=0.01, momentum=0.9, weight_decay=1e-4,
                  poly_power=0.9, max_train_steps=60000, eval_crop_size=(768, 768), data="d", output_dir="o")
    assert dataclasses.asdict(args) == dataclasses.asdict(TrainingArguments(**{**common, **expected}))
    assert sorted(path.name for path in RECIPES.glob("*.args")) == ["ade20k_r101.args", "cityscapes_r101.args",
                                                                    "cityscapes_r50.args"]


@pytest.mark.parametrize("recipe", ["cityscapes_r50.args", "cityscapes_r101.args"])
def test_the_table_3_baselines_train_with_the_pcaa_recipe_and_their_head(recipe):
    pcaa = parse(f"@{RECIPES / recipe}", "--data", "d", "--output_dir", "o")
    assert "--decode_head_type fcn, aspp, non_local" in (RECIPES / recipe).read_text()
    for head in ("fcn", "aspp", "non_local", "ocr"):
        baseline = parse(f"@{RECIPES / recipe}", "--decode_head_type", head, "--data", "d", "--output_dir", "o")
        assert dataclasses.asdict(baseline) == {**dataclasses.asdict(pcaa), "decode_head_type": head}


def test_options_take_their_values_in_either_spelling():
    args = parse(*REQUIRED, "--bins", "2x2", "4x4", "--base_size", "1024", "512", "--multi_grid", "--use-ohem",
                 "--eval-stride", "256", "384", "--push_to_hub", "false", "--per-device-train-batch-size", "3",
                 "--mixed_precision", "bf16", "--resume_from", "latest")
    assert args.bins == [(2, 2), (4, 4)] and args.base_size == [1024, 512] and args.eval_stride == [256, 384]
    assert args.multi_grid and args.use_ohem and not args.push_to_hub and not args.gradient_checkpointing
    assert (args.per_device_train_batch_size, args.mixed_precision, args.resume_from_checkpoint) == (3, "bf16",
                                                                                                      "latest")
    assert parse("--dataset-type", "ade20k", "--data", "d", "--output-dir", "x").output_dir == "x"


def test_recipe_files_hold_one_option_a_line_with_comments(tmp_path):
    recipe = tmp_path / "small.args"
    recipe.write_text("# a comment line\n--dataset_type ade20k  # the rest of a line too\n--bins 2x2 4x4\n"
                      "--multi_grid\n\n--crop_size 64 64\n")
    args = parse(f"@{recipe}", "--data", "d", "--output_dir", "o", "--crop_size", "32", "48")
    assert (args.dataset_type, args.bins, args.multi_grid, args.crop_size) == ("ade20k", [(2, 2), (4, 4)], True,
                                                                               [32, 48])  # the last one given wins


@pytest.mark.parametrize("arguments, message", [
    (["--max_train_steps", "0"], "error: Invalid training arguments: max_train_steps must be at least 1, got 0."),
    (["--push_to_hub"], "push_to_hub needs hub_model_id"),
    (["--bins", "4"], "argument --bins: a bin grid is ROWSxCOLUMNS with positive integers (e.g. 4x4), got '4'"),
    (["--base_size", "2048"], "argument --base_size: expected 2 arguments"),
    (["--backbone_depth", "152"], "argument --backbone_depth: invalid choice: 152"),
    (["--eval_mode", "sliding"], "argument --eval_mode: invalid choice: 'sliding'"),
    (["--multi_grid", "maybe"], "argument --multi_grid: Truthy value expected"),
    (["--learning_rate", "fast"], "argument --learning_rate: invalid float value: 'fast'"),
    (["--no_such_option"], "unrecognized arguments: --no_such_option"),
])
def test_invalid_arguments_are_reported_by_the_parser_with_their_name(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([*REQUIRED, *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: ") and message in error and "Traceback" not in error


def test_a_required_option_left_out_is_named(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_into_dataclasses(["--data", "d"])
    assert "the following arguments are required: --output_dir, --dataset_type" in capsys.readouterr().err


def test_help_lists_every_option_once_with_its_default_and_the_recipes():
    text = build_parser().format_help()
    for field in dataclasses.fields(TrainingArguments):
        assert text.count(f"--{field.name} ") + text.count(f"--{field.name}\n") >= 1, field.name
    assert "--crop-size" not in text and "--push-to-hub" not in text  # kebab spellings: parsing aliases only
    for heading in ("data:", "model:", "optimisation:", "checkpoints, logging, evaluation:", "publishing:"):
        assert f"\n{heading}\n" in text
    assert "(default: 2048 1024)" in text and "(default: 4x4)" in text and "(default: 60000)" in text
    assert "@scripts/recipes/cityscapes_r50.args" in text


def test_latest_checkpoint_is_the_newest_intact_one(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.partial", "checkpoint-11"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / TRAINER_STATE).write_text("{}")
        write_manifest(checkpoints / name)
    (checkpoints / "checkpoint-11" / TRAINER_STATE).write_text("{")  # damaged after it was completed
    assert resolve_checkpoint("latest", checkpoints) == checkpoints / "checkpoint-10"
    assert "checkpoint-11 is broken and is skipped" in caplog.text and TRAINER_STATE in caplog.text
    assert resolve_checkpoint("latest", tmp_path / "nothing") is None
    with pytest.raises(ValueError, match=f"checkpoint-11/{TRAINER_STATE} has 1 bytes instead of 2"):
        resolve_checkpoint(str(checkpoints / "checkpoint-11"), checkpoints)


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


def run_training(arguments, launcher=(), env=None):
    return start_script([sys.executable, *launcher, str(SCRIPT), *arguments], env)


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
    finish_script(reference)
    assert not (interrupted / "model").exists()

    output = finish_script(run_training(training_arguments(generated_data, interrupted, 8,
                                                           "--resume_from_checkpoint", "latest")))
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


def test_a_baseline_head_trains_evaluates_and_exports_with_its_own_card(generated_data, tmp_path):
    """--decode_head_type: the same run with OCR in the PCAA head's place, its card naming OCR and citing it."""
    output = tmp_path / "ocr"
    assert train_main(training_arguments(generated_data, output, 2, "--decode_head_type", "ocr")) == 0
    config = json.loads((output / "model" / "config.json").read_text())
    assert config["decode_head_type"] == "ocr"
    card = (output / "model" / "README.md").read_text()
    assert card.startswith("---") and "# OCR, ResNet-18," in card and "yuan2020object" in card
    assert "| decode_head_type | ocr |" in card
    results = json.loads((output / "all_results.json").read_text())
    assert results["completed_steps"] == 2 and results["eval_num_images"] == 3


def test_two_cpu_processes_with_sync_batch_norm_checkpoint_resume_and_evaluation(generated_data, tmp_path):
    """`accelerate launch` with 2 gloo processes: SyncBatchNorm, a checkpoint, a resume, each image scored once."""
    launcher = two_processes_launcher()
    output_dir = tmp_path / "two_processes"
    arguments = training_arguments(generated_data, output_dir, 4, "--per_device_train_batch_size", "2")
    first = finish_script(run_training(arguments, launcher, env={"ACCELERATE_USE_CPU": "1"}))
    assert "agree across the 2 processes" in first
    from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation

    model = PCAAForSemanticSegmentation(PCAAConfig(backbone_depth=18, hidden_size=32, auxiliary_hidden_size=16))
    batch_norms = sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert f"SyncBatchNorm: {batch_norms} BatchNorm layers synchronised across 2 processes (cpu)" in first
    uninterrupted = load_file(output_dir / "model" / "model.safetensors")
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")  # as if killed between steps 2 and 4
    arguments = training_arguments(generated_data, output_dir, 4, "--per_device_train_batch_size", "2",
                                   "--resume_from_checkpoint", "latest")
    launcher = two_processes_launcher()
    second = finish_script(run_training(arguments, launcher, env={"ACCELERATE_USE_CPU": "1"}))
    assert "Resumed from" in second and "checkpoint-2" in second and "agree across the 2 processes" in second
    assert second.count("Resumed from") == 1  # logged by the main process only
    resumed = load_file(output_dir / "model" / "model.safetensors")
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["completed_steps"] == 4
    assert results["eval_num_images"] == 3  # 3 validation images over 2 processes: each counted exactly once
    assert (output_dir / "model" / "README.md").is_file()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")


@needs_cuda
def test_cuda_bfloat16_training_resumes_from_its_last_checkpoint(generated_data, tmp_path):
    """
    The GPU path: bfloat16 autocast, checkpoints holding the CUDA generator's state, and a resume after the newest
    checkpoint was lost that ends with the uninterrupted run's weights (within the run-to-run differences of cuDNN's
    kernels, which need not be bitwise reproducible).
    """
    output_dir = tmp_path / "cuda"
    arguments = training_arguments(generated_data, output_dir, 4, "--mixed_precision", "bf16")
    first = finish_script(run_training(arguments))
    assert "on cuda, mixed precision bf16" in first
    uninterrupted = load_file(output_dir / "model" / "model.safetensors")
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")
    second = finish_script(run_training([*arguments, "--resume_from_checkpoint", "latest"]))
    assert "Resumed from" in second and "checkpoint-2" in second
    resumed = load_file(output_dir / "model" / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-2, atol=1e-3, msg=name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_cuda_processes_synchronise_batch_norm_under_bfloat16(generated_data, tmp_path):
    """torch's SyncBatchNorm over NCCL, one process per GPU, bfloat16 autocast, a checkpoint and its resume."""
    output_dir = tmp_path / "two_gpus"
    arguments = training_arguments(generated_data, output_dir, 4, "--per_device_train_batch_size", "2")
    first = finish_script(run_training(arguments, two_processes_launcher("bf16")))
    assert "synchronised across 2 processes (cuda)" in first and "agree across the 2 processes" in first
    assert "on cuda, mixed precision bf16" in first
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")
    second = finish_script(run_training([*arguments, "--resume_from_checkpoint", "latest"],
                                        two_processes_launcher("bf16")))
    assert second.count("Resumed from") == 1 and "agree across the 2 processes" in second


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
    from pcaa_hf.publishing.hub import HubPublisher
    from pcaa_hf.training.trainer import Trainer

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
    from pcaa_hf.training.trainer import Trainer

    with pytest.raises(FileNotFoundError):
        arguments = small_arguments(generated_data, tmp_path / "a", model_card_template=str(tmp_path / "typo.md"))
        Trainer(arguments).prepare()
    assert not (tmp_path / "a" / "checkpoints").exists()

    Trainer(small_arguments(generated_data, tmp_path / "b")).train()
    changed = small_arguments(generated_data, tmp_path / "b", per_device_train_batch_size=2, max_train_steps=4,
                              resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="max_train_steps 2 -> 4; per_device_train_batch_size 4 -> 2"):
        Trainer(changed).prepare()
