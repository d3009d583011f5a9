"""BiomedGPT / OFA model: config presets, modeling, and registration with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration import PRESETS, BiomedGPTConfig
from .modeling import BiomedGPTEncoderOutput, BiomedGPTForConditionalGeneration, BiomedGPTModel

AutoConfig.register(BiomedGPTConfig.model_type, BiomedGPTConfig, exist_ok=True)
AutoModel.register(BiomedGPTConfig, BiomedGPTModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(BiomedGPTConfig, BiomedGPTForConditionalGeneration, exist_ok=True)

__all__ = [
    "PRESETS",
    "BiomedGPTConfig",
    "BiomedGPTEncoderOutput",
    "BiomedGPTForConditionalGeneration",
    "BiomedGPTModel",
]
