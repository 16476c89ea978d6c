"""Shared fixtures: a tiny random Llama built through the real build path, and the real SmolLM2 build."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.build import build_model
from edged.store import Recipe, default_cache_dir, default_models_dir
from tests.mqttlab import SMOLLM2, Mosquitto

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Enough varied text for a byte-level BPE with a few hundred merges, multi-byte characters included.
_CORPUS = [
    "The capital of France is Paris. Water boils at 100 degrees Celsius.",
    "Tomatoes wilt in hot weather; water them early in the morning.",
    "Grüße aus München! Ça va très bien, merci. 東京は日本の首都です。 🍅🌞",
    "def square(x):\n    return x * x\n",
] * 20


def _tiny_hf(dst: Path) -> None:
    """A random 2-layer Llama with a BPE tokenizer trained here: no hub, a few MB, exported like SmolLM2."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    dst.mkdir(parents=True)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML})
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # specials get a logit of exactly 0: random text runs to max_tokens
        model.lm_head.weight[:3] = 0
    model.save_pretrained(str(dst))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model at every quantization, built by `edged model build`'s own code path."""
    root = tmp_path_factory.mktemp("tiny")
    _tiny_hf(root / "hf")
    models_dir = root / "models"
    models_dir.mkdir()
    recipe_path = models_dir / "tiny.toml"
    recipe_path.write_text('default_quant = "int4"\naccuracy_level = 0\n[source]\nhf_dir = "../hf"\n')
    recipe = Recipe.load(recipe_path)
    return {q: build_model(recipe, q, models_dir, root / "cache", lambda _: None) for q in ("fp32", "int8", "int4")}


@pytest.fixture(scope="session")
def tiny(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["fp32"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of the test's own on a free loopback port (test_daemon shares one per module)."""
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def smollm2_dirs() -> dict[str, Path]:
    """The real SmolLM2 builds (default int4 and fp32 reference), from the build cache after the first run."""
    models_dir = default_models_dir()
    recipe = Recipe.load(models_dir / f"{SMOLLM2}.toml")
    return {q: build_model(recipe, q, models_dir, default_cache_dir(), print) for q in ("int4", "fp32")}
