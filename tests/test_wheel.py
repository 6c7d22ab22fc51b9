"""The wheel, installed with its dependencies in a fresh virtual environment, runs the workflow through its commands.

The wheel is built from a copy of the checkout's files (tracked and untracked, less what .gitignore ignores), so the
checkout's own build/ and *.egg-info/ can neither put stale modules into it nor be written to by this test. The
commands run in a folder outside the checkout with a clean environment (no PYTHONPATH, offline, a private HF_HOME),
so whatever they import comes from the installed wheel. Installing torch and the dependencies takes about a minute
on a 2-core machine (pip reads them from its configured indexes and cache), the commands about another.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from huggingface_hub import ModelCard

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the version whose CPU wheel pip finds on local disk
CODE_FILES = ("configuration_pcaa.py", "modeling_pcaa.py", "backbone_pcaa.py", "loss_pcaa.py",
              "image_processing_pcaa.py")
TRAIN_ARGUMENTS = ("--dataset_type", "cityscapes", "--data", "data", "--output_dir", "run", "--backbone_depth", "18",
                   "--output_stride", "16", "--hidden_size", "32", "--auxiliary_hidden_size", "16",
                   "--base_size", "64", "32", "--crop_size", "32", "32", "--max_train_steps", "2",
                   "--per_device_train_batch_size", "2", "--num_workers", "0")
# What the installed interpreter reports about the package it imports.
REPORT = """
import json, sys, sysconfig, pcaa_hf
from importlib.metadata import entry_points
from importlib.resources import files
scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.dist.name in ("pcaa_hf", "pcaa-hf")}
for script in scripts.values():
    module, _, function = script.partition(":")
    getattr(__import__(module, fromlist=[function]), function)
templates = sorted(p.name for p in files("pcaa_hf.model_cards").iterdir() if p.name.endswith(".md"))
print(json.dumps({"prefix": sys.prefix, "purelib": sysconfig.get_paths()["purelib"], "file": pcaa_hf.__file__,
                  "path": sys.path, "scripts": scripts, "templates": templates}))
"""


def clean_environment(home):
    """This process's environment without PYTHONPATH, virtualenv or Hugging Face settings; offline, HF_HOME in home."""
    # Bytecode is written (into the throwaway venv only): the venv is installed --no-compile and each command would
    # otherwise compile torch's and transformers' modules again.
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    environment = {key: value for key, value in os.environ.items()
                   if key not in dropped and not key.startswith(("HF_", "HUGGINGFACE"))}
    return dict(environment, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(home / "hf_home"))


def run(command, cwd, environment, timeout=600):
    """Run command; fail with its output unless it exits 0."""
    command = [str(part) for part in command]
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(command)} (in {cwd}) exited {result.returncode}\n"
                                    f"--- stdout:\n{result.stdout[-6000:]}\n--- stderr:\n{result.stderr[-6000:]}")
    return result


def timed(timings, name, function, *arguments, **keywords):
    start = time.perf_counter()
    result = function(*arguments, **keywords)
    timings[name] = time.perf_counter() - start
    return result


def copy_source(destination):
    """The checkout's files as a fresh clone plus its uncommitted work would have them."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():  # a file deleted but not yet staged is listed too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).write_bytes((REPO / name).read_bytes())
    return destination


@pytest.fixture(scope="module")
def timings():
    timings = {}
    yield timings
    print("\ntest_wheel timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("wheel")
    assert REPO not in home.resolve().parents, f"the temporary folder {home} lies inside the checkout {REPO}"
    return home


@pytest.fixture(scope="module")
def venv(home, timings):
    """A fresh virtual environment with torch and the checkout's wheel (and its dependencies) installed."""
    environment = clean_environment(home)
    source = copy_source(home / "source")
    build = timed(timings, "wheel build", run, [sys.executable, "-m", "pip", "wheel", "--no-deps",
                                                "--no-build-isolation", source, "-w", home / "dist"], home, environment)
    wheels = list((home / "dist").glob("pcaa_hf-*.whl"))
    assert len(wheels) == 1, f"expected one pcaa_hf wheel in {home / 'dist'}, got {wheels}\n{build.stdout}"
    timed(timings, "venv creation", run, [sys.executable, "-m", "venv", home / "venv"], home, environment)
    python = home / "venv" / "bin" / "python"
    # --no-compile: byte-compiling all of torch & co. costs more CPU than the rest of the install; imports do it lazily.
    install = [python, "-m", "pip", "install", "--no-compile", TORCH, wheels[0]]
    timed(timings, "install", run, install, home, environment, timeout=1800)
    run([python, "-m", "pip", "check"], home, environment)
    return home / "venv"


def test_the_venv_imports_the_installed_wheel(venv, home):
    work = home / "report"
    work.mkdir()
    result = run([venv / "bin" / "python", "-c", REPORT], work, clean_environment(home))
    report = json.loads(result.stdout.splitlines()[-1])
    assert Path(report["prefix"]).resolve() == venv.resolve(), report
    assert Path(report["file"]).is_relative_to(report["purelib"]), f"pcaa_hf imported from {report['file']}"
    leaked = [entry for entry in report["path"] if entry and Path(entry).resolve().is_relative_to(REPO)]
    assert not leaked, f"the checkout is on the installed interpreter's sys.path: {leaked}"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert report["scripts"] == declared, "installed console scripts differ from pyproject.toml's [project.scripts]"
    assert all((venv / "bin" / name).is_file() for name in declared), sorted(p.name for p in (venv / "bin").iterdir())
    source = home / "source"  # the copy the wheel was built from
    templates = sorted(p.name for p in (source / "model_cards").glob("*.md"))
    assert report["templates"] == templates, "the wheel's pcaa_hf.model_cards differs from model_cards/*.md"
    modules = {p.relative_to(source / "pcaa_hf").as_posix() for p in (source / "pcaa_hf").rglob("*.py")}
    modules |= {f"model_cards/{p.name}" for p in (source / "model_cards").glob("*.py")}
    installed_root = Path(report["file"]).parent
    installed = {p.relative_to(installed_root).as_posix() for p in installed_root.rglob("*.py")}
    assert installed == modules, (f"the wheel lacks {sorted(modules - installed)} and has extra "
                                  f"{sorted(installed - modules)} (pyproject.toml's packages / package-data)")


def test_workflow_through_the_console_scripts(venv, home, timings):
    work, environment, bin_folder = home / "work", clean_environment(home), venv / "bin"
    work.mkdir()
    help_text = run([bin_folder / "pcaa-make-synthetic-cityscapes", "--help"], work, environment).stdout
    assert "--output" in help_text and "--size" in help_text, help_text
    make_data = [bin_folder / "pcaa-make-synthetic-cityscapes", "--output", "data", "--num-train", "4",
                 "--num-val", "2", "--size", "64", "32"]
    timed(timings, "make-synthetic", run, make_data, work, environment)
    assert len(list((work / "data" / "leftImg8bit" / "val").rglob("*.png"))) == 2

    train = timed(timings, "train", run, [bin_folder / "pcaa-train", *TRAIN_ARGUMENTS], work, environment)
    model = work / "run" / "model"
    missing = [name for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                                 *CODE_FILES) if not (model / name).is_file()]
    assert not missing, f"{model} lacks {missing}: {sorted(p.name for p in model.iterdir())}\n{train.stderr[-3000:]}"
    trained = json.loads((work / "run" / "all_results.json").read_text())
    check_model_card(model / "README.md", trained["eval_mean_iou"])

    evaluation = timed(timings, "evaluate", run, [bin_folder / "pcaa-evaluate", "--model", model, "--dataset",
                                                  "cityscapes", "--data", "data", "--mode", "whole",
                                                  "--output-dir", "eval"], work, environment)
    results = json.loads((work / "eval" / "results.json").read_text())
    assert results["mean_iou"] == pytest.approx(trained["eval_mean_iou"], abs=1e-6), (
        f"pcaa-evaluate's mIoU {results['mean_iou']} differs from the training run's {trained['eval_mean_iou']} on the"
        f" same model and split\n{evaluation.stdout[-3000:]}")

    export_model = [bin_folder / "pcaa-export", "--model", model, "--format", "dynamo", "--output-dir", "exported",
                    "--example-size", "32", "64"]
    export = timed(timings, "export", run, export_model, work, environment)
    exported = work / "exported"
    assert (exported / "model.pt2").is_file(), f"{sorted(p.name for p in exported.iterdir())}\n{export.stdout}"
    description = json.loads((exported / "export.json").read_text())
    assert description["export_format"] == "dynamo", f"{description}\n{export.stdout}"


def check_model_card(path, mean_iou):
    """A rendered card: no Jinja left, the Hub metadata of the run's data and mIoU, the mIoU in the text."""
    text = path.read_text()
    leftovers = re.findall(r".*(?:\{\{|\}\}|\{%|%\}).*", text)
    assert not leftovers, f"unrendered Jinja in {path}: {leftovers[:5]}"
    card = ModelCard.load(path)
    results = {result.metric_type: result for result in card.data.eval_results or []}
    assert "mean_iou" in results, f"no mean_iou in the card's model-index:\n{card.data.to_yaml()}"
    assert results["mean_iou"].metric_value == pytest.approx(mean_iou), card.data.to_yaml()
    assert "Cityscapes" in results["mean_iou"].dataset_name, card.data.to_yaml()
    assert "mIoU" in text and f"{100 * mean_iou:.2f}" in text, f"the card does not state mIoU {mean_iou}:\n{text}"
    assert "`data`" in text, f"the card does not name the data folder:\n{text}"
