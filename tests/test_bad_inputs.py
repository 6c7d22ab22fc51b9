"""Bad data set files and bad model or processor inputs: each gets a clear error naming it, or is skipped with a
warning under `skip_invalid` (issue 18, items 7, 8 and 11). Tiny generated images only."""

import struct
import warnings
import zlib

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers.testing_utils import CaptureLogger

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.cli.predict import main as predict_main
from pcaa_hf.data.builders import InvalidSampleError, build_ade20k, build_cityscapes, load_segmentation_dataset
from pcaa_hf.data.transforms import EvalTransform, TrainTransform
from pcaa_hf.evaluation.scoring import evaluate_segmentation
from pcaa_hf.inference.prediction import Predictor
from pcaa_hf.inference.segmentation_inference import SegmentationInference
from pcaa_hf.model import image_processing_pcaa
from pcaa_hf.model.image_processing_pcaa import keep_ratio_size, open_image
from pcaa_testing import small_config

SIZE = 16
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})


def rgb(value=100, size=(SIZE, SIZE)):
    return PIL.Image.fromarray(np.full((*size, 3), value, np.uint8))


def grey(value, size=(SIZE, SIZE)):
    return PIL.Image.fromarray(np.full(size, value, np.uint8))


def cityscapes_tree(root, examples):
    """train and val splits, each with the (city, stem) examples given: 16x16 frames, all road (label id 7)."""
    for split in ("train", "val"):
        for city, stem in examples:
            for folder, name, image in (("leftImg8bit", f"{stem}_leftImg8bit.png", rgb()),
                                        ("gtFine", f"{stem}_gtFine_labelIds.png", grey(7))):
                (root / folder / split / city).mkdir(parents=True, exist_ok=True)
                image.save(root / folder / split / city / name)
    return root


def ade20k_tree(root, image_names):
    """training and validation splits with the image files named (JPEG), each with its annotation (class 3)."""
    for split in ("training", "validation"):
        for name in image_names:
            (root / "images" / split / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split / name).parent.mkdir(parents=True, exist_ok=True)
            rgb().save(root / "images" / split / name, format="JPEG")
            grey(3).save((root / "annotations" / split / name).with_suffix(".png"))
    return root


def corrupt_image_data(path):
    """Zero a PNG's compressed image data and give the chunk a matching CRC: every checksum stays valid."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4:start])[0]
    zeros = bytes(length)
    data[start + 4:start + 4 + length] = zeros
    data[start + 4 + length:start + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + zeros))
    path.write_bytes(bytes(data))


# Item 7: data sets


def test_png_with_corrupt_image_data_and_valid_checksums_is_named_or_skipped(tmp_path):
    root = cityscapes_tree(tmp_path / "cityscapes", [("aachen", "a_0"), ("bonn", "b_0")])
    broken = root / "leftImg8bit" / "train" / "aachen" / "a_0_leftImg8bit.png"
    corrupt_image_data(broken)
    with pytest.raises(InvalidSampleError, match=f"Cannot read image {broken}"):
        build_cityscapes(root, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match=f"Skipping a sample: Cannot read image {broken}"):
        built = build_cityscapes(root, cache_dir=tmp_path / "cache", skip_invalid=True)
    assert (len(built["train"]), len(built["validation"])) == (1, 2)


def test_the_same_file_name_in_two_folders_keeps_both_pairs(tmp_path):
    cities = build_cityscapes(cityscapes_tree(tmp_path / "cs", [("aachen", "x"), ("bonn", "x")]),
                              cache_dir=tmp_path / "cache")
    assert (len(cities["train"]), len(cities["validation"])) == (2, 2)
    ade = build_ade20k(ade20k_tree(tmp_path / "ade", ["x.jpg", "sub/x.jpg"]), cache_dir=tmp_path / "cache")
    assert (len(ade["train"]), len(ade["validation"])) == (2, 2)


def test_ade20k_images_are_found_by_any_jpeg_ending_and_duplicates_refused(tmp_path):
    root = ade20k_tree(tmp_path / "ade", ["a.jpg", "b.JPG", "c.jpeg"])
    built = build_ade20k(root, cache_dir=tmp_path / "cache")
    assert (len(built["train"]), len(built["validation"])) == (3, 3)
    rgb().save(root / "images" / "training" / "a.jpeg", format="JPEG")
    with pytest.raises(ValueError, match=r"a\.jpe?g and .*a\.jpe?g are the same example"):
        build_ade20k(root, cache_dir=tmp_path / "cache")


def saved_split(folder, labels, images=None):
    images = images or [rgb()] * len(labels)
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=FEATURES).save_to_disk(folder)
    return folder


@pytest.mark.parametrize(
    "bad_label, message",
    [
        (rgb(1), r"column 'label' holds colour images"),
        (grey(9), r"label values \[9\] are neither class ids in \[0, 2\) nor the ignore index 255"),
        (grey(1, size=(8, 8)), r"the image is 16x16 but its label map is 8x8"),
    ],
    ids=["rgb", "out-of-range", "other-size"],
)
def test_every_example_of_a_datasets_split_is_checked(tmp_path, bad_label, message):
    folder = saved_split(tmp_path / "saved", [grey(1), grey(255), bad_label])
    with pytest.raises(InvalidSampleError, match=rf"Example 2 of split 'train' of {folder}: {message}"):
        load_segmentation_dataset(folder, id2label={0: "a", 1: "b"})
    with pytest.warns(UserWarning, match=rf"Skipping example 2 of split 'train'.*{message}"):
        kept = load_segmentation_dataset(folder, id2label={0: "a", 1: "b"}, skip_invalid=True)
    assert len(kept["train"]) == 2 and np.asarray(kept["train"][1]["label"]).max() == 255


def test_a_corrupt_image_in_a_datasets_split_is_named(tmp_path):
    rgb().save(tmp_path / "frame.png")
    corrupt_image_data(tmp_path / "frame.png")
    folder = saved_split(tmp_path / "saved", [grey(1), grey(1)],
                         images=[rgb(), {"bytes": (tmp_path / "frame.png").read_bytes(), "path": None}])
    with pytest.raises(InvalidSampleError, match="Example 1 of split 'train' .*Cannot read image"):
        load_segmentation_dataset(folder, id2label={0: "a", 1: "b"})


def test_an_integer_label_column_is_refused_clearly(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [rgb()], "label": [0]}, features=features).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"column 'label' holds Value\('int64'\), not images"):
        load_segmentation_dataset(tmp_path / "saved", id2label={0: "a"})


def test_a_folder_tree_given_as_a_datasets_data_set_names_the_fitting_type(tmp_path):
    root = cityscapes_tree(tmp_path / "cs", [("aachen", "x")])
    with pytest.raises(ValueError, match=rf"{root} is a folder in the cityscapes layout.*--dataset_type cityscapes"):
        load_segmentation_dataset(root, id2label={0: "a"})
    root = ade20k_tree(tmp_path / "ade", ["x.jpg"])
    with pytest.raises(ValueError, match=rf"{root} is a folder in the ade20k layout.*--dataset_type ade20k"):
        load_segmentation_dataset(root, id2label={0: "a"})


def test_evaluation_names_a_label_of_another_size_than_its_image():
    split = datasets.Dataset.from_dict({"image": [rgb(), rgb()], "label": [grey(1), grey(1, size=(8, 8))]},
                                       features=FEATURES)
    model = PCAAForSemanticSegmentation(small_config(num_labels=2)).eval()
    with pytest.raises(ValueError, match=r"Evaluation example 1: Image of size \(16, 16\) and label of size \(8, 8\)"):
        evaluate_segmentation(model, split.with_transform(EvalTransform()), num_labels=2)


# Item 8: model and processor inputs


def nan_image():
    image = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    image[0, 0, 0] = np.nan
    return image


def test_nan_or_infinite_pixels_are_refused_by_processor_model_and_training_transform():
    with pytest.raises(ValueError, match="Image 0 holds NaN or infinite pixel values"):
        PCAAImageProcessor()(nan_image(), do_rescale=False)
    pixel_values = torch.zeros(1, 3, 32, 32)
    pixel_values[0, 1, 2, 3] = float("inf")
    model = PCAAForSemanticSegmentation(small_config())
    for mode in (model.eval, model.train):
        mode()
        with pytest.raises(ValueError, match="`pixel_values` holds NaN or infinite values"):
            model(pixel_values.expand(2, -1, -1, -1))
    transform = TrainTransform(base_size=(SIZE, SIZE), crop_size=(SIZE, SIZE))
    with pytest.raises(ValueError, match="float32 holding NaN or infinite values"):
        transform({"image": [nan_image() * 255], "label": [np.zeros((SIZE, SIZE), np.uint8)]})


def test_rescaling_images_already_in_zero_one_warns_as_transformers_does():
    logger = image_processing_pcaa.logger
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        PCAAImageProcessor()(np.full((SIZE, SIZE, 3), 0.5, np.float32))
    assert "trying to rescale already rescaled images" in captured.out
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        PCAAImageProcessor()(np.full((SIZE, SIZE, 3), 0.5, np.float32), do_rescale=False)
        PCAAImageProcessor()(np.full((SIZE, SIZE, 3), 128, np.uint8))
    assert captured.out == ""


def test_numpy_pixel_values_get_a_type_error():
    model = PCAAForSemanticSegmentation(small_config()).eval()
    with pytest.raises(TypeError, match="`pixel_values` must be a torch.Tensor.*got ndarray"):
        model(np.zeros((1, 3, 32, 32), np.float32))


def test_keep_ratio_resize_of_a_very_elongated_image_keeps_one_pixel():
    assert keep_ratio_size(1, 5000, 2048, 1024) == (1, 2048)
    processed = PCAAImageProcessor()(PIL.Image.new("RGB", (5000, 1)), do_resize=True, return_tensors="pt",
                                     size={"longest_edge": 2048, "shortest_edge": 1024})
    assert processed["pixel_values"].shape == (1, 3, 1, 2048)


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """PIL's decompression-bomb limit at 100 pixels: a 12x12 image warns (over the limit), a 16x16 one fails (over
    twice the limit)."""
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)


@pytest.mark.parametrize("side", [12, 16], ids=["warning", "error"])
def test_a_decompression_bomb_is_a_clear_error_naming_the_file(tmp_path, small_pixel_limit, side):
    path = tmp_path / "bomb.png"
    rgb(size=(side, side)).save(path)
    with pytest.raises(ValueError, match=rf"Cannot read image {path}: .*decompression bomb.*MAX_IMAGE_PIXELS"):
        open_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = cityscapes_tree(tmp_path / "cs", [("aachen", "x")])
        rgb(size=(side, side)).save(root / "leftImg8bit" / "val" / "aachen" / "x_leftImg8bit.png")
        with pytest.raises(InvalidSampleError, match="Cannot read image .*x_leftImg8bit.png.*decompression bomb"):
            build_cityscapes(root, cache_dir=tmp_path / "cache")


def test_predict_skips_a_decompression_bomb_under_skip_invalid(tmp_path, small_pcaa_folder, small_pixel_limit,
                                                               caplog):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rgb(size=(8, 8)).save(inputs / "fine.png")
    rgb(size=(16, 16)).save(inputs / "bomb.png")
    output = tmp_path / "out"
    assert predict_main([str(small_pcaa_folder), str(inputs), "--output_dir", str(output), "--device", "cpu"]) == 2
    caplog.clear()
    assert predict_main([str(small_pcaa_folder), str(inputs), "--output_dir", str(output), "--device", "cpu",
                         "--skip_invalid"]) == 0
    assert (output / "fine_mask.png").is_file() and not (output / "bomb_mask.png").exists()
    assert any("bomb.png" in record.getMessage() and "decompression bomb" in record.getMessage()
               for record in caplog.records)


def half_transparent_image():
    """16x16 RGBA: the left half opaque red, the right half fully transparent black."""
    pixels = np.zeros((SIZE, SIZE, 4), np.uint8)
    pixels[:, : SIZE // 2] = (255, 0, 0, 255)
    return PIL.Image.fromarray(pixels, mode="RGBA")


def test_transparency_is_composited_on_white_in_training_evaluation_and_prediction():
    image, label = half_transparent_image(), np.zeros((SIZE, SIZE), np.uint8)
    processor = PCAAImageProcessor()
    evaluated = EvalTransform(image_processor=processor)({"image": [image], "label": [label]})["pixel_values"][0]
    trained = TrainTransform(base_size=(SIZE, SIZE), crop_size=(SIZE, SIZE), ratio_range=(1.0, 1.0),
                             flip_probability=0.0, photometric=False, image_processor=processor)(
        {"image": [image], "label": [label]})["pixel_values"][0]
    white = processor(rgb(255))["pixel_values"][0]
    np.testing.assert_allclose(trained, evaluated, atol=1e-5)
    np.testing.assert_allclose(evaluated[:, :, SIZE // 2:], white[:, :, SIZE // 2:], atol=1e-5)

    predictor = Predictor(PCAAForSemanticSegmentation(small_config()).eval(), processor, SegmentationInference(), "out")
    pixel_values, drawn = predictor.read(image)
    np.testing.assert_allclose(pixel_values[0].numpy(), evaluated, atol=1e-5)
    assert np.asarray(drawn)[0, -1].tolist() == [255, 255, 255]

