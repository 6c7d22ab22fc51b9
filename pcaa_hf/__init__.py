"""PCAA (Partial Class Activation Attention, CVPR 2022) for Hugging Face transformers."""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from .configuration_pcaa import PCAAConfig
from .image_processing_pcaa import PCAAImageProcessor
from .modeling_pcaa import PCAAForSemanticSegmentation, PCAAPreTrainedModel, PCAASemanticSegmenterOutput
from .pipeline_pcaa import PCAASegmentationPipeline

AutoConfig.register(PCAAConfig.model_type, PCAAConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(PCAAConfig, PCAAForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(PCAAConfig, image_processor_classes={"pil": PCAAImageProcessor}, exist_ok=True)
# PCAA has no video processor. Saying so stops AutoVideoProcessor, which pipeline("image-segmentation") also tries,
# from guessing a remote "PCAAVideoProcessor" from the image processor's auto_map and asking to trust remote code.
AutoVideoProcessor.register(PCAAConfig, video_processor_classes={}, exist_ok=True)
PCAAConfig.register_for_auto_class()
PCAAForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
PCAAImageProcessor.register_for_auto_class()

__version__ = "0.1.0"
__all__ = [
    "PCAAConfig",
    "PCAAForSemanticSegmentation",
    "PCAAImageProcessor",
    "PCAAPreTrainedModel",
    "PCAASegmentationPipeline",
    "PCAASemanticSegmenterOutput",
]
