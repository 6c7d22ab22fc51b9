import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor
from transformers.image_utils import PILImageResampling

from pcaa_hf import PCAAForSemanticSegmentation, PCAAImageProcessor
from pcaa_hf.data.label_sets import CITYSCAPES_ID_TO_TRAIN_ID
from pcaa_hf.model.image_processing_pcaa import keep_ratio_size
from pcaa_hf.model.modeling_pcaa import PCAASemanticSegmenterOutput
from pcaa_testing import small_config

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def normalised(rgb):
    """The processor's expected output for 8-bit RGB values, (3,)."""
    return (np.asarray(rgb, dtype=np.float64) / 255 - MEAN) / STD


def pixel(processor_output, y=0, x=0):
    return processor_output["pixel_values"][0][:, y, x].numpy()


def test_rgb_rescale_and_imagenet_normalisation():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[1, 2] = (10, 128, 250)
    out = PCAAImageProcessor()(PIL.Image.fromarray(image), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 4, 6) and out["pixel_values"].dtype == torch.float32
    np.testing.assert_allclose(pixel(out, 1, 2), normalised((10, 128, 250)), rtol=1e-5)


def test_grayscale_rgba_and_16_bit_inputs_become_rgb():
    processor = PCAAImageProcessor()
    gray = np.full((3, 5), 77, dtype=np.uint8)
    for image in (gray, PIL.Image.fromarray(gray)):
        np.testing.assert_allclose(pixel(processor(image, return_tensors="pt")), normalised((77, 77, 77)), rtol=1e-5)

    rgba = np.zeros((3, 5, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 10)
    rgba[0, 0, 3] = 0  # fully transparent: composited on white
    rgba[0, 1, 3] = 255
    out = processor(PIL.Image.fromarray(rgba), return_tensors="pt")
    np.testing.assert_allclose(pixel(out, 0, 0), normalised((255, 255, 255)), rtol=1e-5)
    np.testing.assert_allclose(pixel(out, 0, 1), normalised((200, 10, 10)), rtol=1e-5)

    sixteen = np.full((3, 5), 65535, dtype=np.uint16)
    sixteen[0, 0] = 257 * 40
    out = processor(PIL.Image.fromarray(sixteen), return_tensors="pt")
    np.testing.assert_allclose(pixel(out, 0, 0), normalised((40, 40, 40)), rtol=1e-5)
    np.testing.assert_allclose(pixel(out, 1, 1), normalised((255, 255, 255)), rtol=1e-5)
    colour16 = np.zeros((5, 6, 3), dtype=np.uint16)
    colour16[...] = (257 * 3, 257 * 100, 257 * 255)
    np.testing.assert_allclose(pixel(processor(colour16, return_tensors="pt")), normalised((3, 100, 255)), rtol=1e-5)


@pytest.mark.parametrize(
    "height, width, scale, expected",
    [
        (1024, 2048, (2048, 1024), (1024, 2048)),
        (512, 683, (2048, 512), (512, 683)),
        (375, 500, (2048, 512), (512, 683)),  # scale min(2048/500, 512/375) = 1.365..., 500 * 1.365 = 682.7
        (1024, 2048, (2048, 512), (512, 1024)),
        (300, 4000, (2048, 512), (154, 2048)),  # the long side binds
        (1024, 1365, (2048, 512), (512, 683)),  # 682.5 rounds half up, as mmcv's int(x + 0.5)
    ],
)
def test_keep_ratio_size_follows_mmsegmentation(height, width, scale, expected):
    assert keep_ratio_size(height, width, *scale) == expected


def test_keep_ratio_resize_of_images_and_maps():
    processor = PCAAImageProcessor(do_resize=True, size={"longest_edge": 2048, "shortest_edge": 512})
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    labels = np.zeros((375, 500), dtype=np.uint8)
    labels[:, 250:] = 3
    out = processor(image, segmentation_maps=labels, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 512, 683) and out["labels"].shape == (1, 512, 683)
    assert set(out["labels"].unique().tolist()) == {0, 3}  # nearest neighbour: no new values
    expected = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(512, 683),
                             mode="bilinear", align_corners=False)[0]
    expected = (expected / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(out["pixel_values"][0], expected.float(), rtol=1e-5, atol=1e-5)

    fixed = PCAAImageProcessor(do_resize=True, size={"height": 64, "width": 32})
    assert fixed(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 32)
    swapped = PCAAImageProcessor(do_resize=True, size={"longest_edge": 512, "shortest_edge": 2048})
    assert swapped(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 512, 683)  # mmseg takes max/min

    bicubic = PCAAImageProcessor(do_resize=True, size={"height": 64, "width": 32}, resample=PILImageResampling.BICUBIC)
    assert not torch.equal(bicubic(image, return_tensors="pt")["pixel_values"],
                           fixed(image, return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="NEAREST, BILINEAR or BICUBIC"):
        PCAAImageProcessor(do_resize=True, size={"height": 64, "width": 32}, resample=PILImageResampling.LANCZOS)(
            image)


def test_reduce_labels_and_label_map():
    # Images of shape (2, N, 3): unambiguously channels-last.
    maps = np.array([[0, 1, 2, 150, 255]] * 2, dtype=np.uint8)
    reduced = PCAAImageProcessor(do_reduce_labels=True)(np.zeros((2, 5, 3), np.uint8), segmentation_maps=maps)
    assert reduced["labels"][0].tolist() == [[255, 0, 1, 149, 255]] * 2

    ids = np.array([[7, 26, 0, 33, 1, 200]] * 2, dtype=np.uint8)
    cityscapes = PCAAImageProcessor(label_map=CITYSCAPES_ID_TO_TRAIN_ID)
    labels = cityscapes(np.zeros((2, 6, 3), np.uint8), segmentation_maps=ids, return_tensors="pt")["labels"]
    assert labels.dtype == torch.int64 and labels[0].tolist() == [[0, 13, 255, 18, 255, 200]] * 2

    wide = np.array([[-1, 7, 2**31 - 1]] * 2, dtype=np.int64)  # no wrap-around, no table of 2**31 entries
    mapped = PCAAImageProcessor(label_map={-1: 255, 7: 0})(np.zeros((2, 3, 3), np.uint8), segmentation_maps=wide)
    assert mapped["labels"][0].tolist() == [[255, 0, 2**31 - 1]] * 2

    both = PCAAImageProcessor(label_map={5: 0}, do_reduce_labels=True)  # the map first, then the reduction
    result = both(np.zeros((2, 2, 3), np.uint8), segmentation_maps=np.array([[5, 1]] * 2, np.uint8))
    assert result["labels"][0].tolist() == [[255, 0]] * 2


def test_processor_round_trip_keeps_every_setting(tmp_path):
    processor = PCAAImageProcessor(label_map=CITYSCAPES_ID_TO_TRAIN_ID, do_resize=True,
                                   size={"longest_edge": 2048, "shortest_edge": 1024})
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is PCAAImageProcessor
    image = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    ids = np.random.default_rng(2).integers(0, 34, (20, 30), dtype=np.uint8)
    a = processor(image, segmentation_maps=ids, return_tensors="pt")
    b = reloaded(image, segmentation_maps=ids, return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def test_post_processing_resizes_bilinearly_then_takes_the_argmax():
    processor = PCAAImageProcessor()
    logits = torch.randn(2, 5, 7, 9)
    outputs = PCAASemanticSegmenterOutput(logits=logits)
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(50, 70), (13, 17)])
    for index, (segmentation, size) in enumerate(zip(maps, [(50, 70), (13, 17)])):
        expected = F.interpolate(logits[index: index + 1], size=size, mode="bilinear", align_corners=False)
        assert segmentation.dtype == torch.int64 and torch.equal(segmentation, expected[0].argmax(0))
    native = processor.post_process_semantic_segmentation(outputs)
    assert [m.shape for m in native] == [(7, 9), (7, 9)]
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        processor.post_process_semantic_segmentation(PCAASemanticSegmenterOutput(logits=logits[:1]), [(1, 1)] * 2)


def test_bad_inputs_get_clear_errors():
    processor = PCAAImageProcessor()
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="No images were given"):
        processor([])
    with pytest.raises(ValueError, match=r"Segmentation map 1 has size \(9, 12\) but its image has size \(10, 12\)"):
        processor([image, image], segmentation_maps=[np.zeros((10, 12), np.uint8), np.zeros((9, 12), np.uint8)])
    with pytest.raises(ValueError, match="2 images but 1 segmentation maps"):
        processor([image, image], segmentation_maps=[np.zeros((10, 12), np.uint8)])
    with pytest.raises(ValueError, match="different sizes"):
        processor([image, np.zeros((8, 12, 3), np.uint8)], return_tensors="pt")
    assert len(processor([image, np.zeros((8, 12, 3), np.uint8)])["pixel_values"]) == 2  # fine as a list
    with pytest.raises(ValueError, match="No images were given"):
        processor(np.zeros((0, 10, 12, 3), np.uint8))
    with pytest.raises(ValueError, match="single-channel"):
        processor(image, segmentation_maps=PIL.Image.new("RGB", (12, 10)))
    with pytest.raises(ValueError, match="1 images but 10 segmentation maps.*single-channel"):
        processor(image, segmentation_maps=np.zeros((10, 12, 3), np.uint8))
    for setting in ({"do_pad": True}, {"do_center_crop": True, "crop_size": {"height": 4, "width": 4}},
                    {"data_format": "channels_last"}):
        with pytest.raises(ValueError, match="does not support|channels-first"):
            processor(image, **setting)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor("/nonexistent/missing.png")


def test_paths_are_opened_without_losing_16_bit_depth_or_alpha(tmp_path):
    processor = PCAAImageProcessor()
    sixteen = PIL.Image.fromarray((np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16))
    rgba = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 255, (20, 30, 4), dtype=np.uint8))
    for name, image in (("deep.png", sixteen), ("alpha.png", rgba)):
        image.save(tmp_path / name)
        from_path = processor(str(tmp_path / name), return_tensors="pt")["pixel_values"]
        from_object = processor(image, return_tensors="pt")["pixel_values"]
        assert torch.equal(from_path, from_object), name


def test_labels_outside_the_label_set_are_refused_by_the_model():
    processor = PCAAImageProcessor()
    model = PCAAForSemanticSegmentation(small_config(num_labels=5)).eval()
    inputs = processor(np.zeros((32, 32, 3), np.uint8), segmentation_maps=np.full((32, 32), 9, np.uint8),
                       return_tensors="pt")
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*\[9\]"):
        model(**inputs)


def test_images_smaller_than_the_stride_work():
    """Documented behaviour: any size works; a 3x5 image gives 1x1 logits and a 3x5 class map."""
    processor = PCAAImageProcessor()
    model = PCAAForSemanticSegmentation(small_config()).eval()
    inputs = processor(PIL.Image.new("RGB", (5, 3)), return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 3, 5)
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape[-2:] == (1, 1)
    assert processor.post_process_semantic_segmentation(outputs, target_sizes=[(3, 5)])[0].shape == (3, 5)
