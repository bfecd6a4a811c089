"""Shared fixtures: small random-initialised models of several architectures, saved with the
embedded tokenizer, so tests exercise real transformers models without any download."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# calibration statistics and quantized weights of test runs never land in ~/.cache/hpsearch
os.environ.setdefault("HPSEARCH_CACHE", tempfile.mkdtemp(prefix="hpsearch-test-cache-"))

REPO = Path(__file__).resolve().parent.parent


def refusal(run, argv: list[str], capsys) -> str:
    """What a bench's ``run(argv)`` printed when it refused its options (argparse's exit code 2)."""
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def small_config(arch: str, vocab_size: int):
    """A tiny config of a real architecture (GQA where the family has it)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=1, sliding_window=None, **common)
    if arch == "phi3":
        return Phi3Config(num_key_value_heads=4, pad_token_id=0, **common)
    raise ValueError(arch)


ARCHES = ("llama", "qwen2", "mistral", "phi3")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO / "hpsearch" / "zoo" / "embedded")


@pytest.fixture(scope="session")
def model_dir_factory(tmp_path_factory, tokenizer):
    """``make(arch)`` -> directory of a saved random model of that architecture."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(small_config(arch, len(tokenizer)))
            path = tmp_path_factory.mktemp(f"model-{arch}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir_factory) -> Path:
    return model_dir_factory("llama")
