"""`pcaa-predict` (scripts/predict.py) end to end on a tiny saved model: its files, agreement with in-process
inference, clear errors; and the library behind it, pcaa_hf.inference.prediction."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.cli.predict import main
from pcaa_hf.data.label_sets import label_maps
from pcaa_hf.data.synthetic import street_scene
from pcaa_hf.inference.prediction import PredictionError, Predictor, find_images, resolve_classes
from pcaa_hf.inference.segmentation_inference import SegmentationInference
from pcaa_hf.inference.visualisation import heatmap, heatmap_overlay, partial_class_activations
from pcaa_testing import small_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "predict.py"
CLASSES = ("road", "traffic light", "sky", "car", "person")
FILE_LABELS = ("road", "traffic-light", "sky", "car", "person")  # the names as the output files spell them
BINS = (4, 4)


def start_predict(*arguments):
    # One thread: on the few shared cores tests get, threads over these tiny convolutions mostly wait for each other.
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, arguments)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment)


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved model (default init: unlike randomised weights, it predicts several classes) and an image folder."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    id2label, label2id = label_maps(CLASSES)
    model = PCAAForSemanticSegmentation(small_config(id2label=id2label, label2id=label2id, bins=[BINS]))
    model.save_pretrained(root / "model")
    PCAAImageProcessor().save_pretrained(root / "model")

    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    street, _ = street_scene(64, 48, rng)
    alpha = rng.integers(64, 256, (48, 64, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([street, alpha], axis=-1), mode="RGBA").save(images / "street.png")
    Image.fromarray(street_scene(56, 40, rng)[0].mean(axis=-1).astype(np.uint8), mode="L").save(
        images / "sub" / "grey.png")
    (images / "broken.png").write_bytes(b"not a PNG")
    (images / "notes.txt").write_text("not an image, and not an image name either")
    return root


@pytest.fixture(scope="module")
def reference(workspace):
    model = AutoModelForSemanticSegmentation.from_pretrained(workspace / "model").eval()
    return model, AutoImageProcessor.from_pretrained(workspace / "model")


@pytest.fixture(scope="module")
def runs(workspace):
    """
    The script's runs, started together: most of each is a fresh interpreter importing torch and transformers, and
    those overlap on two cores.
    """
    images, model = workspace / "images", workspace / "model"
    processes = {
        # The first spellings (kebab-case) are accepted beside the snake_case ones.
        "whole": start_predict(model, images, "--output-dir", workspace / "whole", "--skip-invalid"),
        "slide": start_predict(model, images / "street.png", images / "sub" / "grey.png", "--output_dir",
                               workspace / "slide", "--mode", "slide", "--crop_size", 32, 48, "--stride", 16, 32,
                               "--cams", "--alpha", 1),
        "unreadable": start_predict(model, images / "broken.png", "--output_dir", workspace / "unreadable"),
    }
    return {name: finish(process) for name, process in processes.items()}


def expected_class_map(reference, path, inference):
    model, processor = reference
    pixel_values = processor(images=str(path), return_tensors="pt")["pixel_values"]
    with Image.open(path) as image:
        size = (image.height, image.width)
    return inference.predict(model, pixel_values, output_size=size)[0].numpy()


def check_mask_and_overlay(prefix, source, expected):
    with Image.open(source) as image:
        size = image.size
    with Image.open(f"{prefix}_mask.png") as mask:
        assert mask.mode == "P" and mask.size == size
        class_map = np.asarray(mask)
    assert 0 <= class_map.min() and class_map.max() < len(CLASSES)
    np.testing.assert_array_equal(class_map, expected)
    with Image.open(f"{prefix}_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == size
    return class_map


def written(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def error_line(returncode, stderr):
    """The one error line of a failed run, after checking the run failed without a traceback."""
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_whole_mode_writes_masks_and_overlays_of_a_folder(workspace, reference, runs):
    images, output, result = workspace / "images", workspace / "whole", runs["whole"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "broken.png" in result.stderr and "Processed 2 of 3 images (1 skipped)" in result.stdout
    assert written(output) == ["street_mask.png", "street_overlay.png", "sub/grey_mask.png", "sub/grey_overlay.png"]

    predicted_classes = set()
    for name in ("street", "sub/grey"):
        source = images / f"{name}.png"
        expected = expected_class_map(reference, source, SegmentationInference(mode="whole"))
        predicted_classes |= set(np.unique(check_mask_and_overlay(output / name, source, expected)))
    assert len(predicted_classes) > 1  # a constant prediction would make the comparison above weak


def test_slide_mode_with_cams_writes_heatmaps_and_region_scores(workspace, reference, runs):
    images, output, result = workspace / "images", workspace / "slide", runs["slide"]
    inputs = [images / "street.png", images / "sub" / "grey.png"]
    assert result.returncode == 0, result.stderr
    assert "Processed 2 of 2 images (0 skipped)" in result.stdout

    inference = SegmentationInference(mode="slide", crop_size=(32, 48), stride=(16, 32))
    model, processor = reference
    for source in inputs:
        prefix = output / source.stem
        class_map = check_mask_and_overlay(prefix, source, expected_class_map(reference, source, inference))
        with Image.open(source) as image:
            size = image.size

        # The default --top-classes 3: the classes covering most predicted pixels, as many as are predicted.
        counts = dict(zip(*np.unique(class_map, return_counts=True)))
        drawn = {FILE_LABELS.index(path.name.removeprefix(f"{source.stem}_cam0_").removesuffix(".png"))
                 for path in output.glob(f"{source.stem}_cam0_*.png")}
        assert len(drawn) == min(3, len(counts))
        assert min(counts[index] for index in drawn) >= max(
            [count for index, count in counts.items() if index not in drawn], default=0)

        regions = json.loads(Path(f"{prefix}_regions.json").read_text())
        assert regions["image"] == str(source) and len(regions["modules"]) == 1
        module = regions["modules"][0]
        assert module["bins"] == list(BINS) and list(module["region_class_scores"]) == list(CLASSES)
        scores = np.array([module["region_class_scores"][name] for name in CLASSES])
        assert scores.shape == (len(CLASSES), *BINS)
        pixel_values = processor(images=str(source), return_tensors="pt")["pixel_values"]
        _, activation_maps, region_class_scores = partial_class_activations(model, pixel_values)
        np.testing.assert_allclose(scores, region_class_scores[0][0].numpy(), atol=1e-6)

        for index in drawn:
            # --alpha 1 leaves the pure heatmaps, whatever the image below.
            with Image.open(f"{prefix}_cam0_{FILE_LABELS[index]}.png") as cam:
                assert cam.mode == "RGB" and cam.size == size
                expected = heatmap_overlay(Image.new("RGB", size), activation_maps[0][0, index].numpy(), alpha=1)
                difference = np.abs(np.asarray(cam, dtype=int) - np.asarray(expected, dtype=int))
                assert difference.max() <= 1  # rounding of float sums computed on another thread count
            with Image.open(f"{prefix}_regions0_{FILE_LABELS[index]}.png") as tiles:
                assert tiles.mode == "RGB" and tiles.size == size
                tiles = np.asarray(tiles)
            # One flat colour per region, the colour of its score in the JSON.
            rows = np.arange(size[1]) * BINS[0] // size[1]
            columns = np.arange(size[0]) * BINS[1] // size[0]
            np.testing.assert_array_equal(tiles, heatmap(scores[index])[rows[:, None], columns[None, :]])


def test_mistakes_give_one_clear_line_and_no_traceback(workspace, runs, capsys):
    images, output, unreadable = workspace / "images", workspace / "mistakes", runs["unreadable"]
    assert "broken.png" in error_line(unreadable.returncode, unreadable.stderr)

    # The next two fail before any image is read: main() in this process says the same as a fresh interpreter.
    returncode = main([str(workspace / "no-such-model"), str(images / "street.png"), "--output_dir", str(output)])
    missing = error_line(returncode, capsys.readouterr().err)
    assert "no-such-model" in missing and "does not exist" in missing

    returncode = main([str(workspace / "model"), str(images / "street.png"), "--output_dir", str(output), "--cams",
                       "--cam_classes", "car", "unicorn"])
    unknown = error_line(returncode, capsys.readouterr().err)
    assert "--cam_classes" in unknown and "'unicorn'" in unknown and "traffic light" in unknown


def test_cam_classes_match_names_loosely_or_ids_and_output_clashes_are_refused(workspace, tmp_path, capsys):
    id2label = dict(enumerate(CLASSES))
    assert resolve_classes(["Traffic_Light", "4", "traffic light", "sky"], id2label) == [1, 4, 2]
    with pytest.raises(PredictionError, match="no class 'unicorn'.*traffic light"):
        resolve_classes(["unicorn"], id2label)

    copy = tmp_path / "elsewhere" / "street.png"
    copy.parent.mkdir()
    copy.write_bytes((workspace / "images" / "street.png").read_bytes())
    with pytest.raises(PredictionError, match="would both write"):
        find_images([workspace / "images" / "street.png", copy], tmp_path / "out")
    returncode = main([str(workspace / "model"), str(workspace / "images" / "street.png"), str(copy),
                       "--output_dir", str(tmp_path / "out")])
    clash = error_line(returncode, capsys.readouterr().err)
    assert str(copy) in clash and "street_mask.png" in clash


def test_find_images_names_outputs_by_their_path_below_the_folder_and_skips_earlier_outputs(workspace, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(workspace / "images", images)
    output = images / "outputs"  # a folder searched for inputs that also holds earlier outputs
    output.mkdir()
    shutil.copy(images / "street.png", output / "street_mask.png")
    found = find_images([images], output)
    assert [(path.relative_to(images), name) for path, name in found] == [
        (Path("broken.png"), Path("broken")), (Path("street.png"), Path("street")),
        (Path("sub/grey.png"), Path("sub/grey"))]
    with pytest.raises(PredictionError, match="does not exist"):
        find_images([tmp_path / "missing.png"], tmp_path)
    (images / "empty").mkdir()
    with pytest.raises(PredictionError, match="holds no images"):
        find_images([images / "empty"], output)


def test_predictor_writes_what_the_command_writes(workspace, reference, runs, tmp_path):
    """The library call behind the command: the same mask from a Predictor in this process."""
    model, processor = reference
    predictor = Predictor(model, processor, SegmentationInference(mode="whole"), tmp_path)
    with torch.inference_mode():
        written = predictor.write(workspace / "images" / "street.png", Path("street"))
    assert [path.name for path in written] == ["street_mask.png", "street_overlay.png"]
    with Image.open(written[0]) as ours, Image.open(workspace / "whole" / "street_mask.png") as command:
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(command))
    with pytest.raises(PredictionError, match="broken.png"):
        predictor.write(workspace / "images" / "broken.png", Path("broken"))
