"""Evaluation loop and `pcaa-evaluate` (scripts/evaluate.py): shares without duplicates, predictions at each image's
own size, the same figures from one process or two (`accelerate launch`), and the PNG outputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.cli.evaluate import main as evaluate_main
from pcaa_hf.data.builders import build_cityscapes
from pcaa_hf.data.label_sets import CITYSCAPES_LABELS, TRAIN_ID_TO_CITYSCAPES_ID, label_maps
from pcaa_hf.data.synthetic import write_cityscapes_tree
from pcaa_hf.data.transforms import EvalTransform
from pcaa_hf.evaluation.metrics import mean_iou
from pcaa_hf.evaluation.prediction_files import PredictionWriter, prediction_names, read_label_map
from pcaa_hf.evaluation.scoring import evaluate_segmentation, process_share, results_table
from pcaa_hf.inference.segmentation_inference import SegmentationInference
from pcaa_hf.inference.visualisation import palette_for
from pcaa_testing import finish_script, randomise_weights, small_config, start_script, two_processes_launcher

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"


@pytest.mark.parametrize("length", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("num_processes", [1, 2, 3, 8])
def test_process_shares_cover_every_index_once(length, num_processes):
    shares = [list(process_share(length, num_processes, rank)) for rank in range(num_processes)]
    assert sorted(index for share in shares for index in share) == list(range(length))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def random_examples(sizes, num_labels, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, h, w, generator=generator),
             "labels": torch.randint(0, num_labels, (h, w), generator=generator).masked_fill_(
                 torch.rand(h, w, generator=generator) < 0.1, 255)} for h, w in sizes]


def test_evaluation_matches_mean_iou_of_per_image_predictions():
    """Mixed image sizes in one batch: each image predicted alone at its own size, scored once."""
    model = randomise_weights(PCAAForSemanticSegmentation(small_config())).eval()
    examples = random_examples([(40, 56), (40, 56), (48, 32), (40, 56), (33, 47)], num_labels=5)
    seen = []
    metrics = evaluate_segmentation(model, ListDataset(examples), 5, batch_size=3,
                                    on_prediction=lambda index, prediction: seen.append((index, prediction)))
    assert sorted(index for index, _ in seen) == list(range(5))
    with torch.no_grad():
        expected = [model(pixel_values=e["pixel_values"][None]).logits for e in examples]
    expected = [torch.nn.functional.interpolate(logits, size=e["labels"].shape, mode="bilinear",
                                                align_corners=False)[0].argmax(0).numpy()
                for logits, e in zip(expected, examples)]
    for index, prediction in seen:
        np.testing.assert_array_equal(prediction, expected[index])
    reference = mean_iou(expected, [e["labels"].numpy() for e in examples], 5, 255)
    assert metrics["num_images"] == 5
    for key, value in reference.items():
        np.testing.assert_array_equal(metrics[key], value)
    assert not model.training


def test_evaluation_restores_training_mode_and_table_lists_every_class():
    model = PCAAForSemanticSegmentation(small_config()).train()
    metrics = evaluate_segmentation(model, ListDataset(random_examples([(32, 32)], 5)), 5)
    assert model.training
    table = results_table(metrics, {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})
    assert [line.split()[0] for line in table.splitlines()[2:7]] == ["a", "b", "c", "d", "e"]
    assert "mIoU" in table.splitlines()[-2] and "authors" in table.splitlines()[-1]


@pytest.fixture(scope="module")
def cityscapes_run(tmp_path_factory):
    """A generated Cityscapes tree and a saved tiny 19-class model."""
    root = tmp_path_factory.mktemp("evaluate_script")
    write_cityscapes_tree(root / "cityscapes", num_train=1, num_val=5, size=(96, 48), seed=3)
    id2label, label2id = label_maps(CITYSCAPES_LABELS)
    model = randomise_weights(PCAAForSemanticSegmentation(small_config(num_labels=19, id2label=id2label,
                                                                       label2id=label2id)))
    model.save_pretrained(root / "model")
    PCAAImageProcessor().save_pretrained(root / "model")
    return root


def run_script(arguments, launcher=(), env=None):
    return subprocess.run([sys.executable, *launcher, str(SCRIPT), *arguments], capture_output=True, text=True,
                          timeout=300, env=env)


def script_arguments(root, output, *extra):
    return ["--model", str(root / "model"), "--dataset", "cityscapes", "--data", str(root / "cityscapes"),
            "--crop_size", "48", "48", "--output_dir", str(output), "--num_workers", "0", *extra]


def test_evaluate_script_results_and_png_outputs(cityscapes_run, capsys):
    output = cityscapes_run / "single"
    arguments = script_arguments(cityscapes_run, output, "--save_predictions", "--cityscapes_test_format")
    assert evaluate_main(arguments) == 0
    stdout = capsys.readouterr().out
    results = json.loads((output / "results.json").read_text())
    assert results["num_images"] == 5 and results["processes"] == 1
    assert results["inference"]["mode"] == "slide" and results["inference"]["stride"] == [32, 32]
    assert list(results["per_category_iou"]) == list(CITYSCAPES_LABELS)
    assert "mIoU" in stdout and "road" in stdout

    # The palette PNGs hold exactly what the library predicts, and the test-server PNGs the same in label ids.
    model = PCAAForSemanticSegmentation.from_pretrained(cityscapes_run / "model").eval()
    split = build_cityscapes(cityscapes_run / "cityscapes")["validation"]
    transformed = split.with_transform(EvalTransform())
    inference = SegmentationInference("slide", (48, 48))
    to_label_ids = np.zeros(256, dtype=np.uint8)
    to_label_ids[list(TRAIN_ID_TO_CITYSCAPES_ID)] = list(TRAIN_ID_TO_CITYSCAPES_ID.values())
    pngs = sorted((output / "predictions").glob("*.png"))
    assert len(pngs) == 5 and pngs[0].name.endswith("_leftImg8bit.png")
    predictions = []
    for index in range(len(split)):
        example = transformed[index]
        prediction = inference.predict(model, torch.as_tensor(example["pixel_values"])[None],
                                       np.shape(example["labels"]))[0].numpy()
        predictions.append(prediction)
        name = Path(split.cast_column("image", type(split.features["image"])(decode=False))[index]["image"]["path"])
        stored = Image.open(output / "predictions" / f"{name.stem}.png")
        assert stored.mode == "P"
        np.testing.assert_array_equal(np.asarray(stored), prediction)
        assert stored.getpalette()[:3] == list(palette_for(model.config.id2label)[0])
        label_ids = np.asarray(Image.open(output / "cityscapes_label_ids" / f"{name.stem}.png"))
        np.testing.assert_array_equal(label_ids, to_label_ids[prediction])
    expected = mean_iou(predictions, [np.asarray(example["label"]) for example in split], 19, 255)
    assert results["mean_iou"] == pytest.approx(float(expected["mean_iou"]), abs=0)


def test_evaluate_script_under_accelerate_two_processes(cityscapes_run):
    """Two CPU processes (gloo) share the 5 images 3 + 2 and report exactly the single-process figures."""
    single = cityscapes_run / "single"  # written by test_evaluate_script_results_and_png_outputs
    if not (single / "results.json").is_file():
        assert evaluate_main(script_arguments(cityscapes_run, single)) == 0
    double = cityscapes_run / "two_processes"
    launcher = two_processes_launcher()
    # The options' first spellings (kebab-case: --output-dir) are accepted too.
    arguments = [argument.replace("_", "-") if argument.startswith("--") else argument
                 for argument in script_arguments(cityscapes_run, double)]
    assert "--output-dir" in arguments
    finish_script(start_script([sys.executable, *launcher, str(SCRIPT), *arguments], {"ACCELERATE_USE_CPU": "1"}))
    one, two = (json.loads((folder / "results.json").read_text()) for folder in (single, double))
    assert two["processes"] == 2 and two["num_images"] == 5
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "mean_iou_absent_as_zero", "per_category_iou"):
        assert one[key] == two[key], key


@pytest.mark.parametrize("change, message", [
    (["--data", "MISSING"], "MISSING does not exist"),
    (["--split", "testing"], "no split 'testing'"),
    (["--stride", "0", "8"], "argument --stride: expected a positive integer, got '0'"),
    (["--model", "MISSING"], "MISSING"),
])
def test_evaluate_script_bad_arguments(cityscapes_run, tmp_path, capsys, change, message):
    change = [str(tmp_path / value) if value == "MISSING" else value for value in change]
    message = message.replace("MISSING", str(tmp_path / "MISSING"))
    try:
        status = evaluate_main(script_arguments(cityscapes_run, tmp_path / "out") + change)
    except SystemExit as exit:  # refused by the parser
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_prediction_files_are_named_after_the_images_and_label_ids_need_cityscapes(tmp_path):
    import datasets

    paths = []
    for folder, name in (("a", "x"), ("b", "y"), ("c", "x")):
        (tmp_path / folder).mkdir()
        paths.append(str(tmp_path / folder / f"{name}.png"))
        Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(paths[-1])
    split = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    assert prediction_names(split.select([0, 1])) == ["x", "y"]
    assert prediction_names(split) == ["000000_x", "000001_y", "000002_x"]  # stems that clash get the index

    id2label = dict(enumerate(CITYSCAPES_LABELS))
    writer = PredictionWriter(tmp_path / "out", split, id2label, cityscapes_label_ids=True)
    writer(2, np.full((4, 6), 13))
    assert np.asarray(Image.open(tmp_path / "out" / "predictions" / "000002_x.png")).tolist() == [[13] * 6] * 4
    assert np.asarray(Image.open(tmp_path / "out" / "cityscapes_label_ids" / "000002_x.png")).max() == 26  # car
    with pytest.raises(ValueError, match="19 Cityscapes classes"):
        PredictionWriter(tmp_path / "other", split, {0: "a", 1: "b"}, palette=False, cityscapes_label_ids=True)
    assert not (tmp_path / "other").exists()

    (tmp_path / "map.json").write_text(json.dumps({"26": 13, "7": 0}))
    assert read_label_map(tmp_path / "map.json") == {26: 13, 7: 0}


def test_evaluation_errors_name_the_example():
    model = PCAAForSemanticSegmentation(small_config()).eval()
    with pytest.raises(ValueError, match="no images"):
        evaluate_segmentation(model, ListDataset([]), 5)
    examples = random_examples([(32, 32), (32, 32), (32, 32)], 5)
    examples[2]["labels"][0, 0] = 200
    with pytest.raises(ValueError, match=r"example\(s\) 2: references holds values outside \[0, 5\).*\[200\]"):
        evaluate_segmentation(model, ListDataset(examples), 5)
