import json
import warnings

import datasets
import numpy as np
import pytest
from PIL import Image

from pcaa_hf.data import builders as segmentation_data
from pcaa_hf.data.builders import (
    InvalidSampleError,
    build_ade20k,
    build_cityscapes,
    label_names,
    load_segmentation_dataset,
)
from pcaa_hf.data.label_sets import ADE20K_LABELS, CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_LABELS
from pcaa_hf.data.synthetic import write_ade20k_tree, write_cityscapes_tree


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    write_cityscapes_tree(root, num_train=4, num_val=2, num_test=1, size=(128, 64), seed=0)
    return root


@pytest.fixture(scope="module")
def ade20k_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    write_ade20k_tree(root, num_train=3, num_val=2, size=(96, 64), seed=0)
    return root


def copy_tree(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_cityscapes_builder_maps_label_ids_to_train_ids(cityscapes_root, tmp_path):
    built = build_cityscapes(cityscapes_root, cache_dir=tmp_path / "cache")
    assert set(built) == {"train", "validation", "test"}
    assert [len(built[s]) for s in ("train", "validation", "test")] == [4, 2, 1]
    assert built["train"].features == datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    assert label_names(built) == dict(enumerate(CITYSCAPES_LABELS))

    example = built["train"][0]
    image_file = sorted((cityscapes_root / "leftImg8bit" / "train").glob("*/*.png"))[0]
    label_file = sorted((cityscapes_root / "gtFine" / "train").glob("*/*_labelIds.png"))[0]
    assert np.array_equal(np.asarray(example["image"]), np.asarray(Image.open(image_file)))
    ids = np.asarray(Image.open(label_file))
    expected = np.vectorize(lambda v: CITYSCAPES_ID_TO_TRAIN_ID[v])(ids)
    assert np.array_equal(np.asarray(example["label"]), expected)
    assert 255 in expected and set(np.unique(expected)) - {255} <= set(range(19))

    # Images are kept as paths in the Arrow table and decoded only when read.
    raw = built["train"].data.column("image")[0].as_py()
    assert raw["bytes"] is None and raw["path"] == str(image_file)


def test_a_second_build_reuses_the_cache(cityscapes_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    original = segmentation_data.check_image
    monkeypatch.setattr(segmentation_data, "check_image", lambda path: calls.append(path) or original(path))
    build_cityscapes(cityscapes_root, cache_dir=cache)
    first = len(calls)
    again = build_cityscapes(cityscapes_root, cache_dir=cache)
    assert first == 7 and len(calls) == first  # nothing was read again
    assert len(again["train"]) == 4 and label_names(again)[0] == "road"


def test_ade20k_builder_reduces_labels(ade20k_root, tmp_path):
    for root in (ade20k_root, ade20k_root / "ADEChallengeData2016"):
        built = build_ade20k(root, cache_dir=tmp_path / "cache")
        assert [len(built["train"]), len(built["validation"])] == [3, 2]
    assert label_names(built) == dict(enumerate(ADE20K_LABELS))
    annotation = np.asarray(Image.open(sorted((ade20k_root / "ADEChallengeData2016" / "annotations" / "training")
                                              .glob("*.png"))[0]))
    label = np.asarray(built["train"][0]["label"])
    assert np.array_equal(label[annotation == 0], np.full((annotation == 0).sum(), 255))
    assert np.array_equal(label[annotation > 0], annotation[annotation > 0] - 1)


def test_any_dataset_through_load_dataset(cityscapes_root, tmp_path):
    built = build_cityscapes(cityscapes_root, cache_dir=tmp_path / "cache")
    renamed = built.rename_columns({"image": "pixel_values", "label": "annotation"})
    renamed.save_to_disk(tmp_path / "saved")
    loaded = load_segmentation_dataset(tmp_path / "saved", image_column="pixel_values", label_column="annotation",
                                       id2label=dict(enumerate(CITYSCAPES_LABELS)))
    assert loaded["train"].column_names == ["image", "label"]
    assert np.array_equal(np.asarray(loaded["train"][1]["label"]), np.asarray(built["train"][1]["label"]))
    assert label_names(loaded)[18] == "bicycle"

    renamed["validation"].to_parquet(tmp_path / "validation.parquet")
    (tmp_path / "names.json").write_text(json.dumps(dict(enumerate(CITYSCAPES_LABELS))))
    parquet = load_segmentation_dataset("parquet", image_column="pixel_values", label_column="annotation",
                                        id2label=tmp_path / "names.json",
                                        data_files={"validation": str(tmp_path / "validation.parquet")},
                                        label_map={0: 1}, reduce_labels=True)
    expected = np.asarray(built["validation"][0]["label"]).astype(int)
    expected = np.where(expected == 0, 1, expected)
    expected = np.where(expected == 255, 255, np.where(expected == 0, 255, expected - 1))
    assert np.array_equal(np.asarray(parquet["validation"][0]["label"]), expected)
    assert label_names(parquet) == dict(enumerate(CITYSCAPES_LABELS))

    with pytest.raises(KeyError, match="no column 'mask'"):
        load_segmentation_dataset(tmp_path / "saved", image_column="pixel_values", label_column="mask",
                                  id2label={0: "a"})
    with pytest.raises(FileNotFoundError, match="No label names"):
        load_segmentation_dataset(tmp_path / "saved", image_column="pixel_values", label_column="annotation")


def test_missing_folders_and_splits_are_named(cityscapes_root, ade20k_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_cityscapes(tmp_path / "nowhere")
    partial = copy_tree(cityscapes_root, tmp_path / "partial")
    import shutil

    shutil.rmtree(partial / "gtFine" / "val")
    with pytest.raises(FileNotFoundError, match="split 'val' is missing.*gtFine/val"):
        build_cityscapes(partial, cache_dir=tmp_path / "cache")
    ade = copy_tree(ade20k_root, tmp_path / "ade")
    shutil.rmtree(ade / "ADEChallengeData2016" / "images" / "validation")
    with pytest.raises(FileNotFoundError, match="split 'validation' is missing"):
        build_ade20k(ade, cache_dir=tmp_path / "cache")


def test_unpaired_files_are_named_and_counted(cityscapes_root, tmp_path):
    root = copy_tree(cityscapes_root, tmp_path / "unpaired")
    labels = sorted((root / "gtFine" / "train").glob("*/*_labelIds.png"))
    for label in labels[:3]:
        label.unlink()
    extra = root / "gtFine" / "train" / "aachen" / "aachen_999999_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((64, 128), np.uint8)).save(extra)
    with pytest.raises(FileNotFoundError) as error:
        build_cityscapes(root, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "3 images without a label" in message and "1 labels without an image" in message
    assert "aachen_999999_000019_gtFine_labelIds.png" in message


def test_corrupt_files_and_invalid_label_values(cityscapes_root, tmp_path):
    root = copy_tree(cityscapes_root, tmp_path / "broken")
    image = sorted((root / "leftImg8bit" / "train").glob("*/*.png"))[1]
    image.write_bytes(image.read_bytes()[:200])  # truncated
    with pytest.raises(InvalidSampleError, match=f"Cannot read image {image}"):
        build_cityscapes(root, cache_dir=tmp_path / "cache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = build_cityscapes(root, cache_dir=tmp_path / "cache", skip_invalid=True)
    assert len(skipped["train"]) == 3
    assert any(str(image) in str(w.message) for w in caught)

    root = copy_tree(cityscapes_root, tmp_path / "invalid")
    label = sorted((root / "gtFine" / "val").glob("*/*_labelIds.png"))[0]
    values = np.asarray(Image.open(label)).copy()
    values[0, 0] = 77  # not a Cityscapes label id
    Image.fromarray(values).save(label)
    with pytest.raises(InvalidSampleError, match=r"not Cityscapes label ids: \[77\]"):
        build_cityscapes(root, cache_dir=tmp_path / "cache", skip_invalid=False)


def test_ade20k_values_above_150_are_refused(ade20k_root, tmp_path):
    root = copy_tree(ade20k_root, tmp_path / "ade")
    annotation = sorted((root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))[0]
    values = np.asarray(Image.open(annotation)).copy()
    values[0, 0] = 200
    Image.fromarray(values).save(annotation)
    with pytest.raises(InvalidSampleError, match=f"{annotation.name} holds values above 150: 200"):
        build_ade20k(root, cache_dir=tmp_path / "cache")


def test_generator_scripts_write_the_real_layouts(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    subprocess.run([sys.executable, str(scripts / "make_synthetic_cityscapes.py"), "--output", str(tmp_path / "cs"),
                    "--num-train", "3", "--num-val", "2", "--size", "96", "48", "--seed", "5"], check=True,
                   capture_output=True)
    # The first spellings (--num-train, which other tools pass) and the snake_case ones are one option.
    subprocess.run([sys.executable, str(scripts / "make_synthetic_ade20k.py"), "--output", str(tmp_path / "ade"),
                    "--num_train", "2", "--num-val", "1", "--size", "64", "48"], check=True, capture_output=True)
    cityscapes = build_cityscapes(tmp_path / "cs", cache_dir=tmp_path / "cache")
    assert [len(cityscapes[s]) for s in ("train", "validation")] == [3, 2]
    frame = np.asarray(cityscapes["train"][0]["image"])
    assert frame.shape == (48, 96, 3)
    ids = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel()
                                    for p in (tmp_path / "cs" / "gtFine").rglob("*_labelIds.png")]))
    assert {7, 11, 23} <= set(ids.tolist()) and 1 in ids  # road, building, sky, and an id that maps to 255
    ade = build_ade20k(tmp_path / "ade", cache_dir=tmp_path / "cache")
    assert [len(ade["train"]), len(ade["validation"])] == [2, 1]


def test_rotated_images_are_refused_and_changed_files_rebuilt(ade20k_root, tmp_path):
    root = copy_tree(ade20k_root, tmp_path / "ade")
    built = build_ade20k(root, cache_dir=tmp_path / "cache")
    annotation = sorted((root / "ADEChallengeData2016" / "annotations" / "training").glob("*.png"))[0]
    values = np.asarray(Image.open(annotation)).copy()
    values[:] = 1
    Image.fromarray(values).save(annotation)  # a changed file is read again, not taken from the cache
    rebuilt = build_ade20k(root, cache_dir=tmp_path / "cache")
    assert not np.array_equal(np.asarray(rebuilt["train"][0]["label"]), np.asarray(built["train"][0]["label"]))
    assert set(np.unique(np.asarray(rebuilt["train"][0]["label"]))) == {0}

    image_path = sorted((root / "ADEChallengeData2016" / "images" / "training").glob("*.jpg"))[1]
    image = Image.open(image_path)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(image_path, exif=exif)
    with pytest.raises(InvalidSampleError, match="EXIF orientation 6"):
        build_ade20k(root, cache_dir=tmp_path / "cache")


def test_load_dataset_split_names_streaming_and_colour_labels(cityscapes_root, tmp_path):
    built = build_cityscapes(cityscapes_root, cache_dir=tmp_path / "cache")
    built["validation"].to_parquet(tmp_path / "validation.parquet")
    one = load_segmentation_dataset("parquet", id2label=dict(enumerate(CITYSCAPES_LABELS)), split="validation",
                                    data_files={"validation": str(tmp_path / "validation.parquet")})
    assert list(one) == ["validation"]
    with pytest.raises(ValueError, match="Streaming"):
        load_segmentation_dataset("parquet", id2label={0: "road"}, streaming=True,
                                  data_files={"validation": str(tmp_path / "validation.parquet")})
    coloured = built["validation"].map(lambda e: {"label": e["image"]})
    coloured.save_to_disk(tmp_path / "coloured")
    with pytest.raises(ValueError, match="colour images"):
        load_segmentation_dataset(tmp_path / "coloured", id2label={0: "road"})
