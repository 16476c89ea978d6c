"""The command line: answers stream to stdout, errors are one line on stderr with a non-zero status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def edged(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=300, input=stdin
    )


def test_ask_local_streams_an_answer_then_timings(tiny: Path) -> None:
    r = edged("ask", "--local", "--models-dir", str(tiny.parent), "--model", tiny.name, "--max-tokens", "8", "Hi")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "8 answer tokens" in r.stderr and "tok/s" in r.stderr


def test_ask_local_interactive_reads_questions_until_eof(tiny: Path) -> None:
    r = edged(
        "ask",
        "--local",
        "--models-dir",
        str(tiny.parent),
        "--model",
        tiny.name,
        "--max-tokens",
        "4",
        stdin="first question\n\nsecond question\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("4 answer tokens") == 2


def test_unbuilt_model_is_a_one_line_error(tmp_path: Path) -> None:
    r = edged("ask", "--local", "--models-dir", str(tmp_path), "hello")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0
    assert "model_unavailable" in r.stderr and "edged model build" in r.stderr


def test_bad_sampling_option_is_a_one_line_error(tiny: Path) -> None:
    r = edged("ask", "--local", "--models-dir", str(tiny.parent), "--model", tiny.name, "--top-p", "0", "Hi")
    assert r.returncode == 2
    assert r.stderr.startswith("edged: invalid_request: top_p")


def test_unknown_recipe_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "alpha.toml").write_text('[source]\nhf_dir = "x"\n')
    r = edged("model", "build", "beta", "--models-dir", str(tmp_path))
    assert r.returncode != 0
    assert "no recipe 'beta'" in r.stderr and "alpha" in r.stderr
