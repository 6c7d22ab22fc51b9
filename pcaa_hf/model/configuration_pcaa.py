"""Configuration of PCAA (Partial Class Activation Attention, Liu et al., CVPR 2022)."""

from huggingface_hub.dataclasses import strict
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

BACKBONE_DEPTHS = (18, 34, 50, 101)
OUTPUT_STRIDES = (8, 16)
# The context heads of the paper's Table 3, each on the same backbone, auxiliary head and loss: PCAA itself, and the
# baselines the authors' train.py trains with --model basenet, deeplabv3, nlnet and ocrnet.
DECODE_HEAD_TYPES = ("pcaa", "fcn", "aspp", "non_local", "ocr")
DEFAULT_NUM_LABELS = 19


def num_label_values(num_labels: int) -> int:
    """How many label values a model with `num_labels` outputs scores: one output is binary segmentation (0 and 1)."""
    return max(num_labels, 2)


@strict
class PCAAConfig(PreTrainedConfig):
    r"""
    Configuration of [`PCAAForSemanticSegmentation`]. The defaults reproduce the paper's Cityscapes ResNet-50 model
    (dilated ResNet-50 "v1c" at output stride 8, one PCAA module with 4x4 bins, auxiliary head), with 19 generic
    labels unless `id2label`/`label2id` or `num_labels` are given. `num_labels=1` is binary segmentation, as in
    SegFormer: one logit per pixel, labels 0 and 1, a binary cross-entropy, class 1 where the logit is positive.
    `decode_head_type` puts one of the paper's baselines in the PCAA head's place, with everything else unchanged.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            A transformers backbone configuration (e.g. `ResNetConfig`, `ConvNextConfig`, `SwinConfig`, or a dict
            with its `model_type`) whose `out_features` name at least two stages: the PCAA head sits on the last
            feature map, the auxiliary head on the one before, whatever their strides and widths. When given,
            `backbone_depth`, `output_stride`, `multi_grid` and `num_channels` are not used. Default: the paper's
            dilated ResNet "v1c" below.
        backbone_depth (`int`, *optional*, defaults to 50):
            Depth of the dilated ResNet "v1c" backbone: 18 or 34 (basic blocks, for small fast runs), 50 or 101
            (bottleneck blocks, as in the paper).
        output_stride (`int`, *optional*, defaults to 8):
            Ratio of input to feature-map resolution: 8 (stages 3 and 4 dilated by 2 and 4) or 16 (stage 4 dilated
            by 2).
        multi_grid (`bool`, *optional*, defaults to `False`):
            Multiply the dilation of the blocks of stage 4 by (1, 2, 4) in turn (the paper's ADE20K model).
        num_channels (`int`, *optional*, defaults to 3):
            Number of input image channels.
        decode_head_type (`str`, *optional*, defaults to `"pcaa"`):
            The context head on the last feature map, the rows of the paper's Table 3: `"pcaa"` (Partial Class
            Activation Attention), or a baseline as the authors' code builds it: `"fcn"` (two 3x3 convolutions,
            their `basenet`), `"aspp"` (DeepLabV3's atrous spatial pyramid pooling with image pooling, `deeplabv3`),
            `"non_local"` (a Non-local block, `nlnet`) or `"ocr"` (object-contextual representations over soft
            object regions from the auxiliary head's class scores, `ocrnet`; needs `use_auxiliary_head` and 2 labels
            or more).
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the decode head; attention (PCAA, Non-local, OCR) and the ASPP branches work at half of it.
        aspp_dilations (`list[int]`, *optional*, defaults to `(12, 24, 36)`):
            Dilation rates of the 3x3 ASPP branches (`decode_head_type="aspp"`), beside its 1x1 and image-pooling
            branches.
        bins (`list[tuple[int, int]]`, *optional*, defaults to `((4, 4),)`):
            One (rows, columns) region grid per PCAA module; the modules are applied in sequence (PCAA head only).
        cam_dropout (`float`, *optional*, defaults to 0.1):
            Channel dropout (`Dropout2d`) before the partial class activation map of each PCAA module.
        classifier_dropout (`float`, *optional*, defaults to 0.0):
            Channel dropout before the final classifiers of the decode and auxiliary heads (the authors' `--dropout`
            flag sets 0.1).
        use_auxiliary_head (`bool`, *optional*, defaults to `True`):
            Whether to build the auxiliary (stage 3) head and use its loss.
        auxiliary_hidden_size (`int`, *optional*, defaults to 256):
            Width of the auxiliary head.
        auxiliary_loss_weight (`float`, *optional*, defaults to 0.4):
            Weight of the auxiliary cross-entropy in the total loss.
        region_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the region-level classification (focal) loss in the total loss (PCAA head only).
        focal_gamma (`float`, *optional*, defaults to 2.0):
            Focusing parameter of the region focal loss.
        region_label_threshold (`float`, *optional*, defaults to 0.01):
            A class covering a region's area by a fraction in (0, threshold) is ignored in the region loss.
        loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value of pixels that are ignored by every loss.
        use_ohem (`bool`, *optional*, defaults to `False`):
            Online hard example mining for the segmentation cross-entropy.
        ohem_threshold (`float`, *optional*, defaults to 0.7):
            OHEM keeps the pixels whose true-class probability is below max(threshold, the `ohem_min_kept`-th
            smallest probability).
        ohem_min_kept (`int`, *optional*, defaults to 100000):
            Minimum number of pixels per image OHEM keeps.
        initializer_range (`float`, *optional*, defaults to 0.01):
            Standard deviation of the normal initialisation of the classifiers (other convs use Kaiming-normal).

    Example:

    ```python
    >>> from pcaa_hf import PCAAConfig, PCAAForSemanticSegmentation
    >>> config = PCAAConfig(backbone_depth=101, multi_grid=True, num_labels=150)  # the paper's ADE20K model
    >>> model = PCAAForSemanticSegmentation(config)
    ```
    """

    model_type = "pcaa"
    # Declared so that `attn_implementation`, `dtype` and the other shared settings reach a transformers backbone;
    # optional because None means the paper's own backbone, not a default transformers one.
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet", optional=True)
    }
    # transformers.Trainer hands the remaining outputs (the logits) to `compute_metrics` as its predictions.
    keys_to_ignore_at_inference = [
        "segmentation_loss", "auxiliary_loss", "region_loss", "auxiliary_logits", "region_class_scores"
    ]

    backbone_config: dict | PreTrainedConfig | None = None
    backbone_depth: int = 50
    output_stride: int = 8
    multi_grid: bool = False
    num_channels: int = 3
    decode_head_type: str = "pcaa"
    hidden_size: int = 512
    aspp_dilations: list[int] | tuple[int, ...] = (12, 24, 36)
    bins: list[list[int]] | list[tuple[int, int]] | tuple[tuple[int, int], ...] = ((4, 4),)
    cam_dropout: float = 0.1
    classifier_dropout: float = 0.0
    use_auxiliary_head: bool = True
    auxiliary_hidden_size: int = 256
    auxiliary_loss_weight: float = 0.4
    region_loss_weight: float = 1.0
    focal_gamma: float = 2.0
    region_label_threshold: float = 0.01
    loss_ignore_index: int = 255
    use_ohem: bool = False
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 100000
    initializer_range: float = 0.01

    def __post_init__(self, **kwargs):
        # A dict (as stored in config.json) is resolved here, before the sub-config spec sees it, to refuse one without
        # a transformers `model_type` by name (the spec would fall back to its default type).
        if isinstance(self.backbone_config, dict):
            settings = dict(self.backbone_config)
            model_type = settings.pop("model_type", None)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"`backbone_config` needs the `model_type` of a transformers backbone, got "
                                 f"{model_type!r}.")
            self.backbone_config = CONFIG_MAPPING[model_type](**settings)
        if self.id2label is None and "num_labels" not in kwargs:
            kwargs["num_labels"] = DEFAULT_NUM_LABELS
        super().__post_init__(**kwargs)

    def validate_backbone(self):
        if self.backbone_config is not None:
            features = getattr(self.backbone_config, "out_features", None)
            if features is None:
                raise ValueError(f"`backbone_config` ({type(self.backbone_config).__name__}) is not a backbone "
                                 "configuration: it has no `out_features`.")
            needed = 2 if self.use_auxiliary_head else 1
            if len(features) < needed:
                raise ValueError(f"`backbone_config.out_features` must name at least {needed} stages (the PCAA head "
                                 "uses the last, the auxiliary head the one before), got "
                                 f"{list(features)}; e.g. out_features=['stage3', 'stage4'].")
        if self.backbone_depth not in BACKBONE_DEPTHS:
            raise ValueError(f"`backbone_depth` must be one of {BACKBONE_DEPTHS}, got {self.backbone_depth}.")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"`output_stride` must be one of {OUTPUT_STRIDES}, got {self.output_stride}.")
        if self.num_channels < 1:
            raise ValueError(f"`num_channels` must be at least 1, got {self.num_channels}.")

    def validate_head(self):
        if self.decode_head_type not in DECODE_HEAD_TYPES:
            raise ValueError(f"`decode_head_type` must be one of {DECODE_HEAD_TYPES}, got {self.decode_head_type!r}.")
        if self.decode_head_type == "ocr" and not self.use_auxiliary_head:
            raise ValueError("`use_auxiliary_head` must be True with `decode_head_type='ocr'`: OCR's object regions "
                             "are the auxiliary head's class scores.")
        if self.decode_head_type == "ocr" and self.num_labels < 2:
            raise ValueError(f"`decode_head_type='ocr'` needs at least 2 labels, got num_labels={self.num_labels}: its "
                             "object regions are one per class, and over a single region every pixel gets the same "
                             "context.")
        if len(self.aspp_dilations) == 0 or any(not isinstance(rate, int) or rate < 1 for rate in self.aspp_dilations):
            raise ValueError(f"`aspp_dilations` must be positive integers, at least one, got {self.aspp_dilations!r}.")
        if self.hidden_size < 2 or self.hidden_size % 2:
            raise ValueError(f"`hidden_size` must be a positive even number, got {self.hidden_size}.")
        if self.auxiliary_hidden_size < 1:
            raise ValueError(f"`auxiliary_hidden_size` must be positive, got {self.auxiliary_hidden_size}.")
        if len(self.bins) == 0:
            raise ValueError("`bins` must name at least one (rows, columns) region grid, got none.")
        for grid in self.bins:
            if len(grid) != 2 or any(not isinstance(n, int) or n < 1 for n in grid):
                raise ValueError(f"`bins` entries must be pairs of positive integers (rows, columns), got {grid!r}.")
        for name in ("cam_dropout", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")

    def validate_losses(self):
        if self.num_labels < 1:
            raise ValueError(f"PCAA needs at least 1 label (`num_labels`/`id2label`), got {self.num_labels}.")
        if 0 <= self.loss_ignore_index < num_label_values(self.num_labels):
            raise ValueError(f"`loss_ignore_index` ({self.loss_ignore_index}) must not be a label value in "
                             f"[0, {num_label_values(self.num_labels)}).")
        for name in ("auxiliary_loss_weight", "region_loss_weight", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)}.")
        if not 0.0 <= self.region_label_threshold <= 1.0:
            raise ValueError(f"`region_label_threshold` must be in [0, 1], got {self.region_label_threshold}.")
        if not 0.0 < self.ohem_threshold <= 1.0:
            raise ValueError(f"`ohem_threshold` must be in (0, 1], got {self.ohem_threshold}.")
        if self.ohem_min_kept < 0:
            raise ValueError(f"`ohem_min_kept` must be non-negative, got {self.ohem_min_kept}.")


__all__ = ["DECODE_HEAD_TYPES", "PCAAConfig"]
