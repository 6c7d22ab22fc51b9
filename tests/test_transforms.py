import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from pcaa_hf import PCAAImageProcessor
from pcaa_hf.data.builders import build_cityscapes
from pcaa_hf.data.transforms import (
    EvalTransform,
    TrainTransform,
    adjust_saturation,
    collate,
    nearest_indices,
    photometric_distortion,
    resized_crop,
    shift_hue,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def denormalise(pixel_values):
    return np.rint((pixel_values.transpose(1, 2, 0) * STD + MEAN) * 255).astype(int)


def batch_of(image, label):
    return {"image": [Image.fromarray(image)], "label": [Image.fromarray(label)]}


def test_resized_crop_equals_resizing_everything_then_cropping():
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    size = (97, 145)
    whole = resized_crop(image, size, 0, 0, *size)
    assert np.array_equal(resized_crop(image, size, 20, 33, 50, 70), whole[20:70, 33:103])
    reference = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=size, mode="bilinear",
                              align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(whole.astype(float) - reference).max() <= 0.5 + 1e-3  # bilinear, rounded to uint8

    label = np.random.default_rng(1).integers(0, 19, (60, 90))
    rows, cols = nearest_indices(60, 97, 0, 97), nearest_indices(90, 145, 0, 145)
    nearest = F.interpolate(torch.from_numpy(label)[None, None].float(), size=size, mode="nearest")[0, 0].long()
    assert np.array_equal(label[rows[:, None], cols[None, :]], nearest.numpy())


def test_output_sizes_and_padding_values():
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    label = np.ones((40, 60), dtype=np.uint8)
    transform = TrainTransform(base_size=(60, 40), crop_size=(64, 96), ratio_range=(1.0, 1.0), photometric=False,
                               cat_max_ratio=1.0)
    out = transform(batch_of(image, label))
    pixels, labels = out["pixel_values"][0], out["labels"][0]
    assert pixels.shape == (3, 64, 96) and pixels.dtype == np.float32
    assert labels.shape == (64, 96) and labels.dtype == np.int64
    assert np.all(pixels[:, 40:, :] == 0) and np.all(pixels[:, :, 60:] == 0)  # padded with 0 after normalisation
    assert np.all(labels[40:, :] == 255) and np.all(labels[:, 60:] == 255)
    assert np.all(labels[:40, :60] == 1) and np.allclose(pixels[:, :40, :60], ((128 / 255 - MEAN) / STD)[:, None, None])


def test_random_rescale_stays_in_the_ratio_range():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    label = np.zeros((100, 200), dtype=np.uint8)
    transform = TrainTransform(base_size=(200, 100), crop_size=(1000, 1000), ratio_range=(0.5, 2.0),
                               photometric=False, cat_max_ratio=1.0, seed=3)
    heights = []
    for _ in range(30):
        labels = transform(batch_of(image, label))["labels"][0]
        heights.append(int((labels[:, 0] != 255).sum()))
    assert 50 <= min(heights) < 70 and 170 < max(heights) <= 200


def test_cat_max_ratio_is_honoured_when_a_good_crop_exists():
    label = np.zeros((200, 200), dtype=np.uint8)
    label[:90, :90] = 1  # only crops near the top-left corner see two classes in balance
    image = np.zeros((200, 200, 3), dtype=np.uint8)

    def balanced_crops(cat_max_ratio):
        good = 0
        for seed in range(20):
            transform = TrainTransform(base_size=(200, 200), crop_size=(100, 100), ratio_range=(1.0, 1.0),
                                       photometric=False, flip_probability=0.0, cat_max_ratio=cat_max_ratio,
                                       seed=seed)
            crop = transform(batch_of(image, label))["labels"][0]
            counts = np.bincount(crop.ravel(), minlength=2)
            good += counts.max() / counts.sum() < 0.75
        return good

    assert balanced_crops(0.75) >= 17
    assert balanced_crops(1.0) <= 10


def test_flip_moves_image_and_label_together():
    label = np.random.default_rng(0).integers(0, 19, (32, 48)).astype(np.uint8)
    image = np.repeat((label * 10)[..., None], 3, axis=2).astype(np.uint8)
    flipped = 0
    for seed in range(8):
        transform = TrainTransform(base_size=(48, 32), crop_size=(32, 48), ratio_range=(1.0, 1.0),
                                   photometric=False, cat_max_ratio=1.0, seed=seed)
        out = transform(batch_of(image, label))
        labels, channel = out["labels"][0], denormalise(out["pixel_values"][0])[..., 0]
        assert np.array_equal(channel, labels * 10)
        flipped += not np.array_equal(labels, label)
    assert 0 < flipped < 8


def test_same_seed_same_batch_and_normalisation_shared_with_the_processor():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (64, 96)).astype(np.uint8)
    first, second, other = (TrainTransform(base_size=(96, 64), crop_size=(48, 48), seed=s) for s in (7, 7, 8))
    a, b, c = first(batch_of(image, label)), second(batch_of(image, label)), other(batch_of(image, label))
    assert np.array_equal(a["pixel_values"][0], b["pixel_values"][0])
    assert np.array_equal(a["labels"][0], b["labels"][0])
    assert not np.array_equal(a["pixel_values"][0], c["pixel_values"][0])

    plain = TrainTransform(base_size=(96, 64), crop_size=(64, 96), ratio_range=(1.0, 1.0), photometric=False,
                           flip_probability=0.0, cat_max_ratio=1.0)
    expected = PCAAImageProcessor()(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(plain(batch_of(image, label))["pixel_values"][0], expected, rtol=1e-5, atol=1e-5)


def test_saturation_and_hue_match_colorsys():
    image = np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert np.abs(adjust_saturation(image, 1.0).astype(int) - image).max() <= 1
    assert np.abs(shift_hue(image, 0).astype(int) - image).max() <= 1
    saturated, shifted = adjust_saturation(image, 1.3), shift_hue(image, 17)
    for (y, x) in [(0, 0), (3, 7), (15, 15), (8, 2)]:
        h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255.0))
        s_scaled = min(int(round(255 * s) * 1.3), 255) / 255.0
        expected = np.array(colorsys.hsv_to_rgb(h, s_scaled, v)) * 255
        assert np.abs(saturated[y, x] - expected).max() <= 1.5
        expected = np.array(colorsys.hsv_to_rgb((h + 17 * 2 / 360) % 1.0, s, v)) * 255
        assert np.abs(shifted[y, x] - expected).max() <= 1.0


def test_photometric_distortion_keeps_uint8_and_changes_images():
    image = np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    grey = np.full((4, 4, 3), 90, dtype=np.uint8)
    assert np.array_equal(shift_hue(grey, 9), grey) and np.array_equal(adjust_saturation(grey, 1.4), grey)
    changed = 0
    for seed in range(10):
        out = photometric_distortion(image, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == image.shape
        changed += not np.array_equal(out, image)
    assert changed >= 8


def test_eval_transform_keeps_labels_at_full_resolution(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 19, (100, 150)).astype(np.uint8)
    out = EvalTransform(base_size=(300, 80))(batch_of(image, label))
    assert out["pixel_values"][0].shape == (3, 80, 120)
    assert np.array_equal(out["labels"][0], label)
    processor = PCAAImageProcessor(do_resize=True, size={"longest_edge": 300, "shortest_edge": 80})
    assert np.array_equal(out["pixel_values"][0], processor(image)["pixel_values"][0])
    assert EvalTransform()(batch_of(image, label))["pixel_values"][0].shape == (3, 100, 150)


def test_collate_stacks_and_pads():
    examples = [{"pixel_values": np.ones((3, 4, 6), np.float32), "labels": np.zeros((4, 6), np.int64)},
                {"pixel_values": np.ones((3, 5, 5), np.float32), "labels": np.ones((5, 5), np.int64)}]
    batch = collate(examples)
    assert batch["pixel_values"].shape == (2, 3, 5, 6) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (2, 5, 6) and batch["labels"].dtype == torch.int64
    assert batch["pixel_values"][0, :, 4:].abs().sum() == 0 and (batch["labels"][0, 4:] == 255).all()
    assert (batch["labels"][1, :, 5] == 255).all()


def test_with_transform_through_a_dataloader(cityscapes_tree, tmp_path):
    splits = build_cityscapes(cityscapes_tree, cache_dir=tmp_path / "cache")  # 4 training frames of 128x64
    train = splits["train"].with_transform(TrainTransform(base_size=(128, 64), crop_size=(64, 64), seed=0))
    batches = [next(iter(DataLoader(train, batch_size=2, collate_fn=collate))) for _ in range(2)]
    assert batches[0]["pixel_values"].shape == (2, 3, 64, 64) and batches[0]["labels"].shape == (2, 64, 64)
    assert set(batches[0]["labels"].unique().tolist()) <= set(range(19)) | {255}
    assert not torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])  # a new draw every call
    validation = splits["validation"].with_transform(EvalTransform())
    batch = next(iter(DataLoader(validation, batch_size=1, collate_fn=collate)))
    assert batch["pixel_values"].shape == (1, 3, 64, 128) and batch["labels"].shape == (1, 64, 128)


def test_workers_draw_new_augmentations_every_epoch_and_reproducibly(cityscapes_tree, tmp_path):
    train = build_cityscapes(cityscapes_tree, cache_dir=tmp_path / "cache")["train"]
    train = train.with_transform(TrainTransform(base_size=(128, 64), crop_size=(48, 48), seed=0))

    def two_epochs():
        torch.manual_seed(0)
        loader = DataLoader(train, batch_size=2, num_workers=2, collate_fn=collate)
        return [torch.cat([batch["pixel_values"] for batch in loader]) for _ in range(2)]

    first_run, second_run = two_epochs(), two_epochs()
    assert not torch.equal(first_run[0], first_run[1])  # epochs differ
    assert torch.equal(first_run[0], second_run[0]) and torch.equal(first_run[1], second_run[1])  # reproducible


def test_sixteen_bit_images_and_colour_labels():
    deep = (np.random.default_rng(0).random((32, 48)) * 65535).astype(np.uint16)
    label = np.zeros((32, 48), dtype=np.uint8)
    transform = TrainTransform(base_size=(48, 32), crop_size=(32, 48), ratio_range=(1.0, 1.0), photometric=False,
                               flip_probability=0.0, cat_max_ratio=1.0)
    out = transform({"image": [Image.fromarray(deep)], "label": [Image.fromarray(label)]})["pixel_values"][0]
    expected = PCAAImageProcessor()(Image.fromarray(deep))["pixel_values"][0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="single-channel"):
        transform({"image": [Image.fromarray(deep)], "label": [Image.fromarray(np.zeros((32, 48, 3), np.uint8))]})
