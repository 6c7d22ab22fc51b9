"""
Tests of `pcaa_hf.inference.segmentation_inference`: the paper's whole-image, sliding-window and multi-scale + flip
inference.

Window placement is checked against an independent re-implementation of the authors' `predict_sliding`
(lsa1997/PCAA utils/pyt_utils.py) / mmsegmentation's `slide_inference`; the logits against references written
here with a small randomised PCAA (one window at a time, explicit flips and rescaling); memory on a Cityscapes-sized
image with 150 classes in a subprocess.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_hf.inference.segmentation_inference import SegmentationInference, scaled_size, sliding_windows
from pcaa_testing import randomise_weights, small_config


@pytest.fixture(scope="module")
def model():
    return randomise_weights(PCAAForSemanticSegmentation(small_config())).eval()


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_windows(height, width, crop_size, stride):
    """The authors' / mmsegmentation's placement, written independently: grid counts by integer arithmetic."""
    (crop_height, crop_width), (stride_height, stride_width) = crop_size, stride
    rows = max(height - crop_height + stride_height - 1, 0) // stride_height + 1
    columns = max(width - crop_width + stride_width - 1, 0) // stride_width + 1
    windows = []
    for row in range(rows):
        for column in range(columns):
            y1, x1 = row * stride_height, column * stride_width
            y2, x2 = min(y1 + crop_height, height), min(x1 + crop_width, width)
            y1, x1 = max(y2 - crop_height, 0), max(x2 - crop_width, 0)
            windows.append((y1, x1, y2, x2))
    return windows


def reference_slide(model, pixel_values, crop_size, stride):
    """One window at a time: logits upsampled to the window, summed, divided by the per-pixel window count."""
    batch_size, _, height, width = pixel_values.shape
    total = count = None
    with torch.no_grad():
        for top, left, bottom, right in reference_windows(height, width, crop_size, stride):
            logits = model(pixel_values=pixel_values[:, :, top:bottom, left:right]).logits
            logits = F.interpolate(logits, size=(bottom - top, right - left), mode="bilinear", align_corners=False)
            if total is None:
                total = torch.zeros(batch_size, logits.shape[1], height, width)
                count = torch.zeros(height, width)
            total[:, :, top:bottom, left:right] += logits
            count[top:bottom, left:right] += 1
    return total / count


@pytest.mark.parametrize("height", [1, 50, 63, 64, 65, 100, 129, 500, 1024])
@pytest.mark.parametrize("width", [1, 64, 97, 2048])
@pytest.mark.parametrize("crop_size, stride", [((64, 64), (43, 43)), ((64, 96), (32, 64)), ((64, 64), (64, 64)),
                                               ((768, 768), (512, 512)), ((100, 50), (30, 7))])
def test_sliding_windows_match_the_authors_placement_and_cover_the_image(height, width, crop_size, stride):
    windows = sliding_windows(height, width, crop_size, stride)
    assert windows == reference_windows(height, width, crop_size, stride)
    window_size = (min(crop_size[0], height), min(crop_size[1], width))
    covered = torch.zeros(height, width, dtype=torch.int64)
    for top, left, bottom, right in windows:
        assert 0 <= top < bottom <= height and 0 <= left < right <= width
        assert (bottom - top, right - left) == window_size
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1


def test_sliding_windows_for_cityscapes():
    windows = sliding_windows(1024, 2048, (768, 768), (512, 512))
    assert len(windows) == 8
    assert sorted({top for top, _, _, _ in windows}) == [0, 256]
    assert sorted({left for _, left, _, _ in windows}) == [0, 512, 1024, 1280]
    assert windows[:4] == [(0, 0, 768, 768), (0, 512, 768, 1280), (0, 1024, 768, 1792), (0, 1280, 768, 2048)]
    assert all((bottom - top, right - left) == (768, 768) for top, left, bottom, right in windows)
    # A side shorter than the crop gets one window of its own length.
    assert sliding_windows(500, 700, (768, 768), (512, 512)) == [(0, 0, 500, 700)]


def test_default_stride_is_two_thirds_of_the_crop():
    assert SegmentationInference(mode="slide", crop_size=(768, 768)).stride == (512, 512)
    assert SegmentationInference(mode="slide", crop_size=512).stride == (342, 342)
    assert SegmentationInference(mode="slide", crop_size=(64, 769)).stride == (43, 513)
    assert SegmentationInference(mode="slide", crop_size=64, stride=(10, 20)).stride == (10, 20)


@pytest.mark.parametrize("shape, window_batch_size", [
    ((1, 3, 64, 64), 4), ((1, 3, 61, 93), 1), ((2, 3, 61, 93), 1), ((2, 3, 61, 93), 4)])
def test_one_window_equals_whole_image_inference(model, shape, window_batch_size):
    pixel_values = images(*shape)
    whole = SegmentationInference(mode="whole").logits(model, pixel_values)
    assert whole.shape == (shape[0], 5, *shape[2:])
    for crop_size in [shape[2:], (96, 128)]:  # the image's size, and larger than the image
        slide = SegmentationInference(mode="slide", crop_size=crop_size, window_batch_size=window_batch_size)
        logits = slide.logits(model, pixel_values)
        if window_batch_size >= shape[0]:  # the same forward on the same batch: bit for bit
            assert torch.equal(logits, whole)
        else:  # one image per forward: batched convolutions may round differently
            torch.testing.assert_close(logits, whole, rtol=0, atol=1e-5)


SLIDE_IMAGES = images(2, 3, 72, 104, seed=1)
SLIDE_CROP, SLIDE_STRIDE = (48, 48), (32, 40)


@pytest.fixture(scope="module")
def slide_reference(model):
    assert sliding_windows(72, 104, SLIDE_CROP, SLIDE_STRIDE) == reference_windows(72, 104, SLIDE_CROP, SLIDE_STRIDE)
    assert len(reference_windows(72, 104, SLIDE_CROP, SLIDE_STRIDE)) == 6  # rows at 0, 24; columns at 0, 40, 56
    expected = reference_slide(model, SLIDE_IMAGES, SLIDE_CROP, SLIDE_STRIDE)
    # Overlapping windows do not reduce to whole-image inference: the comparisons below are not trivial.
    whole = SegmentationInference(mode="whole").logits(model, SLIDE_IMAGES)
    assert (whole - expected).abs().max() > 1e-3
    return expected


@pytest.mark.parametrize("window_batch_size", [1, 3, 100])
def test_sliding_inference_equals_one_window_at_a_time(model, slide_reference, window_batch_size):
    # Batches of 3 windows mix the two images' windows; 100 takes all 12 at once.
    inference = SegmentationInference(mode="slide", crop_size=SLIDE_CROP, stride=SLIDE_STRIDE,
                                      window_batch_size=window_batch_size)
    torch.testing.assert_close(inference.logits(model, SLIDE_IMAGES), slide_reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_averages_the_logits_of_the_flipped_image_flipped_back(model, mode):
    options = dict(mode=mode, crop_size=(32, 32), stride=(24, 24))  # "slide": columns at 0, 24, 32 (asymmetric)
    plain, flipped = SegmentationInference(**options), SegmentationInference(**options, flip=True)
    pixel_values = images(2, 3, 40, 64, seed=2)
    expected = 0.5 * (plain.logits(model, pixel_values) + plain.logits(model, pixel_values.flip(-1)).flip(-1))
    torch.testing.assert_close(flipped.logits(model, pixel_values), expected, rtol=0, atol=1e-5)

    symmetric = torch.cat([pixel_values[..., :32], pixel_values[..., :32].flip(-1)], dim=-1)
    assert torch.equal(symmetric, symmetric.flip(-1))
    without_flip = plain.logits(model, symmetric)
    # The network is not flip-equivariant, so without flip TTA the logits of a symmetric image are not symmetric...
    assert (without_flip - without_flip.flip(-1)).abs().max() > 1e-3
    with_flip = flipped.logits(model, symmetric)
    # ... and with it they are.
    torch.testing.assert_close(with_flip, with_flip.flip(-1), rtol=0, atol=1e-5)


def test_scaled_size_rounds_half_up():
    assert scaled_size((1024, 2048), 0.75) == (768, 1536)
    assert scaled_size((1024, 2048), 1.75) == (1792, 3584)
    assert scaled_size((5, 7), 0.5) == (3, 4)
    assert scaled_size((61, 93), 0.5) == (31, 47)
    assert scaled_size((512, 683), 1.25) == (640, 854)
    assert scaled_size((3, 1), 0.1) == (1, 1)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_multi_scale_averages_single_scales_at_the_output_size(model, mode):
    options = dict(mode=mode, crop_size=(48, 48), stride=(32, 32))
    pixel_values = images(1, 3, 61, 93, seed=3)
    single = {scale: SegmentationInference(**options, scales=(scale,)).logits(model, pixel_values)
              for scale in (0.5, 1.0)}
    multi = SegmentationInference(**options, scales=(0.5, 1.0)).logits(model, pixel_values)
    torch.testing.assert_close(multi, (single[0.5] + single[1.0]) / 2, rtol=0, atol=1e-5)

    # Scale 0.5 by hand: resize to 31x47 (half up), infer at that size, resize the logits to 61x93 straight from the
    # model's 1/8 output, as the authors' predict_whole and mmsegmentation do. 31 rows are fewer than the 48-pixel
    # crop, so "slide" mode makes one whole-image forward too, as the authors' predict_sliding does.
    half = F.interpolate(pixel_values, size=(31, 47), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = model(pixel_values=half).logits
    expected = F.interpolate(expected, size=(61, 93), mode="bilinear", align_corners=False)
    torch.testing.assert_close(single[0.5], expected, rtol=0, atol=1e-5)
    # At scale 1, 61x93 is at least the crop on both sides: windows, as an independent reference computes them.
    if mode == "slide":
        torch.testing.assert_close(single[1.0], reference_slide(model, pixel_values, (48, 48), (32, 32)),
                                   rtol=0, atol=1e-5)
    assert (single[0.5] - single[1.0]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_output_size_and_predict(model, mode):
    inference = SegmentationInference(mode=mode, crop_size=(32, 32), scales=(0.75, 1.0), flip=True)
    pixel_values = images(2, 3, 41, 57, seed=4)
    native = inference.logits(model, pixel_values)
    assert native.shape == (2, 5, 41, 57) and native.dtype == torch.float32
    logits = inference.logits(model, pixel_values, output_size=(24, 90))
    assert logits.shape == (2, 5, 24, 90) and logits.dtype == torch.float32
    prediction = inference.predict(model, pixel_values, output_size=(24, 90))
    assert prediction.shape == (2, 24, 90) and prediction.dtype == torch.int64
    assert torch.equal(prediction, logits.argmax(dim=1))


@pytest.mark.parametrize("options", [
    dict(mode="sliding"),
    dict(mode="slide", crop_size=0),
    dict(mode="slide", crop_size=(768, -1)),
    dict(mode="slide", crop_size=(768, 768, 768)),
    dict(mode="slide", stride=0),
    dict(mode="slide", stride=(512, 0)),
    dict(scales=()),
    dict(scales=(1.0, 0.0)),
    dict(scales=(-0.5,)),
    dict(window_batch_size=0),
    dict(window_batch_size=2.5),
    dict(mode="slide", crop_size=True),
    dict(mode="slide", crop_size=(16, 16), stride=(17, 8)),
    dict(scales=(float("nan"),)),
    dict(scales=(float("inf"),)),
    dict(scales=("large",)),
])
def test_invalid_options_are_refused(options):
    with pytest.raises(ValueError):
        SegmentationInference(**options)


def test_integer_like_sizes_are_accepted():
    inference = SegmentationInference(mode="slide", crop_size=np.int64(64), stride=(np.int32(32), 40))
    assert inference.crop_size == (64, 64) and inference.stride == (32, 40)
    assert all(type(v) is int for v in inference.crop_size + inference.stride)


def test_image_shorter_than_the_crop_gets_one_whole_image_forward(model):
    """The authors' predict_sliding falls back to predict_whole when a side is shorter than the crop."""
    pixel_values = images(1, 3, 40, 150, seed=5)
    slide = SegmentationInference(mode="slide", crop_size=(48, 48)).logits(model, pixel_values)
    whole = SegmentationInference().logits(model, pixel_values)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)
    assert (whole - reference_slide(model, pixel_values, (40, 48), (32, 32))).abs().max() > 1e-3


def test_pixel_values_must_be_a_non_empty_four_dimensional_batch(model):
    inference = SegmentationInference()
    with pytest.raises(ValueError, match="pixel_values"):
        inference.logits(model, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="non-empty"):
        SegmentationInference(mode="slide", crop_size=16).logits(model, torch.zeros(0, 3, 64, 64))
    with pytest.raises(ValueError, match="pixel_values"):
        inference.predict(model, torch.zeros(1, 1, 3, 32, 32))


MEMORY_SCRIPT = textwrap.dedent("""
    import time, types
    import torch
    import torch.nn.functional as F

    from pcaa_hf.inference.segmentation_inference import SegmentationInference


    def peak_rss():
        # VmHWM, this process's peak RSS, not ru_maxrss: a child started by subprocess (vfork + exec) inherits
        # its parent's ru_maxrss, here pytest's peak, which can hide most of the growth.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024


    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Conv2d(3, 150, 1)

        def forward(self, pixel_values):
            return types.SimpleNamespace(logits=self.classifier(F.avg_pool2d(pixel_values, 8)))


    torch.manual_seed(0)
    model = Stub().eval()
    pixel_values = torch.randn(1, 3, 1024, 2048)
    inference = SegmentationInference(mode="slide", crop_size=(768, 768), window_batch_size=4)
    try:  # Reset the peak to the current RSS (Linux >= 4.0); without it, the peak of the imports stays the base.
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
    before = peak_rss()
    start = time.perf_counter()
    prediction = inference.predict(model, pixel_values)
    seconds = time.perf_counter() - start
    after = peak_rss()
    assert prediction.shape == (1, 1024, 2048) and prediction.dtype == torch.int64
    print(after - before, seconds)
""")


@pytest.mark.slow  # a subprocess infers on a 1024x2048 image with 150 classes (over 1 GB more memory)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_sliding_memory_is_bounded_on_a_cityscapes_image_with_150_classes():
    script = [sys.executable, "-c", MEMORY_SCRIPT]
    result = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth, seconds = map(float, result.stdout.split())
    sum_buffer = 150 * 1024 * 2048 * 4  # 1.26 GB: one float32 (150, 1024, 2048) sum
    window = 150 * 768 * 768 * 4  # 354 MB: one window's upsampled logits
    message = f"peak RSS grew by {growth / 1e9:.2f} GB in {seconds:.1f} s"
    # Eight upsampled windows kept at once (2.8 GB) or a 150-channel count (another 1.26 GB) would exceed this.
    assert growth < 2.2e9, message
    # The measurement sees the sum buffer that any float32 sliding pass must hold.
    assert growth > 0.8 * sum_buffer, message
    print(message, f"(sum {sum_buffer / 1e9:.2f} GB + window {window / 1e9:.2f} GB)")
