"""The model's tokenizer and chat template, and UTF-8-safe incremental detokenization."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

from edged.errors import InvalidRequest, ModelUnavailable

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class ChatTokenizer:
    """Renders a conversation with the model's own chat template and turns text into token ids and back."""

    def __init__(self, model_dir: Path) -> None:
        self._path = model_dir / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(self._path))
            config: dict[str, Any] = json.loads((model_dir / "tokenizer_config.json").read_text())
        except (OSError, ValueError, Exception) as exc:  # tokenizers raises plain Exception
            raise ModelUnavailable(f"cannot read the tokenizer in {model_dir}: {exc}") from exc
        template = config.get("chat_template")
        if not isinstance(template, str):
            raise ModelUnavailable(f"{model_dir}/tokenizer_config.json has no chat_template")
        # The same environment transformers uses for chat templates, so templates render identically.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(template)
        self.bos_token = str(config.get("bos_token") or "")
        self.eos_token = str(config.get("eos_token") or "")

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer knows (added tokens included); a model's logits may be wider (padding)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def path(self) -> Path:
        return self._path

    def token_id(self, token: str) -> int | None:
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opener."""
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"the model's chat template refused the conversation: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Byte-level BPE tokens can end mid-character; decoding such a prefix yields U+FFFD. The
    decoder re-decodes a short window of recent tokens and holds text back until it is whole
    (the approach of vLLM and transformers' TextStreamer).
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that is re-decoded
        self._read = 0  # end of the tokens already turned into text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""
