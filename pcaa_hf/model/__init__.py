"""
The PCAA model, laid out as a transformers model folder: configuration, modeling (with its backbone and loss) and
image processor. These files, and nothing else, are what `save_pretrained` copies beside the weights as remote code
(a file's relative imports decide what it carries), so a saved folder or Hub repo loads with `trust_remote_code=True`
where pcaa_hf is not installed. They import nothing from the rest of pcaa_hf.
"""

from .backbone_pcaa import cpu_fast_paths, set_cpu_fast_paths
from .configuration_pcaa import PCAAConfig
from .image_processing_pcaa import PCAAImageProcessor
from .modeling_pcaa import PCAAForSemanticSegmentation, PCAAPreTrainedModel, PCAASemanticSegmenterOutput

# The files a saved model and image processor carry as remote code: exactly this folder's modules.
REMOTE_CODE_FILES = (
    "backbone_pcaa.py",
    "configuration_pcaa.py",
    "decode_heads_pcaa.py",
    "image_processing_pcaa.py",
    "loss_pcaa.py",
    "modeling_pcaa.py",
)

__all__ = [
    "REMOTE_CODE_FILES",
    "PCAAConfig",
    "PCAAForSemanticSegmentation",
    "PCAAImageProcessor",
    "PCAAPreTrainedModel",
    "PCAASemanticSegmenterOutput",
    "cpu_fast_paths",
    "set_cpu_fast_paths",
]
