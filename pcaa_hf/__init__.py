"""PCAA (Partial Class Activation Attention, CVPR 2022) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModelForSemanticSegmentation

from .configuration_pcaa import PCAAConfig
from .modeling_pcaa import PCAAForSemanticSegmentation, PCAAPreTrainedModel, PCAASemanticSegmenterOutput

AutoConfig.register(PCAAConfig.model_type, PCAAConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(PCAAConfig, PCAAForSemanticSegmentation, exist_ok=True)
PCAAConfig.register_for_auto_class()
PCAAForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__version__ = "0.1.0"
__all__ = ["PCAAConfig", "PCAAForSemanticSegmentation", "PCAAPreTrainedModel", "PCAASemanticSegmenterOutput"]
