"""Text sources other than the embedded corpus, and seeded searches that reproduce."""

from __future__ import annotations

import json

import optuna
import pytest

from conftest import small_config
from hpsearch.errors import ConfigError
from hpsearch.space import SearchSpace
from hpsearch.structure import structure_from_config
from hpsearch.textdata import load_text, token_blocks


def test_txt_and_jsonl_sources(tmp_path, tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("def f(x):\n    return x + 1\n" * 200)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"print({i})"}) for i in range(300)))
    assert "return x + 1" in load_text(str(txt))
    assert load_text(str(jsonl)).startswith("print(0)\n\nprint(1)")
    blocks = token_blocks(tokenizer, str(txt), 32, max_tokens=128)
    assert blocks.shape == (4, 32)
    calib = token_blocks(tokenizer, str(txt), 32, n_blocks=3, seed=1)
    assert calib.shape == (3, 32)
    assert token_blocks(tokenizer, str(txt), 32, n_blocks=3, seed=1).equal(calib)


@pytest.mark.parametrize("source", ["/no/such/file.txt", "embedded:nope", "hf:only"])
def test_bad_sources_name_the_key(source):
    with pytest.raises(ConfigError) as err:
        load_text(source, "objectives.perplexity.source")
    assert str(err.value).startswith("objectives.perplexity.source") and "\n" not in str(err.value)


@pytest.mark.parametrize("sampler", [optuna.samplers.TPESampler, optuna.samplers.NSGAIISampler,
                                     optuna.samplers.RandomSampler, optuna.samplers.QMCSampler])
def test_seeded_search_reproduces(sampler):
    space = SearchSpace.from_config({"granularity": "layer_type", "layer": {
        "bits": {"choices": [2, 3, 4, 8, 16]}, "group_size": {"choices": [32, 128], "if": {"bits": [2, 3, 4, 8]}}}},
        structure_from_config(small_config("llama", 256)))

    def run():
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler(seed=7))
        seen = []
        for _ in range(14):
            trial = study.ask()
            params = space.suggest(trial)
            bits = [v for k, v in params.items() if k.startswith("bits.")]
            study.tell(trial, [sum(1 / b for b in bits), sum(bits)])
            seen.append(params)
        return seen

    assert run() == run()
