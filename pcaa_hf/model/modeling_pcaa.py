"""PyTorch PCAA: Partial Class Activation Attention for Semantic Segmentation (Liu et al., CVPR 2022)."""

import logging
import math
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import load_backbone
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import logging as transformers_logging

from .backbone_pcaa import (
    PCAAConvNormAct,
    PCAAResNetBackbone,
    backbone_on_cpu_fast_path,
    checkpoint_preserving_statistics,
    is_batch_norm,
    is_exporting,
    is_traced,
    uses_cpu_fast_paths,
)
from .configuration_pcaa import PCAAConfig, num_label_values
from .decode_heads_pcaa import BASELINE_HEADS, PCAAAuxiliaryHead, PCAAClassifier
from .loss_pcaa import adaptive_pool_bounds, pcaa_loss

logger = transformers_logging.get_logger(__name__)


class HidePipelineModelCheckError(logging.Filter):
    """
    The image-segmentation pipeline checks the model's class name against transformers' built-in models only and logs
    an error for PCAA, although it runs it like any semantic segmentation model; drop that one misleading record.
    Here, not in pcaa_hf/__init__.py: a folder loaded as remote code runs only these files.
    """

    message = "The model 'PCAAForSemanticSegmentation' is not supported for image-segmentation"

    def filter(self, record):
        return not record.getMessage().startswith(self.message)


_pipeline_logger = logging.getLogger("transformers.pipelines.base")
if not any(type(f).__name__ == HidePipelineModelCheckError.__name__ for f in _pipeline_logger.filters):
    _pipeline_logger.addFilter(HidePipelineModelCheckError())


@dataclass
class PCAASemanticSegmenterOutput(SemanticSegmenterOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
        segmentation_loss + auxiliary_loss_weight * auxiliary_loss + region_loss_weight * region_loss.
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / output_stride, width / output_stride)`):
        Class scores of the decode head, at feature resolution (upsample them to the image size before argmax).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The backbone's stem output and the outputs of its four stages; with a transformers backbone, its own
        `hidden_states` (its embeddings' output and each stage's).
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        The attention maps of a transformers backbone that has them; None with the paper's backbone.
    segmentation_loss, auxiliary_loss, region_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The terms of `loss`, for logging.
    auxiliary_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / s, width / s)`, *optional*):
        Class scores of the auxiliary head, computed in training mode, when `labels` is provided, or always with the
        OCR head (its object regions).
    region_class_scores (`tuple(torch.FloatTensor)`, *optional*):
        One `(batch_size, num_labels, bins_rows, bins_columns)` tensor of sigmoid region class scores per PCAA module
        (2 classes, labels 0 and 1, for a binary model with `num_labels=1`); None with a baseline decode head.
    """

    segmentation_loss: torch.FloatTensor | None = None
    auxiliary_loss: torch.FloatTensor | None = None
    region_loss: torch.FloatTensor | None = None
    auxiliary_logits: torch.FloatTensor | None = None
    region_class_scores: tuple[torch.FloatTensor, ...] | None = None


@dataclass(frozen=True)
class RegionPartition:
    """
    Partition of one axis of length L into `bins` contiguous regions of at most `size` positions (ceil(L / bins); at
    least 2 for a symbolic L): region i holds [floor(i*L/bins), floor((i+1)*L/bins)). When `bins` divides L this is the
    authors' equal split and no index is needed (`even`); otherwise regions are padded to `size` positions by `gather`
    (repeating a position), `valid` (bins, size) marks the real ones and `scatter` (L,) finds each position's slot
    again.
    """

    bins: int
    size: int
    even: bool
    valid: torch.Tensor
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None


def build_region_partition(length, bins, device=None, even=None, min_size=1):
    """
    The `RegionPartition` of an axis, from tensor arithmetic only (no data-dependent indexing), so that it also traces
    with a symbolic `length`. `even=False` builds the padded layout even where `bins` divides `length` (the same
    regions, with an identity `gather` and `scatter`); `min_size` pads regions to at least that many positions.
    """
    size = (length + bins - 1) // bins
    if even is None:
        even = length % bins == 0
    if even:
        return RegionPartition(bins, size, True, torch.ones(bins, size, dtype=torch.bool, device=device))
    size = torch.sym_max(size, min_size)
    index = torch.arange(bins, device=device)
    starts = index * length // bins
    positions = starts[:, None] + torch.arange(size, device=device)
    valid = positions < ((index + 1) * length // bins)[:, None]
    gather = positions.clamp(max=length - 1).flatten()
    # Position p lies in region r = ((p + 1) * bins - 1) // length (the last r with starts[r] <= p), at its slot
    # r * size + p - starts[r] of the padded layout.
    position = torch.arange(length, device=device)
    region = ((position + 1) * bins - 1) // length
    scatter = region * size + position - starts[region]
    return RegionPartition(bins, size, False, valid, gather, scatter)


@lru_cache(maxsize=256)
@torch.inference_mode(False)
def cached_region_partition(length, bins, device):
    """
    The cached `RegionPartition` of an axis: built once per size and device (outside inference mode, so a partition
    first built during inference still serves training).
    """
    return build_region_partition(length, bins, device)


def region_partition(length, bins, device):
    """
    The `RegionPartition` of an axis of `length` positions. Eager: cached per size. Traced (torch.export, torch.compile,
    torch.jit.trace): built in the graph, never cached, because the length may be a SymInt, which `lru_cache` cannot
    hash ("unhashable type: non-nested SymInt"), and the tensors are fake ones that a cache would hand to later eager
    calls. Exported or symbolic, always the padded layout, so that one graph serves every size: branching on
    `length % bins` would restrict the graph to sizes of the traced one's divisibility.
    """
    if isinstance(length, int) and not is_traced():
        return cached_region_partition(length, bins, device)
    if is_exporting() or isinstance(length, torch.SymInt):
        # Regions of 2 positions at least (padding is masked out, the same results): torch.export specialises every
        # dimension on whether it is 1, which would split region sizes 1 (maps at most `bins` long) from larger ones.
        return build_region_partition(length, bins, device, even=False, min_size=2)
    return build_region_partition(length, bins, device)


def split_regions(features, rows, cols):
    """(B, C, H, W) -> (B, N, P, C): N = bh*bw regions row-major, P = rh*rw positions row-major inside a region."""
    if not rows.even:
        features = features.index_select(2, rows.gather)
    if not cols.even:
        features = features.index_select(3, cols.gather)
    batch, channels = features.shape[:2]
    features = features.view(batch, channels, rows.bins, rows.size, cols.bins, cols.size)
    return features.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows.bins * cols.bins, rows.size * cols.size, channels)


def merge_regions(regions, rows, cols):
    """(B, N, P, C) -> (B, C, H, W), the inverse of `split_regions`."""
    batch, channels = regions.shape[0], regions.shape[-1]
    features = regions.view(batch, rows.bins, cols.bins, rows.size, cols.size, channels)
    features = features.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, rows.bins * rows.size, cols.bins * cols.size)
    if not rows.even:
        features = features.index_select(2, rows.scatter)
    if not cols.even:
        features = features.index_select(3, cols.scatter)
    return features


def region_mask(rows, cols):
    """(N, P) bool mask of the real positions of each region."""
    mask = rows.valid[:, None, :, None] & cols.valid[None, :, None, :]  # (bh, bw, rh, rw)
    return mask.reshape(rows.bins * cols.bins, rows.size * cols.size)


def averaging_matrix(length, bins, device, dtype):
    """(bins, length): row i averages the positions of adaptive average pooling's window i."""
    starts, ends = adaptive_pool_bounds(length, bins, device)
    position = torch.arange(length, device=device)
    window = (position >= starts[:, None]) & (position < ends[:, None])
    return window.to(dtype) / (ends - starts).to(dtype)[:, None]


def adaptive_average_pool(features, grid):
    """
    `F.adaptive_avg_pool2d(features, grid)`. Exported, two products with averaging matrices built from the map's
    (symbolic) size instead: torch's decomposition of adaptive_avg_pool2d, which torch.onnx applies, branches on the
    traced size's divisibility by the grid, so the ONNX graph pooled other sizes' maps with wrong windows (or indexed
    out of range).
    """
    if not is_exporting():
        return F.adaptive_avg_pool2d(features, grid)
    dtype = torch.promote_types(features.dtype, torch.float32)
    rows = averaging_matrix(features.shape[2], grid[0], features.device, dtype)
    cols = averaging_matrix(features.shape[3], grid[1], features.device, dtype)
    return torch.matmul(torch.matmul(rows, features.to(dtype)), cols.transpose(0, 1)).to(features.dtype)


class PCAARegionConv(nn.Conv2d):
    """1x1 conv over (B, N, K, C) with the N regions as channels; initialised like a linear layer."""

    def __init__(self, in_regions, out_regions, bias):
        super().__init__(in_regions, out_regions, kernel_size=1, bias=bias)


class PCAARegionGraph(nn.Module):
    """Reasoning over the N regions of local class centres (B, N, K, C): relu(W_N x + x), then a linear map on C."""

    def __init__(self, num_regions, hidden_size):
        super().__init__()
        self.node_conv = PCAARegionConv(num_regions, num_regions, bias=False)
        self.channel_linear = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, local_centres):
        return self.channel_linear(F.relu(self.node_conv(local_centres) + local_centres))


class PCAAModule(nn.Module):
    """
    One Partial Class Activation Attention module over a (bh, bw) region grid.

    Input (B, C, H, W). Output: the attended features (B, C, H, W) and the region class scores (B, K, bh, bw).
    Any H, W work: when bh or bw does not divide them, regions differ in size by at most one row/column (see
    `RegionPartition`); the region scores are always the adaptive average pooling of the class activation map.
    """

    def __init__(self, config, grid):
        super().__init__()
        hidden_size = config.hidden_size
        inner_size = hidden_size // 2
        num_regions = grid[0] * grid[1]
        self.grid = tuple(grid)
        self.cam_dropout = nn.Dropout2d(config.cam_dropout)
        # A binary model's one logit is label 1's; its class activation keeps both labels, so that the attention
        # over classes has two to weigh (over one class, its softmax would be 1 everywhere).
        self.cam_classifier = PCAAClassifier(hidden_size, num_label_values(config.num_labels))
        self.region_graph = PCAARegionGraph(num_regions, hidden_size)
        self.global_fuse = PCAARegionConv(num_regions, 1, bias=True)
        self.query = nn.Linear(hidden_size, inner_size)
        self.key = nn.Linear(hidden_size, inner_size)
        self.value = nn.Linear(hidden_size, inner_size)
        self.output_projection = PCAAConvNormAct(inner_size, hidden_size, 1)

    def forward(self, features):
        class_activation = self.cam_classifier(self.cam_dropout(features))  # (B, K, H, W)
        region_class_scores = torch.sigmoid(adaptive_average_pool(class_activation, self.grid))  # (B, K, bh, bw)

        rows = region_partition(features.shape[2], self.grid[0], features.device)
        cols = region_partition(features.shape[3], self.grid[1], features.device)
        valid = None if rows.even and cols.even else region_mask(rows, cols)
        pixel_activation = split_regions(class_activation, rows, cols)  # (B, N, P, K)
        pixels = split_regions(features, rows, cols)  # (B, N, P, C)

        if valid is not None:
            pixel_activation = pixel_activation.masked_fill(~valid[..., None], float("-inf"))
        pixel_confidence = pixel_activation.softmax(dim=2)
        if valid is not None:
            # A region can be empty when the map is smaller than the grid: its softmax is NaN, its weights are 0.
            pixel_confidence = pixel_confidence.masked_fill(~valid[..., None], 0.0)

        region_confidence = region_class_scores.flatten(2).transpose(1, 2).unsqueeze(3)  # (B, N, K, 1)
        local_centres = torch.matmul(pixel_confidence.transpose(2, 3), pixels) * region_confidence  # (B, N, K, C)
        local_centres = self.region_graph(local_centres)
        global_centres = F.relu(self.global_fuse(local_centres))  # (B, 1, K, C), shared by all regions

        query = self.query(pixels)  # (B, N, P, C/2)
        key = self.key(local_centres)  # (B, N, K, C/2)
        value = self.value(global_centres)  # (B, 1, K, C/2)
        # Unscaled dot products: the authors define a 1/sqrt(C/2) scale but never apply it.
        attention = torch.matmul(query, key.transpose(2, 3)).softmax(dim=-1)  # (B, N, P, K)
        attended = merge_regions(torch.matmul(attention, value), rows, cols)  # (B, C/2, H, W)
        return features + self.output_projection(attended), region_class_scores


class PCAADecodeHead(nn.Module):
    """
    3x3 conv -> PCAA module(s) -> 3x3 conv -> concat with the backbone feature (the context first) -> 3x3 conv ->
    dropout -> classifier. Input (B, C_in, h, w); output logits (B, K, h, w) and a tuple of region class scores, one
    per PCAA module.
    """

    def __init__(self, config, in_channels):
        super().__init__()
        hidden_size = config.hidden_size
        self.pre = PCAAConvNormAct(in_channels, hidden_size, 3)
        self.pcaa_modules = nn.ModuleList(PCAAModule(config, grid) for grid in config.bins)
        self.post = PCAAConvNormAct(hidden_size, hidden_size, 3)
        self.fuse = PCAAConvNormAct(hidden_size + in_channels, hidden_size, 3)
        self.dropout = nn.Dropout2d(config.classifier_dropout)
        self.classifier = PCAAClassifier(hidden_size, config.num_labels)

    def forward(self, features):
        hidden_state = self.pre(features)
        region_class_scores = ()
        for module in self.pcaa_modules:
            hidden_state, scores = module(hidden_state)
            region_class_scores += (scores,)
        hidden_state = self.fuse(torch.cat([self.post(hidden_state), features], dim=1))
        return self.classifier(self.dropout(hidden_state)), region_class_scores


# `PCAAConfig.decode_head_type` -> its head: PCAA's, or a baseline of the paper's Table 3.
DECODE_HEADS = {"pcaa": PCAADecodeHead, **BASELINE_HEADS}


class PCAAPreTrainedModel(PreTrainedModel):
    config: PCAAConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = False
    _no_split_modules = ["PCAABottleneck", "PCAABasicBlock", "PCAAModule"]
    # The heads' own attention (PCAA's over region classes, the Non-local and OCR baselines' through torch's
    # scaled_dot_product_attention) does not go through transformers' attention functions: any implementation asked
    # for is the backbone's to accept or refuse (a transformers backbone checks its own support when it is built).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, PCAAClassifier):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, (PCAARegionConv, nn.Linear)):
            # torch's default for Linear (uniform, bound 1/sqrt(fan_in)), as transformers' ResNet keeps it.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif is_batch_norm(module):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        # A plain checkpoint recomputes each layer in the backward pass and so updates its BatchNorm running
        # statistics twice; recompute with throwaway statistics instead.
        if enable and not any(isinstance(module, GradientCheckpointingLayer) for module in self.modules()):
            raise ValueError(f"Gradient checkpointing recomputes backbone layers, and {type(self.backbone).__name__} "
                             "has none that transformers can checkpoint; train without it or use another backbone.")
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module._gradient_checkpointing_func = partial(
                    checkpoint_preserving_statistics, gradient_checkpointing_func, module
                )


class PCAAForSemanticSegmentation(PCAAPreTrainedModel):
    """
    PCAA: a dilated ResNet "v1c" backbone, the PCAA decode head (or the baseline that `config.decode_head_type`
    names) on its last stage and an auxiliary head on the stage before. Logits are at 1/output_stride of the input;
    the loss upsamples them to the label size.

    Example:

    ```python
    >>> import torch
    >>> from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation
    >>> model = PCAAForSemanticSegmentation(PCAAConfig(backbone_depth=18, num_labels=19)).eval()
    >>> outputs = model(torch.randn(1, 3, 128, 128))
    >>> outputs.logits.shape, outputs.region_class_scores[0].shape
    (torch.Size([1, 19, 16, 16]), torch.Size([1, 19, 4, 4]))
    ```
    """

    def __init__(self, config: PCAAConfig):
        super().__init__(config)
        # Any transformers backbone when configured (it returns BackboneOutput.feature_maps), else the paper's ResNet.
        self.backbone = PCAAResNetBackbone(config) if config.backbone_config is None else load_backbone(config)
        self.decode_head = DECODE_HEADS[config.decode_head_type](config, self.backbone.channels[-1])
        self.auxiliary_head = (
            PCAAAuxiliaryHead(config, self.backbone.channels[-2]) if config.use_auxiliary_head else None
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> tuple | PCAASemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images; any height and width.
        labels (`torch.LongTensor` of shape `(batch_size, label_height, label_width)`, *optional*):
            Class ids in `[0, num_labels)` (0 or 1 with `num_labels=1`) or `config.loss_ignore_index`. When given,
            the loss and its terms are returned (logits are upsampled to the label size for the cross-entropies).
        output_attentions (`bool`, *optional*):
            Return the attention maps of a transformers backbone that has them (e.g. Swin), as UperNet does. The
            paper's backbone has none, and the decode head's attention (PCAA's over region classes, the Non-local
            and OCR baselines') is not returned.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        labels = self._check_inputs(pixel_values, labels)
        if self.training and labels is None and not torch.is_grad_enabled():
            logger.warning_once(
                "PCAAForSemanticSegmentation runs in training mode without gradients or labels: BatchNorm normalises "
                "with batch statistics and updates its running ones. Call model.eval() for inference (pipelines "
                "do not; pcaa_hf.PCAASegmentationPipeline does)."
            )

        reads_auxiliary_logits = getattr(self.decode_head, "reads_auxiliary_logits", False)
        auxiliary = self.auxiliary_head is not None and (self.training or labels is not None or reads_auxiliary_logits)
        # Only the maps that the heads read stay alive: the others are freed before the decode head runs.
        kept_maps = len(self.backbone.channels) if output_hidden_states else (2 if auxiliary else 1)
        feature_maps, hidden_states, attentions = self.backbone_features(
            pixel_values, kept_maps, output_hidden_states, output_attentions
        )
        auxiliary_logits = self.auxiliary_head(feature_maps[-2]) if auxiliary else None
        head_inputs = (feature_maps[-1], auxiliary_logits) if reads_auxiliary_logits else (feature_maps[-1],)
        logits, region_class_scores = self.decode_head(*head_inputs)

        losses = {}
        if labels is not None:
            losses = pcaa_loss(self.config, logits, auxiliary_logits, region_class_scores, labels)

        output = PCAASemanticSegmenterOutput(
            loss=losses.get("loss"),
            logits=logits,
            hidden_states=hidden_states,
            attentions=attentions,
            segmentation_loss=losses.get("segmentation_loss"),
            auxiliary_loss=losses.get("auxiliary_loss"),
            region_loss=losses.get("region_loss"),
            auxiliary_logits=auxiliary_logits,
            region_class_scores=region_class_scores or None,
        )
        return output if return_dict else output.to_tuple()

    def backbone_features(self, pixel_values, kept_maps, output_hidden_states, output_attentions):
        """
        The backbone's last `kept_maps` feature maps (standard layout), its hidden states (when asked for) and
        attentions (a transformers backbone's, when asked for).
        """
        if self.config.backbone_config is not None:
            backbone_output = self.backbone.forward_with_filtered_kwargs(
                pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
            )
            hidden_states = backbone_output.hidden_states if output_hidden_states else None
            return backbone_output.feature_maps[-kept_maps:], hidden_states, backbone_output.attentions
        if uses_cpu_fast_paths(self, pixel_values):
            feature_maps = backbone_on_cpu_fast_path(self.backbone, pixel_values, kept_maps)
        else:
            feature_maps = self.backbone(pixel_values)[-kept_maps:]  # the stem's and the four stages' outputs
        return feature_maps, feature_maps if output_hidden_states else None, None

    def _check_inputs(self, pixel_values, labels):
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"`pixel_values` must be a torch.Tensor (batch_size, channels, height, width), got "
                f"{type(pixel_values).__name__}: prepare images with the image processor (return_tensors='pt') or "
                "convert arrays with torch.from_numpy."
            )
        # One reduction over the input, skipped while tracing (export, compile), where a data-dependent branch
        # cannot be taken; the image processor refuses such images earlier.
        if not is_traced() and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("`pixel_values` holds NaN or infinite values; images must be finite.")
        backbone_config = self.config.backbone_config
        num_channels = self.config.num_channels if backbone_config is None else backbone_config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, {num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        batch, _, height, width = pixel_values.shape
        if batch == 0:
            raise ValueError("`pixel_values` is an empty batch.")
        if height == 0 or width == 0:
            raise ValueError(f"`pixel_values` has an empty image size {height}x{width}.")
        # The paper's backbone's stride is known; another backbone's smallest maps are checked by its own layers.
        feature_height, feature_width = (-(-size // self.config.output_stride) for size in (height, width))
        if backbone_config is None and self.training and batch * feature_height * feature_width == 1:
            raise ValueError(
                f"Training normalises with batch statistics, which needs more than one value per channel: one "
                f"{height}x{width} image gives a 1x1 feature map at output stride {self.config.output_stride}. Use a "
                "larger input or batch, or call model.eval()."
            )
        if labels is None:
            return None
        if labels.ndim != 3 or labels.shape[0] != batch or labels.shape[1] == 0 or labels.shape[2] == 0:
            raise ValueError(
                f"`labels` must have shape (batch_size={batch}, height, width) with a non-empty size, "
                f"got {tuple(labels.shape)}."
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"`labels` must hold integer class ids, got dtype {labels.dtype}.")
        ignore_index, num_labels = self.config.loss_ignore_index, num_label_values(self.config.num_labels)
        out_of_range = ((labels < 0) | (labels >= num_labels)) & (labels != ignore_index)
        if out_of_range.any():
            values = torch.unique(labels[out_of_range])[:10].tolist()
            raise ValueError(
                f"`labels` holds values outside [0, {num_labels}) that are not the ignore index {ignore_index}: "
                f"{values}."
            )
        return labels.to(device=pixel_values.device, dtype=torch.long)


__all__ = ["PCAAForSemanticSegmentation", "PCAAPreTrainedModel", "PCAASemanticSegmenterOutput"]
