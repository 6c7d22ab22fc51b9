import math

import pytest
import torch
import torch.nn.functional as F

from pcaa_hf import PCAAForSemanticSegmentation
from pcaa_hf.model.loss_pcaa import (
    ohem_cross_entropy,
    pcaa_loss,
    pixel_cross_entropy,
    region_class_fractions,
    region_focal_loss,
)
from pcaa_testing import small_config


def test_pixel_cross_entropy_hand_computed():
    # A 1x1 logit map upsamples to a constant map: p(class 1) = 3 / (1 + 3) everywhere.
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    assert pixel_cross_entropy(logits, torch.tensor([[[1, 255]]]), 255).item() == pytest.approx(math.log(4 / 3))
    expected = (math.log(4.0) + math.log(4 / 3)) / 2
    assert pixel_cross_entropy(logits, torch.tensor([[[0, 1]]]), 255).item() == pytest.approx(expected)


def test_pixel_cross_entropy_upsamples_bilinearly_like_torch():
    logits = torch.randn(2, 4, 5, 7)
    labels = torch.randint(0, 4, (2, 40, 56))
    labels[0, :10] = 255
    upsampled = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, labels, ignore_index=255)
    torch.testing.assert_close(pixel_cross_entropy(logits, labels, 255), expected)


@pytest.mark.parametrize("size, grid", [((16, 16), (4, 4)), ((7, 5), (4, 4)), ((3, 2), (4, 4)), ((30, 17), (2, 3))])
def test_region_fractions_equal_average_pooling_of_the_one_hot_map(size, grid):
    labels = torch.randint(0, 6, (2, *size))
    labels[labels == 5] = 255
    one_hot = torch.stack([(labels == k) for k in range(5)], dim=1).float()
    expected = F.adaptive_avg_pool2d(one_hot, grid)
    assert torch.equal(region_class_fractions(labels, 5, grid, 255), expected)


def test_region_focal_loss_hand_computed():
    # Two 1000-pixel regions (grid 1x2). Left: all class 0. Right: 995 pixels class 1, 5 pixels class 0 (0.5 % < 1 %,
    # so class 0 is ignored there).
    labels = torch.zeros(1, 1, 2000, dtype=torch.long)
    labels[0, 0, 1000:1995] = 1
    scores = torch.tensor([[0.8, 0.3], [0.1, 0.6]]).view(1, 2, 1, 2)  # (B, K, 1, 2)

    def focal(p, target):
        p_t = p if target == 1 else 1 - p
        return (1 - p_t) ** 2 * -math.log(p_t)

    class_0 = focal(0.8, 1)  # the right entry is ignored
    class_1 = (focal(0.1, 0) + focal(0.6, 1)) / 2
    loss = region_focal_loss(scores, labels, (1, 2), 255, 0.01, 2.0)
    assert loss.item() == pytest.approx((class_0 + class_1) / 2, rel=1e-6)


def test_region_focal_loss_never_nan_when_a_class_has_only_ignored_entries():
    # Class 1 covers 0.5 % of the only region: all of its entries are ignored (the authors' code returns NaN).
    labels = torch.zeros(1, 1, 1000, dtype=torch.long)
    labels[0, 0, :5] = 1
    scores = torch.tensor([0.7, 0.4]).view(1, 2, 1, 1).requires_grad_()
    loss = region_focal_loss(scores, labels, (1, 1), 255, 0.01, 2.0)
    assert loss.item() == pytest.approx(0.3**2 * -math.log(0.7), rel=1e-6)
    loss.backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 1].abs().sum() == 0


def reference_ohem(logits, labels, ignore_index, threshold, min_kept):
    """OHEM as the spec states it, with a full sort."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    probabilities = logits.softmax(dim=1)
    valid = labels != ignore_index
    true_class = probabilities.gather(1, labels.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)[valid]
    ordered = true_class.sort().values
    cutoff = max(ordered[min(min_kept * labels.shape[0], ordered.numel() - 1)].item(), threshold)
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")[valid]
    return losses[true_class < cutoff].mean()


@pytest.mark.parametrize("min_kept", [10, 300, 100000])
def test_ohem_matches_a_sorting_reference(min_kept):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=generator) * 3
    labels = torch.randint(0, 4, (2, 24, 24), generator=generator)
    labels[:, :4] = 255
    expected = reference_ohem(logits, labels, 255, 0.7, min_kept)
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, 255, 0.7, min_kept), expected)


@pytest.mark.parametrize("use_ohem", [False, True])
def test_all_ignored_labels_give_zero_cross_entropies_not_nan(use_ohem):
    model = PCAAForSemanticSegmentation(small_config(use_ohem=use_ohem)).train()
    labels = torch.full((2, 64, 64), 255)
    outputs = model(torch.randn(2, 3, 64, 64), labels=labels)
    assert outputs.segmentation_loss.item() == 0.0 and outputs.auxiliary_loss.item() == 0.0
    # Ignored pixels count as "no class" in the region areas, so every region target is a valid 0.
    assert torch.isfinite(outputs.region_loss) and outputs.region_loss.item() > 0
    torch.testing.assert_close(outputs.loss, outputs.region_loss)
    outputs.loss.backward()


def test_total_is_the_weighted_sum_of_the_terms_averaged_over_modules():
    config = small_config(bins=((2, 2), (4, 4)), auxiliary_loss_weight=0.25, region_loss_weight=2.0)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 8, 8, generator=generator)
    auxiliary = torch.randn(1, 5, 8, 8, generator=generator)
    scores = (torch.rand(1, 5, 2, 2, generator=generator), torch.rand(1, 5, 4, 4, generator=generator))
    labels = torch.randint(0, 5, (1, 64, 64), generator=generator)
    losses = pcaa_loss(config, logits, auxiliary, scores, labels)
    region = (region_focal_loss(scores[0], labels, (2, 2), 255, 0.01, 2.0)
              + region_focal_loss(scores[1], labels, (4, 4), 255, 0.01, 2.0)) / 2
    torch.testing.assert_close(losses["region_loss"], region)
    torch.testing.assert_close(losses["segmentation_loss"], pixel_cross_entropy(logits, labels, 255))
    torch.testing.assert_close(losses["auxiliary_loss"], pixel_cross_entropy(auxiliary, labels, 255))
    expected = losses["segmentation_loss"] + 0.25 * losses["auxiliary_loss"] + 2.0 * region
    torch.testing.assert_close(losses["loss"], expected)


def test_losses_are_float32_under_bfloat16_autocast():
    model = PCAAForSemanticSegmentation(small_config()).train()
    labels = torch.randint(0, 5, (2, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.randn(2, 3, 64, 64), labels=labels)
    assert outputs.logits.dtype == torch.bfloat16
    assert outputs.loss.dtype == torch.float32 and torch.isfinite(outputs.loss)
    outputs.loss.backward()


def test_one_label_is_binary_segmentation_with_binary_cross_entropy():
    logits = torch.randn(2, 1, 5, 7)
    labels = torch.randint(0, 2, (2, 40, 56))
    labels[0, :10] = 255
    upsampled = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)[:, 0]
    valid = labels != 255
    expected = F.binary_cross_entropy_with_logits(upsampled[valid], labels[valid].float())
    torch.testing.assert_close(pixel_cross_entropy(logits, labels, 255), expected)
    # OHEM keeps every pixel when its threshold is 1: the same mean.
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, 255, 1.0, 0), expected)

