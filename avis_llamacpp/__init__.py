"""avis-llamacpp: AVIS adaptive test-time scaling (visual-token pruning + shared-prefill self-consistency)
for vision-language models running in llama.cpp through llama-cpp-python."""

from .errors import AVISError, ContextOverflowError, EncodeError, ImageError, InvalidArgumentError, ModelLoadError
from .native import SamplingParams
from .pipeline import VLM, Answer
from .policy import AVISPolicy, load_policy

__all__ = ["VLM", "Answer", "SamplingParams", "AVISPolicy", "load_policy", "AVISError", "ContextOverflowError", "ImageError",
           "InvalidArgumentError", "ModelLoadError", "EncodeError"]
__version__ = "0.1.0"
