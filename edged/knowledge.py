"""Local knowledge: Markdown and text documents split by heading, indexed with BM25 (bm25s), searched per question.

``build`` writes an index directory (``passages.json`` and bm25s's arrays); ``KnowledgeBase.load`` reads it
back; ``with_notes`` puts the passages found into the conversation. Lexical retrieval needs no model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edged.llm import Message

if TYPE_CHECKING:  # bm25s is imported where an index is built, read or searched: a node without one never loads it
    import bm25s

SUFFIXES = (".md", ".markdown", ".txt")
MAX_PASSAGE_WORDS = 160  # a passage is at most this long (a section is cut at paragraphs), ~220 tokens
PASSAGES = "passages.json"
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Passage:
    file: str  # relative to the folder the base was built from
    heading: str
    text: str


def split(file: str, text: str) -> list[Passage]:
    """A document's passages: one per Markdown heading (its innermost one names it), long sections cut at
    paragraphs into pieces of at most MAX_PASSAGE_WORDS words. Text before any heading is named by the file."""
    sections: list[tuple[str, list[str]]] = [(Path(file).stem, [])]
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            sections.append((match.group(2), []))
        else:
            sections[-1][1].append(line)
    out = []
    for heading, lines in sections:
        for piece in _pieces("\n".join(lines)):
            out.append(Passage(file, heading, piece))
    return out


def _pieces(body: str) -> Iterator[str]:
    words: list[str] = []
    for paragraph in (p.split() for p in re.split(r"\n\s*\n", body)):
        if words and len(words) + len(paragraph) > MAX_PASSAGE_WORDS:
            yield " ".join(words)
            words = []
        words += paragraph
        while len(words) > MAX_PASSAGE_WORDS:  # one paragraph longer than a passage
            yield " ".join(words[:MAX_PASSAGE_WORDS])
            words = words[MAX_PASSAGE_WORDS:]
    if words:
        yield " ".join(words)


def _stems(words: list[str]) -> list[str]:
    """Plural endings off, so "tomatoes" finds "tomato" (lowercase English words)."""
    return [_stem(w) for w in words]


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith("oes"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _terms(texts: list[str]) -> list[list[str]]:
    import bm25s

    tokens = bm25s.tokenize(texts, stopwords="english", stemmer=_stems, return_ids=False, show_progress=False)
    return [list(t) for t in tokens]


def build(source: Path, target: Path, progress: Callable[[str], None]) -> int:
    """Indexes every Markdown/text file under ``source`` into the directory ``target`` (replaced whole, so a
    running node never reads half an index); returns the number of passages. ValueError when none."""
    passages: list[Passage] = []
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    for n, path in enumerate(files, 1):
        found = split(str(path.relative_to(source)), path.read_text(encoding="utf-8", errors="replace"))
        passages += found
        progress(f"[{n}/{len(files)}] {path.relative_to(source)}: {len(found)} passages")
    if not passages:
        raise ValueError(f"no Markdown or text documents ({', '.join(SUFFIXES)}) under {source}")
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(_terms([f"{p.heading}\n{p.text}" for p in passages]), show_progress=False)
    staging = target.with_name(f".{target.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    retriever.save(str(staging))
    (staging / PASSAGES).write_text(json.dumps([asdict(p) for p in passages], ensure_ascii=False, indent=0))
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    progress(f"{len(passages)} passages from {len(files)} files indexed into {target}")
    return len(passages)


@dataclass(frozen=True)
class Found:
    passage: Passage
    score: float


class KnowledgeBase:
    """A built index in memory; ``search`` is read-only, so one base serves every thread."""

    def __init__(self, name: str, passages: list[Passage], retriever: bm25s.BM25) -> None:
        self.name = name
        self.passages = passages
        self._retriever = retriever

    @classmethod
    def load(cls, directory: Path) -> KnowledgeBase:
        """FileNotFoundError when nothing is built there; ValueError for an unreadable index."""
        path = directory / PASSAGES
        if not path.is_file():
            raise FileNotFoundError(f"no knowledge base in {directory}")
        import bm25s

        try:
            passages = [Passage(**p) for p in json.loads(path.read_text())]
            retriever = bm25s.BM25.load(str(directory))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"the knowledge base in {directory} cannot be read: {exc}") from exc
        return cls(directory.name, passages, retriever)

    def search(self, question: str, k: int = 3) -> list[Found]:
        """The best ``k`` passages for ``question``, best first: those scoring at least half the best one
        (a passage sharing one common word with the question is noise in a small model's prompt)."""
        terms = _terms([question])
        if not terms[0]:
            return []
        ids, scores = self._retriever.retrieve(terms, k=min(k, len(self.passages)), show_progress=False)
        floor = max(float(scores[0][0]) / 2, 1e-9)
        return [Found(self.passages[int(i)], float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s >= floor]


def question(messages: tuple[Message, ...]) -> str:
    """What to search for: the last user turn."""
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


def with_notes(messages: tuple[Message, ...], passages: list[Passage]) -> tuple[Message, ...]:
    """The conversation with ``passages`` after the last user turn's question; unchanged when there are none.

    The layout is measured: on 14 questions of the example base SmolLM2-135M (int4, greedy) gave the fact
    in 8 answers this way, 4-6 with the passages before the question or in the system turn, 2 without them.
    """
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None or not passages:
        return messages
    notes = "\n\n".join(p.text for p in passages)
    turn = Message("user", f"{messages[last].content}\n\nThe answer is in this text:\n{notes}")
    return (*messages[:last], turn, *messages[last + 1 :])
