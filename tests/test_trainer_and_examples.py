"""
PCAA under `transformers.Trainer` and under transformers' two semantic-segmentation example scripts
(`examples/pytorch/semantic-segmentation/run_semantic_segmentation.py` and `..._no_trainer.py`), all offline.

The example scripts are not part of the transformers package: set `PCAA_TRANSFORMERS_EXAMPLES` to a folder holding
them (a transformers checkout, or its `examples/pytorch/semantic-segmentation` folder); their tests skip otherwise.
They also need `albumentations`. The scripts run unmodified in a subprocess, through a small wrapper that
- answers `huggingface_hub.hf_hub_download(<data set folder>, "id2label.json")` with the data set folder's own file
  (the scripts fetch the label names from the data set's Hub repository);
- sends `evaluate.load("mean_iou")` to pcaa_hf's offline copy of the metric
  (`pcaa_hf.evaluation.metrics.EVALUATE_MODULE`), importing only the metric's modules of pcaa_hf, so that PCAA itself
  comes from the saved folder's code;
and runs with `HF_HUB_OFFLINE=1` and a private `HF_HOME`, so nothing is downloaded and no cache is shared.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, Trainer, TrainingArguments

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.data.synthetic import CITYSCAPES_SCENE_COLOURS, street_scene
from pcaa_hf.evaluation.metrics import EVALUATE_MODULE, mean_iou
from pcaa_hf.evaluation.scoring import evaluate_segmentation
from pcaa_testing import small_config

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLES_VARIABLE = "PCAA_TRANSFORMERS_EXAMPLES"
SCRIPTS = ("run_semantic_segmentation.py", "run_semantic_segmentation_no_trainer.py")

# Five classes of the generated street scenes; every other Cityscapes id is ignored (255).
ID2LABEL = dict(enumerate(("road", "sidewalk", "building", "vegetation", "sky")))
# The example scripts' convention (that of their default data set, segments/sidewalk-semantic): class 0 holds every
# pixel of no other class, and run_semantic_segmentation.py leaves it out of the metric (ignore_index=0).
EXAMPLE_ID2LABEL = dict(enumerate(("unlabeled", "road", "sidewalk", "building", "sky")))


def label_table(id2label, other):
    """Cityscapes label id -> index in `id2label` (by class name), `other` for the ids of no class there."""
    table = np.full(256, other, dtype=np.uint8)
    for index, name in id2label.items():
        if name in CITYSCAPES_SCENE_COLOURS:
            table[CITYSCAPES_SCENE_COLOURS[name][0]] = index
    return table


def tiny_config(id2label):
    return small_config(hidden_size=16, auxiliary_hidden_size=8, id2label=dict(id2label),
                        label2id={name: index for index, name in id2label.items()})


def scenes(number, width, height, seed, table):
    """`number` generated street scenes: (H, W, 3) uint8 images and (H, W) uint8 labels mapped by `table`."""
    rng = np.random.default_rng(seed)
    pairs = [street_scene(width, height, rng) for _ in range(number)]
    return [image for image, _ in pairs], [table[labels] for _, labels in pairs]


# ----------------------------------------------------------------------------------------------------------------
# transformers.Trainer


def processed_split(number, seed):
    images, labels = scenes(number, 64, 64, seed, label_table(ID2LABEL, other=255))
    features = PCAAImageProcessor()(images, segmentation_maps=labels)
    labels = [np.asarray(x) for x in features["labels"]]
    split = Dataset.from_dict({"pixel_values": [np.asarray(x) for x in features["pixel_values"]], "labels": labels})
    return split.with_format("torch"), np.stack(labels)


def test_trainer_trains_evaluates_with_compute_metrics_and_saves(tmp_path):
    num_labels = len(ID2LABEL)
    (train_split, _), (eval_split, eval_labels) = processed_split(6, seed=0), processed_split(4, seed=1)
    metric = evaluate.load(EVALUATE_MODULE, cache_dir=str(tmp_path / "evaluate_cache"))
    seen = []

    @torch.no_grad()
    def compute_metrics(eval_pred):  # as in transformers' run_semantic_segmentation.py
        logits, labels = eval_pred
        assert isinstance(logits, np.ndarray), (
            f"Trainer handed compute_metrics a {type(logits).__name__} of outputs, not the logits alone: "
            "PCAAConfig.keys_to_ignore_at_inference must name every other output")
        predictions = F.interpolate(torch.from_numpy(logits), size=labels.shape[-2:], mode="bilinear",
                                    align_corners=False).argmax(dim=1).numpy()
        seen.append((predictions, labels))
        metrics = metric.compute(predictions=predictions, references=labels, num_labels=num_labels,
                                 ignore_index=255, reduce_labels=False)
        per_category_iou = metrics.pop("per_category_iou").tolist()
        per_category_accuracy = metrics.pop("per_category_accuracy").tolist()
        metrics.update({f"iou_{ID2LABEL[i]}": value for i, value in enumerate(per_category_iou)})
        metrics.update({f"accuracy_{ID2LABEL[i]}": value for i, value in enumerate(per_category_accuracy)})
        return metrics

    torch.manual_seed(0)
    model = PCAAForSemanticSegmentation(tiny_config(ID2LABEL))
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=1e-3, eval_strategy="steps", eval_steps=2, logging_steps=2, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=train_split, eval_dataset=eval_split,
                      compute_metrics=compute_metrics)
    train_result = trainer.train()
    assert train_result.global_step == 4 and math.isfinite(train_result.training_loss)
    evaluations = [entry for entry in trainer.state.log_history if "eval_mean_iou" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]

    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_iou_road"):
        assert key in metrics
    assert math.isfinite(metrics["eval_mean_iou"]) and 0.0 <= metrics["eval_mean_iou"] <= 1.0

    # Trainer handed compute_metrics the logits alone (config.keys_to_ignore_at_inference): the metric equals
    # pcaa_hf's own evaluation of the same model on the same split, prediction for prediction.
    predictions, labels = seen[-1]
    assert predictions.shape == labels.shape == (4, 64, 64)
    assert np.array_equal(labels, eval_labels)
    ours = {}
    own = evaluate_segmentation(trainer.model, eval_split, num_labels, batch_size=2,
                                on_prediction=lambda index, prediction: ours.__setitem__(index, prediction))
    assert np.array_equal(np.stack([ours[index] for index in range(4)]), predictions)
    assert metrics["eval_mean_iou"] == pytest.approx(float(own["mean_iou"]), abs=1e-12)
    assert metrics["eval_mean_iou"] == pytest.approx(float(mean_iou(predictions, labels, num_labels, 255)["mean_iou"]),
                                                     abs=1e-12)

    # save_model then from_pretrained gives the same outputs.
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = PCAAForSemanticSegmentation.from_pretrained(tmp_path / "saved")
    pixel_values = eval_split[:2]["pixel_values"]
    with torch.no_grad():
        expected = trainer.model.eval()(pixel_values).logits
        observed = reloaded(pixel_values).logits
    assert torch.equal(expected, observed)
    assert reloaded.config.id2label == ID2LABEL


# ----------------------------------------------------------------------------------------------------------------
# transformers' example scripts


def examples_folder():
    """The folder holding the two example scripts, from PCAA_TRANSFORMERS_EXAMPLES, or a skip saying why not."""
    value = os.environ.get(EXAMPLES_VARIABLE)
    if not value:
        pytest.skip(f"{EXAMPLES_VARIABLE} is not set: point it to a transformers checkout (or its "
                    "examples/pytorch/semantic-segmentation folder) to run transformers' example scripts.")
    for folder in (Path(value), Path(value) / "examples" / "pytorch" / "semantic-segmentation"):
        if all((folder / script).is_file() for script in SCRIPTS):
            return folder
    pytest.skip(f"{EXAMPLES_VARIABLE}={value} holds neither {' nor '.join(SCRIPTS)} nor "
                "examples/pytorch/semantic-segmentation/ with them.")


# Runs an example script unmodified, with the two Hub look-ups it makes answered locally.
WRAPPER = textwrap.dedent('''
    import os
    import runpy
    import sys
    import types

    import evaluate
    import huggingface_hub

    # The offline metric imports pcaa_hf.evaluation.metrics. Importing the pcaa_hf package itself would register its
    # classes with the Auto classes, and transformers then prefers those to the model folder's own code even with
    # trust_remote_code=True. A bare package object gives the metric its modules without that side effect, so that
    # PCAA comes from the saved folder through trust_remote_code, as for any user of the scripts.
    package = types.ModuleType("pcaa_hf")
    package.__path__ = [os.environ["PCAA_HF_PACKAGE"]]
    sys.modules["pcaa_hf"] = package
    load = evaluate.load


    def offline_load(path, *args, **kwargs):
        """evaluate.load("mean_iou") -> pcaa_hf's offline copy of the metric, which needs no download."""
        return load(os.environ["PCAA_MEAN_IOU_MODULE"] if path == "mean_iou" else path, *args, **kwargs)


    def local_hub_download(repo_id, filename, *args, **kwargs):
        """The data set's id2label.json, from the data set folder itself instead of its Hub repository."""
        path = os.path.join(repo_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} (the test answers Hub downloads from local folders only)")
        return path


    evaluate.load = offline_load
    huggingface_hub.hf_hub_download = local_hub_download
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
''')


@pytest.fixture(scope="module")
def example_scripts():
    folder = examples_folder()
    pytest.importorskip("albumentations", reason="transformers' example scripts need albumentations")
    return folder


@pytest.fixture(scope="module")
def example_inputs(example_scripts, tmp_path_factory):
    """A saved PCAA folder (model, processor, code) and a generated data set folder in the Hub's parquet layout."""
    root = tmp_path_factory.mktemp("examples")
    torch.manual_seed(0)
    model_dir = root / "pcaa-tiny"
    PCAAForSemanticSegmentation(tiny_config(EXAMPLE_ID2LABEL)).save_pretrained(model_dir)
    # The scripts crop (train) and resize (eval) to image_processor.size; 64 px keeps the runs small.
    PCAAImageProcessor(size={"height": 64, "width": 64}).save_pretrained(model_dir)

    data_dir = root / "street-scenes"
    features = Features({"image": ImageFeature(), "label": ImageFeature()})
    splits = {}
    for split, number, seed in (("train", 6, 0), ("validation", 4, 1)):
        # Wider than the crop, so that the training crop is random; labels in [0, 5), 0 for "unlabeled".
        images, labels = scenes(number, 80, 64, seed, label_table(EXAMPLE_ID2LABEL, other=0))
        splits[split] = Dataset.from_dict({"image": [Image.fromarray(x) for x in images],
                                           "label": [Image.fromarray(x, mode="L") for x in labels]},
                                          features=features)
    for split, data in DatasetDict(splits).items():
        (data_dir / "data").mkdir(parents=True, exist_ok=True)
        data.to_parquet(str(data_dir / "data" / f"{split}-00000-of-00001.parquet"))
    (data_dir / "id2label.json").write_text(json.dumps({str(k): v for k, v in EXAMPLE_ID2LABEL.items()}))

    wrapper = root / "run_offline.py"
    wrapper.write_text(WRAPPER)
    return {"root": root, "model": model_dir, "data": data_dir, "wrapper": wrapper}


def run_example(script, arguments, inputs, tmp_path):
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PCAA_MEAN_IOU_MODULE": EVALUATE_MODULE, "PCAA_HF_PACKAGE": str(Path(EVALUATE_MODULE).parents[1]),
        "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")])),
    })
    command = [sys.executable, str(inputs["wrapper"]), str(script),
               "--model_name_or_path", str(inputs["model"]), "--trust_remote_code",
               "--dataset_name", str(inputs["data"]), *arguments]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    # The model came from the folder's own code (trust_remote_code), not from the installed pcaa_hf.
    remote_code = tmp_path / "hf_home" / "modules" / "transformers_modules"
    assert list(remote_code.rglob("modeling_pcaa.py")), "the script did not load PCAA through trust_remote_code"
    return result


def check_saved_model(output_dir, inputs):
    """The script's output folder reloads, through remote code and through our class, with the same weights."""
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_pcaa.py"):
        assert (output_dir / name).is_file(), f"{name} missing from {sorted(p.name for p in output_dir.iterdir())}"
    remote = AutoModelForSemanticSegmentation.from_pretrained(output_dir, trust_remote_code=True)
    local = PCAAForSemanticSegmentation.from_pretrained(output_dir)
    assert type(remote).__name__ == "PCAAForSemanticSegmentation" and remote.config.id2label == EXAMPLE_ID2LABEL
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(remote(pixel_values).logits, local(pixel_values).logits)
    initial = PCAAForSemanticSegmentation.from_pretrained(inputs["model"])
    trained_weight = local.decode_head.classifier.weight
    assert not torch.equal(trained_weight, initial.decode_head.classifier.weight), "no training step was taken"


@pytest.mark.slow  # the script trains and evaluates in a fresh interpreter
def test_run_semantic_segmentation_example(example_scripts, example_inputs, tmp_path):
    output_dir = tmp_path / "output"
    run_example(example_scripts / "run_semantic_segmentation.py", [
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--remove_unused_columns", "False",
        "--max_steps", "3", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--learning_rate", "1e-3", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "True",
    ], example_inputs, tmp_path)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert math.isfinite(results["train_loss"])
    assert math.isfinite(results["eval_mean_iou"]) and 0.0 <= results["eval_mean_iou"] <= 1.0
    assert "eval_iou_road" in results
    check_saved_model(output_dir, example_inputs)


@pytest.mark.slow  # the script trains and evaluates in a fresh interpreter
def test_run_semantic_segmentation_no_trainer_example(example_scripts, example_inputs, tmp_path):
    output_dir = tmp_path / "output"
    run_example(example_scripts / "run_semantic_segmentation_no_trainer.py", [
        "--output_dir", str(output_dir), "--max_train_steps", "3", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--learning_rate", "1e-3",
        "--seed", "0",
    ], example_inputs, tmp_path)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert math.isfinite(results["eval_mean_iou"]) and 0.0 <= results["eval_mean_iou"] <= 1.0
    assert len(results["eval_per_category_iou"]) == len(EXAMPLE_ID2LABEL)
    check_saved_model(output_dir, example_inputs)
