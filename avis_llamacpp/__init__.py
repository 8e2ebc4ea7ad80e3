"""avis-llamacpp: AVIS adaptive test-time scaling (visual-token pruning + shared-prefill self-consistency)
for vision-language models running in llama.cpp through llama-cpp-python."""

from .errors import (AVISError, ContextOverflowError, EncodeError, ImageError, InvalidArgumentError, ModelLoadError,
                     SelectorError, VideoError)
from .kdv import ImageTokens, TokenSelector, make_selector
from .native import SamplingParams, no_repack
from .pipeline import VLM, Answer
from .options import QuerySettings
from .policy import AVISPolicy, load_policy

__all__ = ["VLM", "Answer", "SamplingParams", "no_repack", "QuerySettings", "AVISPolicy", "load_policy", "make_selector",
           "TokenSelector", "ImageTokens", "AVISError", "ContextOverflowError", "ImageError", "InvalidArgumentError",
           "ModelLoadError", "EncodeError", "SelectorError", "VideoError"]
__version__ = "0.1.0"
