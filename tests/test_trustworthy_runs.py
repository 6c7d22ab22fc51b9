"""Runs users can trust: checkpoints that run no code when loaded, one run per output folder, resumes that keep the
run's arguments, divergence, corrupt checkpoints and a full disk ending with one clear message and nothing lost, and a
run killed at random moments resuming to the weights of an uninterrupted one."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation

from pcaa_hf.cli.train import main as train_main
from pcaa_hf.data.synthetic import write_cityscapes_tree
from pcaa_hf.training.arguments import TrainingArguments
from pcaa_hf.training.checkpoints import checkpoint_problems
from pcaa_hf.training.trainer import Trainer, TrainingDivergedError
from pcaa_hf.utils.atomic_folders import write_manifest
from pcaa_hf.utils.folder_lock import FolderInUseError
from pcaa_testing import finish_script, start_script, two_processes_launcher

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
STEPS = 4  # two checkpoints, at steps 2 and 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trustworthy_data")
    write_cityscapes_tree(root, num_train=8, num_val=2, size=(64, 32), seed=1)
    return root


def command_line(data, output, **overrides):
    """The arguments of a 64 px ResNet-18 run, as `pcaa-train` options (`overrides` by field name)."""
    settings = dict(dataset_type="cityscapes", data=data, output_dir=output, backbone_depth=18, output_stride=16,
                    hidden_size=32, auxiliary_hidden_size=16, base_size="64 32", crop_size="32 32", num_workers=0,
                    max_train_steps=STEPS, per_device_train_batch_size=4, checkpointing_steps=2,
                    checkpoints_total_limit=None, learning_rate=0.05, seed=3, logging_steps=2)
    settings.update(overrides)
    return [item for name, value in settings.items() if value is not None
            for item in (f"--{name}", *str(value).split())]


def arguments(data, output, **overrides):
    return TrainingArguments(**{**dict(
        output_dir=str(output), dataset_type="cityscapes", data=str(data), backbone_depth=18, output_stride=16,
        hidden_size=32, auxiliary_hidden_size=16, base_size=(64, 32), crop_size=(32, 32), num_workers=0,
        max_train_steps=STEPS, per_device_train_batch_size=4, checkpointing_steps=2, checkpoints_total_limit=None,
        learning_rate=0.05, seed=3, logging_steps=2), **overrides})


@pytest.fixture(autouse=True)
def _free_the_disk(tmp_path):
    """Each test copies runs of about 300 MB (checkpoints with momentum): remove them once it is done."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A finished run of `arguments` (checkpoints at steps 2 and 4, model/); tests work on copies."""
    output = tmp_path_factory.mktemp("finished") / "run"
    Trainer(arguments(data, output)).train()
    return output


def copy_of(run, target):
    shutil.copytree(run, target)
    return target


def assert_same_weights(folder, expected_folder):
    expected = load_file(expected_folder / "model.safetensors")
    actual = load_file(folder / "model.safetensors")
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


# ---- 1. nothing loaded runs code ------------------------------------------------------------------------------------
class CodeOnLoad:
    """Unpickling this touches `marker`: what a crafted checkpoint file would do with any code."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def craft(path, marker):
    torch.save({"state": CodeOnLoad(marker)}, path)


def test_a_checkpoint_holds_only_safetensors_and_json_and_is_a_model_folder(finished_run):
    checkpoint = finished_run / "checkpoints" / f"checkpoint-{STEPS}"
    names = sorted(path.name for path in checkpoint.iterdir())
    assert names == ["config.json", "manifest.json", "model.safetensors", "optimizer.safetensors",
                     "preprocessor_config.json", "rng_state_0.json", "trainer_state.json"]
    assert checkpoint_problems(checkpoint) == []
    model = AutoModelForSemanticSegmentation.from_pretrained(checkpoint)
    assert_same_weights(checkpoint, finished_run / "model")  # the final export is the last checkpoint's model
    exported_labels = json.loads((finished_run / "model" / "config.json").read_text())["id2label"]
    assert {str(index): name for index, name in model.config.id2label.items()} == exported_labels


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer_state.json",
                                  "rng_state_0.json", "manifest.json"])
def test_resuming_never_unpickles_a_crafted_checkpoint_file(data, finished_run, tmp_path, name):
    """The attacker rewrites the manifest too, so the checksums match: the file is still never unpickled."""
    run = copy_of(finished_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / f"checkpoint-{STEPS}"
    marker = tmp_path / "code_ran"
    craft(checkpoint / name, marker)
    if name != "manifest.json":
        write_manifest(checkpoint)
    resumed = arguments(data, run, resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=f"{checkpoint}/{name}"):
        Trainer(resumed).train()
    assert not marker.exists()


def test_resuming_never_opens_the_pickles_of_accelerate_checkpoints(data, finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / f"checkpoint-{STEPS}"
    marker = tmp_path / "code_ran"
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "pytorch_model.bin"):
        craft(checkpoint / name, marker)
    write_manifest(checkpoint)
    Trainer(arguments(data, run, resume_from_checkpoint=str(checkpoint))).train()
    assert not marker.exists()
    # An accelerate checkpoint of an earlier version (pickles, no manifest) is refused, not unpickled.
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(ValueError, match="pickled accelerate state, which is not loaded"):
        Trainer(arguments(data, run, resume_from_checkpoint=str(checkpoint))).train()
    assert not marker.exists()


def test_loading_models_and_converting_checkpoints_never_unpickles(data, finished_run, tmp_path, capsys):
    from pcaa_hf.cli.convert_backbone import main as convert_backbone
    from pcaa_hf.cli.convert_original import main as convert_original
    from pcaa_hf.cli.evaluate import main as evaluate

    marker = tmp_path / "code_ran"
    folder = copy_of(finished_run / "model", tmp_path / "model")
    (folder / "model.safetensors").unlink()
    craft(folder / "pytorch_model.bin", marker)  # transformers loads .bin weights with weights_only=True
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        AutoModelForSemanticSegmentation.from_pretrained(folder)
    assert evaluate(["--model", str(folder), "--dataset", "cityscapes", "--data", str(data),
                     "--output_dir", str(tmp_path / "evaluation")]) == 2
    refusal = "which could run code when loaded: refused (Unsupported global: GLOBAL getattr was not an allowed global"
    assert f"are a pickle holding objects other than tensors, {refusal}" in capsys.readouterr().err
    craft(tmp_path / "original.pth", marker)
    assert convert_backbone(["--checkpoint", str(tmp_path / "original.pth"), "--depth", "18",
                             "--output", str(tmp_path / "backbone.safetensors")]) == 2
    assert convert_original(["--checkpoint", str(tmp_path / "original.pth"), "--output", str(tmp_path / "converted"),
                             "--backbone", "resnet50", "--num_labels", "19"]) == 2
    assert capsys.readouterr().err.count(f"holds objects other than tensors, {refusal}") == 2
    with pytest.raises(ValueError):
        Trainer(arguments(data, tmp_path / "run", pretrained_backbone=str(tmp_path / "original.pth"))).train()
    assert not marker.exists()


# ---- 2. one run per output folder --------------------------------------------------------------------------------
def hold_lock(folder):
    """Another process holding `folder`'s lock (as a running training would); returns it once the lock is held."""
    code = (f"from pcaa_hf.utils.folder_lock import FolderLock; import time; FolderLock({str(folder)!r}).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_run_per_output_folder_and_a_killed_runs_lock_is_free(data, tmp_path, capsys):
    output = tmp_path / "run"
    holder = hold_lock(output)
    try:
        with pytest.raises(FolderInUseError, match=f'{output} is in use by another process .*"pid": {holder.pid}'):
            Trainer(arguments(data, output)).train()
        assert train_main(command_line(data, output)) == 2
        assert capsys.readouterr().err.startswith(f"error: {output} is in use by another process")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (output / "checkpoints").exists()
    Trainer(arguments(data, output, max_train_steps=1)).train()  # the killed holder's lock is free
    assert (output / "model" / "model.safetensors").is_file()


def test_with_two_processes_a_refusal_on_one_stops_both(data, tmp_path):
    """The main process cannot take the folder: the other one stops too, rather than waiting for it forever."""
    output = tmp_path / "run"
    holder = hold_lock(output)
    try:
        command = [sys.executable, *two_processes_launcher(), str(SCRIPT), *command_line(data, output)]
        process = subprocess.run(command, capture_output=True, text=True, timeout=240,
                                 env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert process.returncode != 0
    assert f"error: {output} is in use by another process" in process.stderr
    assert "error: Stopped because another process failed: FolderInUseError" in process.stderr


def test_a_fresh_run_refuses_a_folder_holding_another_run(data, finished_run, tmp_path, caplog):
    run = copy_of(finished_run, tmp_path / "run")
    with pytest.raises(FileExistsError, match="holds another run .*--resume_from_checkpoint latest.*"
                                              "--overwrite_output_dir"):
        Trainer(arguments(data, run, learning_rate=0.1)).train()
    Trainer(arguments(data, run, learning_rate=0.1, max_train_steps=2, overwrite_output_dir=True)).train()
    with pytest.raises(FileNotFoundError):  # a run that cannot start leaves the folder to the next one
        Trainer(arguments(tmp_path / "no_data", tmp_path / "new")).train()
    Trainer(arguments(data, tmp_path / "new", max_train_steps=1)).train()
    assert "--overwrite_output_dir: deleting checkpoints, best, model, all_results.json, run.json" in caplog.text
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((run / "run.json").read_text())["arguments"]["learning_rate"] == 0.1


# ---- 3. a resumed run keeps its arguments -------------------------------------------------------------------------
def test_resuming_refuses_every_changed_argument_by_name(data, finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path / "run")
    changes = dict(learning_rate=0.1, momentum=0.8, weight_decay=0.0, crop_size=(48, 48), output_stride=8,
                   classifier_dropout=0.1, backbone_depth=50, hidden_size=64, bins=[(2, 2)])
    with pytest.raises(ValueError) as refused:
        Trainer(arguments(data, run, resume_from_checkpoint="latest", **changes)).train()
    assert json.loads((run / "run.json").read_text())["arguments"]["learning_rate"] == 0.05  # a refusal writes nothing
    message = str(refused.value)
    for name, value in changes.items():
        assert f"{name} " in message and f"-> {json.loads(json.dumps(value))!r}" in message, name
    assert "--model_name_or_path" in message
    # Allowed: how often to log, evaluate and checkpoint, the workers.
    Trainer(arguments(data, run, resume_from_checkpoint="latest", logging_steps=1, checkpointing_steps=1,
                      eval_steps=1, num_workers=1)).train()
    # A run killed before its first checkpoint is started again only with the same arguments.
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ValueError, match="learning_rate 0.05 -> 0.1"):
        Trainer(arguments(data, run, resume_from_checkpoint="latest", learning_rate=0.1)).train()


# ---- 4. divergence -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [("learning_rate", "nan"), ("learning_rate", "inf"),
                                           ("learning_rate", "0"), ("poly_power", "0"), ("poly_power", "-1")])
def test_non_finite_or_non_positive_rates_are_refused_by_name(data, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit):
        train_main(command_line(data, tmp_path / "run", **{option: value}))
    assert f"{option} must be a positive finite number, got {float(value)}" in capsys.readouterr().err


def test_a_diverging_loss_stops_the_run_at_its_step_naming_the_terms(data, tmp_path, capsys):
    output = tmp_path / "run"
    assert train_main(command_line(data, output, learning_rate="1e6", max_train_steps=8)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: Training diverged at step 3: the loss is no longer finite (loss nan")
    assert f"the newest checkpoint is {output}/checkpoints/checkpoint-2" in error
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert all(torch.isfinite(tensor).all() for tensor in load_file(
        output / "checkpoints" / "checkpoint-2" / "model.safetensors").values())
    assert not (output / "model").exists()


def test_non_finite_weights_are_never_written_into_a_checkpoint(data, tmp_path):
    """The last update makes the weights NaN (no forward pass after it sees the loss): its checkpoint is refused."""
    trainer = Trainer(arguments(data, tmp_path / "run", max_train_steps=2, checkpointing_steps=1))
    trainer.prepare()
    parameter = next(trainer.model.parameters())

    def second_update_makes_nan(optimizer, args, kwargs):
        if trainer.state["completed_steps"] == 1:
            parameter.data.fill_(float("nan"))

    trainer.optimizer.optimizer.register_step_post_hook(second_update_makes_nan)
    with pytest.raises(TrainingDivergedError, match="diverged by step 2: .* weight tensors are no longer finite"
                                                    ".*checkpoint-2 was not written; the newest checkpoint is .*"
                                                    "checkpoint-1"):
        trainer.train()
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-1"]


# ---- 5. a corrupt newest checkpoint ------------------------------------------------------------------------------
def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "model.safetensors": truncate,
    "optimizer.safetensors": lambda path: path.write_bytes(b""),
    "trainer_state.json": lambda path: path.write_text('{"completed_steps": '),
    "rng_state_0.json": lambda path: path.write_text("[]"),
    "manifest.json": lambda path: path.unlink(),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_is_skipped_and_the_resume_stays_exact(data, finished_run, tmp_path, name,
                                                                           caplog):
    caplog.set_level(logging.INFO)
    run = copy_of(finished_run, tmp_path / "run")
    CORRUPTIONS[name](run / "checkpoints" / f"checkpoint-{STEPS}" / name)
    Trainer(arguments(data, run, resume_from_checkpoint="latest")).train()
    assert f"checkpoint-{STEPS} is broken and is skipped: {run}/checkpoints/checkpoint-{STEPS}/{name}" in caplog.text
    assert f"Resumed from {run}/checkpoints/checkpoint-2 at step 2" in caplog.text
    assert_same_weights(run / "model", finished_run / "model")


def test_no_intact_checkpoint_is_refused_naming_each_broken_file(data, finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path / "run")
    for step in (2, STEPS):
        truncate(run / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
    with pytest.raises(ValueError, match="No intact checkpoint .*checkpoint-4 .*model.safetensors has .* bytes "
                                         "instead of .*checkpoint-2 .*model.safetensors"):
        Trainer(arguments(data, run, resume_from_checkpoint="latest")).train()


# ---- 6. a full disk and interrupted writes -----------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size in MiB, or read-only (needs root, as in CI's containers); unmounted after."""
    mounts = []

    def mount(mebibytes, read_only=False):
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        options = f"size={mebibytes}m" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=True)


def test_a_full_disk_during_a_checkpoint_ends_with_one_message_keeping_the_earlier_ones(data, finished_run,
                                                                                      small_disk, capsys):
    checkpoint_size = sum(path.stat().st_size for path in (finished_run / "checkpoints" / "checkpoint-2").iterdir())
    output = small_disk(int(1.6 * checkpoint_size / 2**20)) / "run"  # room for one checkpoint and a half
    assert train_main(command_line(data, output)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: Could not write {output}/checkpoints/checkpoint-4 (")
    assert "No space left on device" in error and "the partial checkpoint was removed; kept: checkpoint-2" in error
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert checkpoint_problems(output / "checkpoints" / "checkpoint-2") == []


def test_a_full_disk_during_an_export_leaves_no_partial_folder(data, finished_run, small_disk, capsys):
    model_size = (finished_run / "model" / "model.safetensors").stat().st_size
    output = small_disk(int(0.5 * model_size / 2**20)) / "run"
    assert train_main(command_line(data, output, max_train_steps=1, checkpointing_steps=None)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: Could not write {output}/best (") and "No space left on device" in error
    assert sorted(path.name for path in output.iterdir()) == [".lock", "run.json"]


def test_an_unusable_output_folder_or_crop_is_one_error_line(data, small_disk, tmp_path, capsys):
    (tmp_path / "a_file").touch()
    read_only = small_disk(1, read_only=True) / "run"
    cases = {tmp_path / "a_file": f"{tmp_path / 'a_file'} exists and is not a folder.",
             tmp_path / "a_file" / "run": f"Cannot write in {tmp_path / 'a_file' / 'run'}: Not a directory.",
             read_only: f"Cannot write in {read_only}: Read-only file system."}
    for output, message in cases.items():
        assert train_main(command_line(data, output)) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    with pytest.raises(SystemExit):
        train_main(command_line(data, tmp_path / "run", crop_size="100000 100000"))
    assert "crop_size (100000, 100000) is larger than any rescaled image" in capsys.readouterr().err


def test_writes_interrupted_by_a_kill_are_cleaned_up_at_the_next_start(data, finished_run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = copy_of(finished_run, tmp_path / "run")
    (run / ".model.new.x1y2").mkdir()  # the staging folder of an export killed while writing
    (run / "model").rename(run / ".model.old.z3")  # killed between an export's two renames: model/ moved aside
    (run / "checkpoints" / ".checkpoint-6.partial").mkdir()
    trainer = Trainer(arguments(data, run, resume_from_checkpoint="latest"))
    trainer.prepare()
    trainer.lock.release()
    assert sorted(path.name for path in run.iterdir()) == [".lock", "all_results.json", "best", "checkpoints",
                                                           "model", "run.json"]
    assert not (run / "checkpoints" / ".checkpoint-6.partial").exists()
    assert "Cleaned up .model.new.x1y2" in caplog.text and "Cleaned up .model.old.z3" in caplog.text


# ---- 9. fine-tuning on another label set --------------------------------------------------------------------------
def test_fine_tuning_on_other_label_names_exports_the_data_sets_names(data, finished_run, tmp_path, caplog):
    start = copy_of(finished_run / "model", tmp_path / "start")
    config = json.loads((start / "config.json").read_text())
    dataset_names = dict(config["id2label"])
    config["id2label"] = {index: f"old_{index}" for index in config["id2label"]}
    config["label2id"] = {name: int(index) for index, name in config["id2label"].items()}
    (start / "config.json").write_text(json.dumps(config))
    Trainer(arguments(data, tmp_path / "run", model_name_or_path=str(start), max_train_steps=1,
                      checkpointing_steps=None)).train()
    exported = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert exported["id2label"] == dataset_names
    assert f"renamed after the data set (0: old_0 -> {dataset_names['0']}" in caplog.text


# ---- fault injection ----------------------------------------------------------------------------------------------
def where_killed(run, since):
    """What a run started at `since` (time.time()) was doing when killed, read from the half-written files it left."""

    def written_since(pattern):
        found = []
        for path in run.glob(pattern):
            try:
                found += [path] if path.stat().st_mtime >= since else []
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
        return found

    if written_since("checkpoints/.checkpoint-*.partial"):
        return "writing a checkpoint"
    if written_since(".model.new.*") or written_since(".best.new.*"):
        return "writing an export"
    return "training" if list(run.glob("checkpoints/checkpoint-*")) else "starting"


@pytest.mark.slow
def test_killed_at_random_moments_the_run_resumes_to_the_weights_of_an_uninterrupted_one(data, tmp_path):
    """
    SIGKILLs at random times (seeded; PCAA_FAULT_INJECTION_KILLS of them, default 4; every other one at a random
    moment of a checkpoint or export write), each followed by a resume: the run ends with the uninterrupted run's
    weights and best model.
    """
    kills = int(os.environ.get("PCAA_FAULT_INJECTION_KILLS", "4"))

    def start(output, *extra, stdout=subprocess.PIPE):
        command = [sys.executable, str(SCRIPT), *command_line(data, output, max_train_steps=8, checkpointing_steps=1,
                                                              eval_steps=3), *extra]
        return start_script(command, stdout=stdout)

    finish_script(start(tmp_path / "reference"), timeout=600)
    rng = random.Random(18)
    run, moments = tmp_path / "killed", []
    for attempt in range(3 * kills):
        if len(moments) == kills:
            break
        started = time.time()
        process = start(run, *(["--resume_from_checkpoint", "latest"] if attempt else []), stdout=subprocess.DEVNULL)
        if len(moments) % 2:  # every other kill aims at a write: a random moment after one begins
            while process.poll() is None and where_killed(run, started).startswith(("training", "starting")):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(3.0, 9.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            moments.append(where_killed(run, started))
    assert len(moments) == kills, f"only {len(moments)} kills landed before the run ended"
    finish_script(start(run, "--resume_from_checkpoint", "latest"), timeout=600)
    print(f"{kills} kills:", {moment: moments.count(moment) for moment in sorted(set(moments))})
    assert_same_weights(run / "model", tmp_path / "reference" / "model")
    assert_same_weights(run / "best", tmp_path / "reference" / "best")
    assert not list(run.rglob("*.partial")) and not list(run.glob(".model.*")) and not list(run.glob(".best.*"))
