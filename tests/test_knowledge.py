"""Local knowledge: documents split by heading, a BM25 index on disk, and answers grounded in it over MQTT."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.knowledge import MAX_PASSAGE_WORDS, KnowledgeBase, build, split
from tests.mqttlab import (
    Listener,
    Mosquitto,
    Node,
    contract_node,
    module_broker,  # noqa: F401 (a fixture)
    reply_listener,  # noqa: F401 (a fixture)
)

REPO = Path(__file__).parent.parent
EXAMPLE = REPO / "examples" / "crops"
# Questions whose answers are in the example base, each with the key fact an answer must state.
HELD_OUT = [
    ("How much water does a fruiting tomato plant need per day in a heat wave?", r"\b5 ?(litres|liters|l)\b"),
    ("What causes blossom end rot in tomatoes?", r"uneven"),
    ("At what time of day should I water tomatoes in hot weather?", r"dawn|before 8|8 (in the morning|am|a\.m)"),
    ("In which growth stage does maize need the most water?", r"tassel|silk"),
    ("How much water per week does maize need when it is tasselling?", r"25 ?mm"),
    ("When should I top-dress maize with nitrogen?", r"knee"),
    ("Why do the flowers of my beans drop before pods set?", r"dry"),
    ("How do beans get their nitrogen?", r"nodule"),
    ("How much water does drip irrigation use compared with sprinklers?", r"half"),
    ("How thick should a layer of straw mulch be?", r"\b5 ?cm"),
    ("How often should I check drip emitters for clogging?", r"week"),
    ("How tall should potato plants be before hilling them?", r"\b20 ?cm"),
    ("Why do potatoes turn green?", r"light"),
    ("At what temperature should potatoes be stored?", r"\b4\b.*\b8\b"),
]


def test_documents_split_by_heading_into_passages_of_bounded_size() -> None:
    text = "Intro line.\n\n# Crops\n\n## Beans\nWater twice a week.\n\n## Long\n" + "\n\n".join(
        " ".join(["word"] * 70) for _ in range(5)
    )
    passages = split("notes/crops.md", text)
    assert [(p.file, p.heading) for p in passages[:2]] == [("notes/crops.md", "crops"), ("notes/crops.md", "Beans")]
    assert passages[1].text == "Water twice a week."
    long = [p for p in passages if p.heading == "Long"]
    assert len(long) == 3 and all(len(p.text.split()) <= MAX_PASSAGE_WORDS for p in long)
    assert sum(len(p.text.split()) for p in long) == 350  # nothing lost at the cuts


def test_build_then_search_finds_the_section_that_answers(tmp_path: Path) -> None:
    """The index on disk is read back and ranks the right passage first; plurals match singulars."""
    lines: list[str] = []
    count = build(EXAMPLE, tmp_path / "crops", lines.append)
    assert count >= 12 and any("tomatoes.md" in line for line in lines)
    base = KnowledgeBase.load(tmp_path / "crops")
    best = base.search("when does a tomato need water in a heat wave")[0].passage
    assert (best.file, best.heading) == ("tomatoes.md", "Watering tomatoes in hot weather")
    assert base.search("What is the capital of France?") == []
    build(EXAMPLE, tmp_path / "crops", lines.append)  # rebuilt in place
    assert len(KnowledgeBase.load(tmp_path / "crops").passages) == count


def test_kb_commands_show_progress_and_what_retrieval_finds(tmp_path: Path) -> None:
    config = tmp_path / "edged.toml"
    config.write_text(f'knowledge_dir = "{tmp_path / "kb"}"\n')
    edged = [sys.executable, "-m", "edged"]
    built = subprocess.run([*edged, "kb", "build", str(EXAMPLE), "-o", "farm", "--config", str(config)], **_run())
    assert built.returncode == 0, built.stderr
    assert "[1/5] beans.md" in built.stderr and "13 passages from 5 files" in built.stderr
    query = [*edged, "kb", "query", "farm", "how thick should mulch be", "--config", str(config)]
    found = subprocess.run(query, **_run())
    assert found.returncode == 0 and "irrigation.md # Mulching" in found.stdout
    missing = subprocess.run([*edged, "kb", "query", "nope", "x", "--config", str(config)], **_run())
    assert missing.returncode != 0 and "no knowledge base" in missing.stderr


def _run() -> dict[str, Any]:
    return {"capture_output": True, "text": True, "timeout": 60}


# -- over MQTT, with the real model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def node(broker: Mosquitto, smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node serving the shipped profiles, the example base built as `crops`, and a profile whose base is
    not built."""
    knowledge_dir = tmp_path_factory.mktemp("knowledge")
    build(EXAMPLE, knowledge_dir / "crops", lambda _: None)
    profiles_dir = tmp_path_factory.mktemp("profiles")
    for path in (REPO / "profiles").glob("*.toml"):
        shutil.copy(path, profiles_dir)
    (profiles_dir / "unbuilt.toml").write_text('knowledge = "orchard"\n')
    n = contract_node(
        tmp_path_factory.mktemp("node"),
        broker,
        smollm2_dirs["int4"].parent,
        knowledge_dir=str(knowledge_dir),
        profiles_dir=str(profiles_dir),
        queue_capacity=32,
    )
    yield n
    assert n.stop() == 0, n.log.read_text()


@pytest.mark.model
def test_answers_grounded_in_the_knowledge_base_state_its_facts_and_name_their_sources(
    node: Node, listener: Listener
) -> None:
    """The held-out questions, asked plainly and through the `field-advisor` profile (knowledge = "crops"):
    retrieval must bring clearly more of the expected facts, and every grounded reply names its sources."""
    for i, (question, _) in enumerate(HELD_OUT):
        for mode in ("plain", "grounded"):
            body: dict[str, Any] = {"id": f"{mode}-{i}", "prompt": question, "max_tokens": 60}
            if mode == "grounded":
                body["profile"] = "field-advisor"
            listener.publish("edged/pi/ask", json.dumps(body), response_topic=listener.reply_topic)  # type: ignore[attr-defined]
    replies = {r["id"]: r for r in listener.finals(2 * len(HELD_OUT), timeout_s=600)}
    hits = {"plain": 0, "grounded": 0}
    for i, (_, fact) in enumerate(HELD_OUT):
        for mode in hits:
            reply = replies[f"{mode}-{i}"]
            assert reply["status"] == "ok", reply
            hits[mode] += bool(re.search(fact, reply["text"], re.IGNORECASE))
        assert "sources" not in replies[f"plain-{i}"]
        sources = replies[f"grounded-{i}"]["sources"]
        assert sources and all(set(s) == {"file", "heading"} and s["file"].endswith(".md") for s in sources)
    rates = {mode: hit / len(HELD_OUT) for mode, hit in hits.items()}
    print(f"key facts stated: {hits['grounded']}/{len(HELD_OUT)} with retrieval, {hits['plain']} without")
    assert hits["grounded"] >= hits["plain"] + 4, rates


@pytest.mark.model
def test_sources_name_the_file_and_heading_the_answer_came_from(node: Node, listener: Listener) -> None:
    listener.publish(
        "edged/pi/ask",
        json.dumps({"id": "src", "prompt": "How thick should straw mulch be?", "profile": "field-advisor"}),
        response_topic=listener.reply_topic,  # type: ignore[attr-defined]
    )
    reply = listener.finals(1)[0]
    assert reply["sources"][0] == {"file": "irrigation.md", "heading": "Mulching"}


@pytest.mark.model
def test_a_profile_whose_knowledge_base_is_not_built_is_refused_with_what_to_do(node: Node, listener: Listener) -> None:
    listener.publish(
        "edged/pi/ask",
        json.dumps({"id": "unbuilt", "prompt": "When do apples ripen?", "profile": "unbuilt"}),
        response_topic=listener.reply_topic,  # type: ignore[attr-defined]
    )
    reply = listener.finals(1)[0]
    assert reply["error"]["code"] == "model_unavailable"
    assert "edged kb build DIR -o orchard" in reply["error"]["message"]
