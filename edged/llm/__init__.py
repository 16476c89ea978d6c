"""The language-model engine: onnxruntime, a tokenizer with its chat template, and a lean generation loop."""

from edged.llm.engine import (
    Engine,
    Generation,
    GenerationRequest,
    GenerationResult,
    LogitsHook,
    Timings,
    Usage,
)
from edged.llm.sampling import SamplingParams
from edged.llm.tokenizer import Message

__all__ = [
    "Engine",
    "Generation",
    "GenerationRequest",
    "GenerationResult",
    "LogitsHook",
    "Message",
    "SamplingParams",
    "Timings",
    "Usage",
]
