"""Training losses: pixel cross-entropy (optionally OHEM), auxiliary cross-entropy, PCAA's region focal loss."""

from functools import lru_cache

import torch
import torch.nn.functional as F


def loss_dtype(tensor):
    """float32 for half-precision and float32 inputs (autocast's), float64 for float64 ones."""
    return torch.promote_types(tensor.dtype, torch.float32)


def upsample_logits(logits, size):
    """
    (B, K, h, w) -> (B, K, H, W) in `loss_dtype`, bilinear with align_corners=False. One binary logit x becomes the
    two class logits (0, x), whose softmax is (1 - sigmoid(x), sigmoid(x)): the cross-entropy is then the binary one.
    """
    logits = F.interpolate(logits.to(loss_dtype(logits)), size=size, mode="bilinear", align_corners=False)
    return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


def masked_mean(values, mask):
    """Mean of `values` where `mask` is set; 0 (still attached to the graph) where nothing is."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def pixel_cross_entropy(logits, labels, ignore_index):
    """Cross-entropy of logits (B, K, h, w) upsampled to labels (B, H, W), mean over the non-ignored pixels."""
    losses = F.cross_entropy(upsample_logits(logits, labels.shape[-2:]), labels, ignore_index=ignore_index,
                             reduction="none")
    return masked_mean(losses, labels != ignore_index)


def ohem_cross_entropy(logits, labels, ignore_index, threshold, min_kept):
    """
    Online hard example mining: the mean cross-entropy over the non-ignored pixels whose true-class probability is
    below max(threshold, p_k), p_k the k-th smallest such probability (0-based k = min(min_kept * B, n - 1)).
    """
    logits = upsample_logits(logits, labels.shape[-2:])
    valid = labels != ignore_index
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    gather_index = labels.masked_fill(~valid, 0).unsqueeze(1)
    true_class_probability = logits.softmax(dim=1).gather(1, gather_index).squeeze(1)
    valid_probabilities = true_class_probability[valid]
    if valid_probabilities.numel() == 0:
        return masked_mean(losses, valid)
    kth = min(min_kept * labels.shape[0], valid_probabilities.numel() - 1)
    kth_probability = valid_probabilities.kthvalue(kth + 1).values
    keep = valid & (true_class_probability < torch.clamp(kth_probability, min=threshold))
    return masked_mean(losses, keep)


def adaptive_pool_bounds(length, bins, device=None):
    """(starts, ends), each (bins,): adaptive average pooling's window i covers [floor(i*L/b), ceil((i+1)*L/b))."""
    index = torch.arange(bins, device=device)
    return index * length // bins, ((index + 1) * length + bins - 1) // bins


@lru_cache(maxsize=256)
@torch.inference_mode(False)
def adaptive_pool_windows(length, bins, device):
    """
    The windows of adaptive average pooling along one axis: window i covers [floor(i*L/b), ceil((i+1)*L/b)).
    Returns every (position, window) membership as two 1-D tensors, and the window sizes (b,). Built once per size
    on the CPU, outside inference mode, and cached, so the loss never syncs with the device for them.
    """
    index = torch.arange(bins)
    starts, ends = adaptive_pool_bounds(length, bins)
    sizes = ends - starts
    windows = torch.repeat_interleave(index, sizes)
    offsets = torch.arange(windows.numel()) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    return (starts[windows] + offsets).to(device), windows.to(device), sizes.to(device)


def region_class_fractions(labels, num_labels, grid, ignore_index, dtype=torch.float32):
    """
    Fraction of each adaptive-pooling region covered by each class, (B, K, bh, bw) in `dtype`: exactly the average
    pooling of the one-hot label map (ignored pixels all-zero but counted in the area), computed by counting instead
    of materialising the (B, K, H, W) one-hot map.
    """
    batch, height, width = labels.shape
    rows, row_windows, row_sizes = adaptive_pool_windows(height, grid[0], labels.device)
    cols, col_windows, col_sizes = adaptive_pool_windows(width, grid[1], labels.device)

    # Per image row: class counts in each column window, (B, H, bw, K).
    window_labels = labels[:, :, cols]
    counted = window_labels != ignore_index
    cell = (torch.arange(batch * height, device=labels.device).view(batch, height, 1) * grid[1] + col_windows)
    bin_index = torch.where(counted, cell * num_labels + window_labels, batch * height * grid[1] * num_labels)
    row_counts = torch.bincount(bin_index.flatten(), minlength=batch * height * grid[1] * num_labels + 1)
    row_counts = row_counts[:-1].view(batch, height, grid[1], num_labels).to(dtype)

    # Sum the rows of each row window, (B, bh, bw, K).
    counts = row_counts.new_zeros(batch, grid[0], grid[1], num_labels)
    counts.index_add_(1, row_windows, row_counts[:, rows])
    # Divide as adaptive_avg_pool2d's kernel does (by the window height, then width), so the 0 < f < threshold test
    # sees the same values.
    fractions = counts / row_sizes.view(1, -1, 1, 1).to(dtype) / col_sizes.view(1, 1, -1, 1).to(dtype)
    return fractions.permute(0, 3, 1, 2)


def region_focal_loss(region_scores, labels, grid, ignore_index, label_threshold, gamma):
    """
    Binary focal loss of the region class scores (B, K, bh, bw), in (0, 1). Target 1 where a class covers part of the
    region, 0 where it covers none, ignored where it covers a fraction in (0, label_threshold). Per class, the mean
    over the non-ignored (image, region) entries; then the mean over the classes that have such entries (the
    authors' code returns NaN when a class has none).
    """
    scores = region_scores.to(loss_dtype(region_scores))
    fractions = region_class_fractions(labels, scores.shape[1], grid, ignore_index, scores.dtype)
    targets = (fractions > 0).to(scores.dtype)
    valid = ~((fractions > 0) & (fractions < label_threshold))
    # binary_cross_entropy refuses NaN scores (a device-side assert on CUDA, which kills the process): a diverged
    # model's NaN goes through the focal weight below instead, so the loss itself is NaN and the trainer can say so.
    cross_entropy = F.binary_cross_entropy(scores.nan_to_num(0.5), targets, reduction="none")
    true_class_score = torch.where(targets == 1, scores, 1 - scores)
    losses = torch.pow(1 - true_class_score, gamma) * cross_entropy * valid
    entries_per_class = valid.sum(dim=(0, 2, 3))
    per_class = losses.sum(dim=(0, 2, 3)) / entries_per_class.clamp(min=1)
    return masked_mean(per_class, entries_per_class > 0)


def pcaa_loss(config, logits, auxiliary_logits, region_class_scores, labels):
    """
    The training loss: segmentation + auxiliary_loss_weight * auxiliary + region_loss_weight * region, where region
    is the mean of the region focal losses of the PCAA modules (none with a baseline decode head, whose loss is the
    authors' `DSNLoss`). Computed outside autocast, in float32 (float64 for a float64 model).
    Returns a dict with "loss" and its terms "segmentation_loss", "auxiliary_loss" (None without auxiliary logits)
    and "region_loss" (None without region class scores).
    """
    ignore_index = config.loss_ignore_index
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if config.use_ohem:
            segmentation = ohem_cross_entropy(logits, labels, ignore_index, config.ohem_threshold,
                                              config.ohem_min_kept)
        else:
            segmentation = pixel_cross_entropy(logits, labels, ignore_index)
        total, region, auxiliary = segmentation, None, None
        if region_class_scores:
            region = sum(
                region_focal_loss(scores, labels, tuple(grid), ignore_index, config.region_label_threshold,
                                  config.focal_gamma) / len(region_class_scores)
                for scores, grid in zip(region_class_scores, config.bins)
            )
            total = total + config.region_loss_weight * region
        if auxiliary_logits is not None:
            auxiliary = pixel_cross_entropy(auxiliary_logits, labels, ignore_index)
            total = total + config.auxiliary_loss_weight * auxiliary
    return {"loss": total, "segmentation_loss": segmentation, "auxiliary_loss": auxiliary, "region_loss": region}
