"""Faithfulness of a quantized build: teacher-forced agreement with, and KL from, the fp32 build."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edged.llm import Engine, GenerationRequest, Message

# A fixed, varied set: facts, arithmetic, instructions, code, a kiosk-style question.
PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are rich in vitamin C.",
    "Write a Python function that returns the square of a number.",
    "How many legs does a spider have?",
    "Give me a short tip for saving energy at home.",
    "Translate 'good morning' into Spanish.",
    "What should I do if my tomato plants wilt in hot weather?",
)
EVAL_TOKENS = 60


@dataclass(frozen=True)
class Agreement:
    top1: float  # share of positions where both models pick the same next token
    kl: float  # mean KL(fp32 || candidate) in nats per position
    positions: int


def _log_softmax(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def agreement(reference: Engine, candidate: Engine, tokens: int = EVAL_TOKENS) -> Agreement:
    """Both models read the reference's own greedy answers; compare their next-token choices."""
    matches = 0
    kl_sum = 0.0
    positions = 0
    for prompt in PROMPTS:
        request = GenerationRequest(messages=(Message("user", prompt),), max_tokens=tokens)
        prompt_ids = reference.prompt_ids(request)
        sequence = prompt_ids + list(reference.complete(request).token_ids)  # greedy, ends at end of turn
        # logits at position i predict token i + 1: score the positions that predict the answer
        span = slice(len(prompt_ids) - 1, len(sequence) - 1)
        ref = _log_softmax(reference.session.forward(sequence, reference.session.new_cache())[span])
        cand = _log_softmax(candidate.session.forward(sequence, candidate.session.new_cache())[span])
        matches += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        kl_sum += float((np.exp(ref) * (ref - cand)).sum())
        positions += ref.shape[0]
    return Agreement(top1=matches / positions, kl=kl_sum / positions, positions=positions)
