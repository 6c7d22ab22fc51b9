"""Helpers shared by the tests (the session fixtures built with them are in conftest.py)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation, PCAAImageProcessor

# What conftest.py's session fixtures hold; tests whose assertions depend on these numbers can read them here.
# The generated Cityscapes tree of `cityscapes_tree`: write_cityscapes_tree's arguments.
CITYSCAPES_TREE = dict(num_train=4, num_val=2, num_test=1, size=(128, 64), seed=0)
# The generated ADE20K tree of `ade20k_tree` (the data set folder is <tree>/ADEChallengeData2016).
ADE20K_TREE = dict(num_train=3, num_val=2, size=(96, 64), seed=0)
# The saved model of `small_pcaa_folder`: small_labelled_model(SMALL_PCAA_SEED), with these label names.
SMALL_PCAA_LABELS = ("road", "sky", "car", "person", "tree")
SMALL_PCAA_SEED = 3


def small_config(**overrides):
    """A ResNet-18-depth PCAA with a narrow head: fast on 2 CPU cores."""
    settings = dict(backbone_depth=18, hidden_size=64, auxiliary_hidden_size=32, num_labels=5)
    settings.update(overrides)
    return PCAAConfig(**settings)


def small_labelled_config(**overrides):
    """small_config with the five named labels of SMALL_PCAA_LABELS (id2label and label2id)."""
    labels = dict(id2label=dict(enumerate(SMALL_PCAA_LABELS)),
                  label2id={name: index for index, name in enumerate(SMALL_PCAA_LABELS)})
    return small_config(**{**labels, **overrides})


def small_labelled_model(seed=SMALL_PCAA_SEED):
    """A PCAA of small_labelled_config, randomise_weights(seed), in eval mode: the model `small_pcaa_folder` saves."""
    return randomise_weights(PCAAForSemanticSegmentation(small_labelled_config()), seed=seed).eval()


def save_small_pcaa(folder, seed=SMALL_PCAA_SEED):
    """save_pretrained of small_labelled_model(seed) and of a default PCAAImageProcessor into `folder`."""
    small_labelled_model(seed).save_pretrained(folder)
    PCAAImageProcessor().save_pretrained(folder)
    return Path(folder)


def writable_copy(source, target):
    """A copy of a session fixture's folder at `target`, for a test that writes into it."""
    shutil.copytree(source, target)
    return Path(target)


def tree_fingerprint(root):
    """{relative path: (size, mtime_ns)} of every file and folder under `root`: changes when anything is written."""
    root = Path(root)
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*"))}


@torch.no_grad()
def randomise_weights(model, seed=0):
    """Deterministic weights independent of the init code, with BatchNorm statistics that keep activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
        elif name.endswith("running_mean") or name.endswith("bias"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        elif tensor.ndim == 1:
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.0 / tensor[0].numel()) ** 0.5)
    return model


def two_processes_launcher(mixed_precision="no"):
    """
    `python -m ...` arguments launching a script on 2 processes: on CPUs with gloo (run it with ACCELERATE_USE_CPU=1),
    on a machine with 2 GPUs one per GPU with NCCL. `accelerate launch --cpu` starts one process unless MPI is
    installed, hence torchrun's launcher (--multi_gpu).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(port))


def start_script(command, env=None, stdout=subprocess.PIPE):
    """
    Start `command` (a Python script's command line) in its own process group, stdout and stderr together in
    `stdout` (one pipe, or DEVNULL for a run that is killed unread), one OpenMP thread per process. PYTHONFAULTHANDLER
    lets `finish_script` show where a hung run and its workers are.
    """
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, text=True, env=environment,
                            start_new_session=True)


def finish_script(process, timeout=300):
    """
    The output of a `start_script` process that must succeed within `timeout` seconds. A hung run is stopped with
    SIGABRT, so each of its Python processes prints its threads' tracebacks into the failure message; a test stopped
    itself (Ctrl-C, a time limit) takes the run's processes with it.
    """
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGABRT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            output, _ = process.communicate()
        signal_group(process, signal.SIGKILL)  # what the leader left behind
        pytest.fail(f"{process.args} still running after {timeout} s; its output:\n{output[-8000:]}")
    except BaseException:
        signal_group(process, signal.SIGKILL)
        raise
    assert process.returncode == 0, output[-4000:]
    return output


def signal_group(process, signal_number):
    """Send `signal_number` to the process group of a `start_script` process, if any of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal_number)


# Loads a saved folder (argv[1]) with transformers alone, pcaa_hf blocked, and runs it and the image-segmentation
# pipeline on an image (argv[2]); prints a JSON report.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, logging, sys
    import numpy as np, PIL.Image, torch

    class BlockPCAA(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "pcaa_hf" or name.startswith("pcaa_hf."):
                raise ImportError("pcaa_hf is blocked in this process")

    sys.meta_path.insert(0, BlockPCAA())
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)

    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    folder, image_path = sys.argv[1], sys.argv[2]
    try:
        import pcaa_hf  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    image = PIL.Image.open(image_path)
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    result = segmenter(image)
    print(json.dumps({
        "blocked": blocked,
        "model_module": type(model).__module__,
        "processor_module": type(processor).__module__,
        "logits": logits.flatten().tolist(),
        "masks": {entry["label"]: np.array(entry["mask"]).tolist() for entry in result},
        "not_supported": [m for m in messages if "not supported" in m],
    }))
    """
)


def run_without_the_package(folder, image_path, workdir):
    """The JSON report of REMOTE_SCRIPT run on `folder` and `image_path` in a fresh process, offline."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(workdir) / "modules"),
                       HF_HUB_DISABLE_PROGRESS_BARS="1")
    completed = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(image_path)],
                               capture_output=True, text=True, env=environment, cwd=workdir, timeout=600)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])
