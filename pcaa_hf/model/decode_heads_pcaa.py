"""
The heads every PCAA model shares (the classifier convolution and the auxiliary head) and the baseline context heads
of the paper's Table 3, which `PCAAConfig.decode_head_type` puts in the PCAA head's place: FCN, ASPP (DeepLabV3),
Non-local and OCR, each computing what the authors' `networks/{basenet,deeplabv3,nlnet,ocrnet}.py` compute.

Every decode head maps the last feature map (B, C_in, h, w) to logits (B, K, h, w) and returns them with its region
class scores (a tuple, empty except for PCAA's); OCR also reads the auxiliary head's logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .backbone_pcaa import PCAAConvNormAct


class PCAAClassifier(nn.Conv2d):
    """1x1 conv with bias producing class scores; initialised normal(0, initializer_range) with zero bias."""

    def __init__(self, in_channels, num_labels):
        super().__init__(in_channels, num_labels, kernel_size=1)


class PCAAAuxiliaryHead(nn.Module):
    """3x3 conv -> dropout -> classifier on the stage-3 feature: (B, C_in, h, w) -> (B, K, h, w)."""

    def __init__(self, config, in_channels):
        super().__init__()
        self.conv = PCAAConvNormAct(in_channels, config.auxiliary_hidden_size, 3)
        self.dropout = nn.Dropout2d(config.classifier_dropout)
        self.classifier = PCAAClassifier(config.auxiliary_hidden_size, config.num_labels)

    def forward(self, features):
        return self.classifier(self.dropout(self.conv(features)))


def attend(query, key, value):
    """
    softmax(query key^T / sqrt(d)) value over (B, N, d) queries and (B, M, d) keys and values: scaled dot-product
    attention, whose fused kernels (float32 and half precision) never hold the (N, M) map, 4 GiB for a Non-local
    block on a 1024x2048 frame. They need contiguous inputs (`positions` makes them so).
    """
    return F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)).squeeze(1)


def positions(features):
    """(B, C, h, w) -> (B, h*w, C), contiguous: fused attention kernels refuse a last dimension of stride h*w."""
    return features.flatten(2).transpose(1, 2).contiguous()


class PCAAFCNHead(nn.Module):
    """The FCN baseline (`basenet`): two 3x3 convs -> dropout -> classifier."""

    def __init__(self, config, in_channels):
        super().__init__()
        hidden_size = config.hidden_size
        self.convs = nn.Sequential(PCAAConvNormAct(in_channels, hidden_size, 3),
                                   PCAAConvNormAct(hidden_size, hidden_size, 3))
        self.dropout = nn.Dropout2d(config.classifier_dropout)
        self.classifier = PCAAClassifier(hidden_size, config.num_labels)

    def forward(self, features):
        return self.classifier(self.dropout(self.convs(features))), ()


class PCAAASPPHead(nn.Module):
    """
    DeepLabV3's atrous spatial pyramid pooling (`deeplabv3`): image pooling, a 1x1 conv and one 3x3 conv per dilation
    rate, each to hidden_size / 2 channels, concatenated -> 3x3 conv -> dropout -> classifier.
    """

    def __init__(self, config, in_channels):
        super().__init__()
        branch_size = config.hidden_size // 2
        self.image_pool = PCAAConvNormAct(in_channels, branch_size, 1)
        self.branches = nn.ModuleList(
            [PCAAConvNormAct(in_channels, branch_size, 1)]
            + [PCAAConvNormAct(in_channels, branch_size, 3, dilation=rate) for rate in config.aspp_dilations]
        )
        self.bottleneck = PCAAConvNormAct(branch_size * (2 + len(config.aspp_dilations)), config.hidden_size, 3)
        self.dropout = nn.Dropout2d(config.classifier_dropout)
        self.classifier = PCAAClassifier(config.hidden_size, config.num_labels)

    def forward(self, features):
        norm = self.image_pool.norm
        if norm.training and features.shape[0] == 1 and type(norm) is nn.BatchNorm2d:
            raise ValueError("Training the ASPP head normalises its image-pooling branch (one value per image and "
                             "channel) over the batch, which needs at least 2 images per process (or SyncBatchNorm "
                             "over several processes); got 1.")
        height, width = features.shape[2:]
        # Upsampling a 1x1 map bilinearly repeats its value: expand does it without the interpolation.
        pooled = self.image_pool(features.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, height, width)
        branches = [pooled] + [branch(features) for branch in self.branches]
        return self.classifier(self.dropout(self.bottleneck(torch.cat(branches, dim=1)))), ()


class PCAANonLocalBlock(nn.Module):
    """
    A Non-local block (embedded Gaussian, Wang et al. 2018) as the authors' `NonLocal2d(use_out=True)`: every position
    attends to every other through 1x1 query, key and value projections to half the width, scaled by
    1/sqrt(width / 2); the result is projected back (1x1 conv, BatchNorm, ReLU) and added to the input.
    """

    def __init__(self, hidden_size):
        super().__init__()
        inner_size = hidden_size // 2
        self.query = nn.Conv2d(hidden_size, inner_size, 1)
        self.key = nn.Conv2d(hidden_size, inner_size, 1)
        self.value = nn.Conv2d(hidden_size, inner_size, 1)
        self.output_projection = PCAAConvNormAct(inner_size, hidden_size, 1)

    def forward(self, features):
        batch, _, height, width = features.shape
        attended = attend(positions(self.query(features)), positions(self.key(features)),
                          positions(self.value(features)))  # (B, h*w, C/2)
        attended = attended.transpose(1, 2).reshape(batch, -1, height, width)
        return features + self.output_projection(attended)


class PCAANonLocalHead(nn.Module):
    """
    The Non-local baseline (`nlnet`): 3x3 conv -> Non-local block -> 3x3 conv -> concat with the backbone feature
    (the feature first) -> 3x3 conv -> dropout -> classifier.
    """

    def __init__(self, config, in_channels):
        super().__init__()
        hidden_size = config.hidden_size
        self.pre = PCAAConvNormAct(in_channels, hidden_size, 3)
        self.non_local = PCAANonLocalBlock(hidden_size)
        self.post = PCAAConvNormAct(hidden_size, hidden_size, 3)
        self.fuse = PCAAConvNormAct(in_channels + hidden_size, hidden_size, 3)
        self.dropout = nn.Dropout2d(config.classifier_dropout)
        self.classifier = PCAAClassifier(hidden_size, config.num_labels)

    def forward(self, features):
        context = self.post(self.non_local(self.pre(features)))
        return self.classifier(self.dropout(self.fuse(torch.cat([features, context], dim=1)))), ()


def conv_norm_act_stack(in_channels, out_channels, layers):
    """`layers` 1x1 (conv, BatchNorm, ReLU), the first from `in_channels`."""
    return nn.Sequential(*(PCAAConvNormAct(in_channels if i == 0 else out_channels, out_channels, 1)
                           for i in range(layers)))


class PCAAObjectContextBlock(nn.Module):
    """
    OCR's object attention (Yuan et al. 2020): each position (query: two 1x1 conv-BN-ReLU to half the width) attends
    over the K object region representations (keys: the same; values: one), scaled by 1/sqrt(width / 2); the context
    is projected back to the full width (1x1 conv-BN-ReLU).
    """

    def __init__(self, hidden_size):
        super().__init__()
        inner_size = hidden_size // 2
        self.pixel_query = conv_norm_act_stack(hidden_size, inner_size, 2)
        self.object_key = conv_norm_act_stack(hidden_size, inner_size, 2)
        self.object_value = conv_norm_act_stack(hidden_size, inner_size, 1)
        self.output_projection = PCAAConvNormAct(inner_size, hidden_size, 1)

    def forward(self, features, objects):
        """features (B, C, h, w), objects (B, C, K, 1) -> context (B, C, h, w)."""
        batch, _, height, width = features.shape
        context = attend(positions(self.pixel_query(features)), positions(self.object_key(objects)),
                         positions(self.object_value(objects)))  # (B, h*w, C/2)
        return self.output_projection(context.transpose(1, 2).reshape(batch, -1, height, width))


class PCAAOCRHead(nn.Module):
    """
    The OCR baseline (`ocrnet`): 3x3 conv; soft object regions are the auxiliary logits' softmax over positions, each
    region's representation the weighted sum of the features; object attention gives each position its context,
    concatenated with the feature (the context first) -> 1x1 conv -> dropout -> classifier.
    """

    reads_auxiliary_logits = True

    def __init__(self, config, in_channels):
        super().__init__()
        hidden_size = config.hidden_size
        self.pre = PCAAConvNormAct(in_channels, hidden_size, 3)
        self.object_context = PCAAObjectContextBlock(hidden_size)
        self.fuse = PCAAConvNormAct(2 * hidden_size, hidden_size, 1)
        self.dropout = nn.Dropout2d(config.classifier_dropout)
        self.classifier = PCAAClassifier(hidden_size, config.num_labels)

    def forward(self, features, auxiliary_logits):
        features = self.pre(features)
        if auxiliary_logits.shape[2:] != features.shape[2:]:
            # A transformers backbone's stage before the last can have another resolution than the last.
            auxiliary_logits = F.interpolate(auxiliary_logits, size=features.shape[2:], mode="bilinear",
                                             align_corners=False)
        regions = auxiliary_logits.flatten(2).softmax(dim=2)  # (B, K, h*w)
        objects = torch.matmul(regions, positions(features)).transpose(1, 2).unsqueeze(3)  # (B, C, K, 1)
        context = self.object_context(features, objects)
        return self.classifier(self.dropout(self.fuse(torch.cat([context, features], dim=1)))), ()


BASELINE_HEADS = {"fcn": PCAAFCNHead, "aspp": PCAAASPPHead, "non_local": PCAANonLocalHead, "ocr": PCAAOCRHead}


__all__ = [
    "BASELINE_HEADS",
    "PCAAASPPHead",
    "PCAAAuxiliaryHead",
    "PCAAClassifier",
    "PCAAFCNHead",
    "PCAANonLocalBlock",
    "PCAANonLocalHead",
    "PCAAOCRHead",
    "PCAAObjectContextBlock",
]
