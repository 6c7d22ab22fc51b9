"""
PCAA (Partial Class Activation Attention, CVPR 2022) for Hugging Face transformers.

Importing the package registers PCAA with transformers' Auto classes. The model's own classes load at once; the
other public names (data, inference, evaluation, training, publishing) load on first use, so that `import pcaa_hf`
stays as light as the model. Subpackages, from the bottom layer up (each imports only those before it):
`utils`, `model` (the files a saved folder carries as remote code), `data`, `inference`, `evaluation`,
`conversion`, `publishing`, `training`, then `benchmarks` and `cli` (the command-line tools).
"""

import importlib

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from pcaa_hf.model import (
    PCAAConfig,
    PCAAForSemanticSegmentation,
    PCAAImageProcessor,
    PCAAPreTrainedModel,
    PCAASemanticSegmenterOutput,
    cpu_fast_paths,
    set_cpu_fast_paths,
)

__version__ = "0.1.0"

# Public names defined in the subpackages, by module.
_LAZY_NAMES = {
    "pcaa_hf.data.builders": ("build_ade20k", "build_cityscapes", "label_names", "load_segmentation_dataset"),
    "pcaa_hf.data.transforms": ("EvalTransform", "TrainTransform", "collate"),
    "pcaa_hf.inference.pipeline": ("PCAASegmentationPipeline",),
    "pcaa_hf.inference.segmentation_inference": ("SegmentationInference",),
    "pcaa_hf.evaluation.metrics": ("EVALUATE_MODULE", "ConfusionMatrix", "mean_iou"),
    "pcaa_hf.evaluation.scoring": ("evaluate_segmentation", "results_table"),
    "pcaa_hf.conversion.openmmlab_backbones": ("load_pretrained_backbone",),
    "pcaa_hf.conversion.original_checkpoints": ("convert_original_checkpoint",),
    "pcaa_hf.publishing.exporting": ("export_to_folder", "load_exported"),
    "pcaa_hf.publishing.hub": ("HubPublisher",),
    "pcaa_hf.publishing.model_cards": ("render_model_card",),
    "pcaa_hf.training.arguments": ("TrainingArguments",),
    "pcaa_hf.training.trainer": ("Trainer",),
}
_MODULE_OF = {name: module for module, names in _LAZY_NAMES.items() for name in names}


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pcaa_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))


AutoConfig.register(PCAAConfig.model_type, PCAAConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(PCAAConfig, PCAAForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(PCAAConfig, image_processor_classes={"pil": PCAAImageProcessor}, exist_ok=True)
# PCAA has no video processor. Saying so stops AutoVideoProcessor, which pipeline("image-segmentation") also tries,
# from guessing a remote "PCAAVideoProcessor" from the image processor's auto_map and asking to trust remote code.
AutoVideoProcessor.register(PCAAConfig, video_processor_classes={}, exist_ok=True)
PCAAConfig.register_for_auto_class()
PCAAForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
PCAAImageProcessor.register_for_auto_class()

__all__ = [
    "PCAAConfig",
    "PCAAForSemanticSegmentation",
    "PCAAImageProcessor",
    "PCAAPreTrainedModel",
    "PCAASemanticSegmenterOutput",
    "cpu_fast_paths",
    "set_cpu_fast_paths",
    *sorted(_MODULE_OF),
]
