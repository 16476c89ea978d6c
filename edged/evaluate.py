"""Faithfulness of a build: teacher-forced agreement with, and KL from, the fp32 build, and how many short
factual questions its greedy answers get right (expected keywords), beside the fp32 build's own score."""

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

# Answer quality: a question, and the words of which one must appear in a right answer (lower case). Plain
# facts a small model may know; the score matters only beside the fp32 build's score on the same set.
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the chemical symbol for water?", ("h2o", "h₂o")),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2", "co₂")),
    ("What is the boiling point of water at sea level in degrees Celsius?", ("100",)),
    ("What is the freezing point of water in degrees Celsius?", ("0 ", "zero", "0°", "0 degrees")),
    ("Who wrote the play Romeo and Juliet?", ("shakespeare",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("What language is mainly spoken in Brazil?", ("portuguese",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is 10 times 10?", ("100", "hundred")),
    ("What color do you get when you mix blue and yellow?", ("green",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the closest star to Earth?", ("sun",)),
    ("What do bees make?", ("honey",)),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("What is the main ingredient of guacamole?", ("avocado",)),
    ("In which country are the pyramids of Giza?", ("egypt",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four")),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("How many sides does a triangle have?", ("three", "3")),
    ("How many months are there in a year?", ("twelve", "12")),
    ("How many minutes are there in an hour?", ("sixty", "60")),
    ("What is 5 plus 3?", ("8", "eight")),
    ("What is 9 minus 4?", ("5", "five")),
    ("What is the largest mammal on Earth?", ("whale",)),
    ("What is the fastest land animal?", ("cheetah",)),
    ("Which planet is closest to the Sun?", ("mercury",)),
    ("What is the natural satellite of the Earth called?", ("moon",)),
    ("What is the chemical symbol for gold?", ("au",)),
    ("What gas do humans need to breathe to live?", ("oxygen",)),
    ("What is frozen water called?", ("ice",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("Who was the first person to walk on the Moon?", ("armstrong",)),
    ("What is the longest river in Africa?", ("nile",)),
    ("What is the largest desert in the world?", ("sahara", "antarctic")),
    ("What language is mainly spoken in Mexico?", ("spanish",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color are ripe bananas?", ("yellow",)),
    ("How many legs does an insect have?", ("six", "6")),
    ("What do caterpillars turn into?", ("butterfl", "moth")),
    ("What is the main gas in the air we breathe?", ("nitrogen",)),
    ("Which instrument has black and white keys?", ("piano",)),
    ("In which country is the Eiffel Tower?", ("france",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What do cows drink?", ("water",)),
)
ANSWER_TOKENS = 48


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


@dataclass(frozen=True)
class AnswerQuality:
    right: int
    total: int
    wrong: tuple[str, ...]  # the questions answered without any expected keyword


def answer_quality(engine: Engine, tokens: int = ANSWER_TOKENS) -> AnswerQuality:
    """Greedy answers to QUESTIONS, scored by their expected keywords."""
    wrong = []
    for question, keywords in QUESTIONS:
        request = GenerationRequest(messages=(Message("user", question),), max_tokens=tokens)
        text = engine.complete(request).text.lower() + " "
        if not any(k in text for k in keywords):
            wrong.append(question)
    return AnswerQuality(right=len(QUESTIONS) - len(wrong), total=len(QUESTIONS), wrong=tuple(wrong))
