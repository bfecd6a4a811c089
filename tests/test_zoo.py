"""The model zoo: the shipped corpus, its splits, and the embedded default model."""

import itertools
import json
import lzma
import math

import pytest
import torch

from hpsearch.zoo import EMBEDDED_DIR, EMBEDDED_NAME, _corpus, corpus_sha256, load_files, load_split
from hpsearch.zoo.quality import rtn, unigram_perplexity
from hpsearch.zoo.train import batches, blocks, pack, perplexity

SPLITS = ("train", "valid", "test")


def test_corpus_hash_is_verified():
    assert corpus_sha256() == _corpus.CORPUS_SHA256


def test_tampered_corpus_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "corpus.json.xz"
    fake.write_bytes(lzma.compress(json.dumps({"format": _corpus.FORMAT, "files": []}).encode()))
    monkeypatch.setattr(_corpus, "CORPUS_PATH", fake)
    _corpus._payload.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="sha256"):
            corpus_sha256()
    finally:
        monkeypatch.undo()
        _corpus._payload.cache_clear()


def test_splits_are_disjoint_by_file_and_non_empty():
    files = {name: load_files(name) for name in SPLITS}
    for name, split in files.items():
        assert split and load_split(name)
        assert all(_corpus.split_of(path) == name for path in split)
    assert not set(files["train"]) & set(files["valid"])
    assert not set(files["train"]) & set(files["test"])
    assert not set(files["valid"]) & set(files["test"])
    assert load_split("test") == "\n\n".join(files["test"].values())


@pytest.mark.parametrize("name", ["validation", "TEST", ""])
def test_unknown_split_is_a_value_error(name):
    with pytest.raises(ValueError, match="train, valid, test"):
        load_split(name)


@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, local_files_only=True,
                                                 dtype=torch.float32)
    return tokenizer, model.eval()


def test_embedded_artifacts():
    assert EMBEDDED_NAME == "hpsearch/embedded-llama"
    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float16"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["intermediate_size"] % 128 == 0 and config["hidden_size"] % 128 == 0
    assert not config["tie_word_embeddings"]
    assert (EMBEDDED_DIR / "model.safetensors").stat().st_size < 15_000_000
    record = json.loads((EMBEDDED_DIR / "training.json").read_text())
    assert record["corpus_sha256"] == corpus_sha256()


def test_embedded_model_beats_unigram_on_held_out_text(embedded):
    tokenizer, model = embedded
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    test = blocks(pack(tokenizer, list(load_files("test").values())[:4]), 128)[:3]
    train_ids = pack(tokenizer, list(load_files("train").values())[:100])
    ppl = perplexity(model, test, 8, "cpu")
    unigram = unigram_perplexity(train_ids, test[:, 1:].flatten(), len(tokenizer))
    assert math.isfinite(ppl) and ppl < unigram / 3


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x ** 2  # square\r\n",
    "    if a != b:\n        raise ValueError(f'{a!r}')\n\n",
    "héllo wörld — 世界 🐍 \x00\x7f  trailing   ",
])
def test_tokenizer_round_trips(embedded, text):
    tokenizer, _ = embedded
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_batches_are_deterministic_and_cover_blocks():
    stream = torch.arange(1000)
    first, again, other = (
        torch.stack([b for _, b in itertools.islice(batches(stream, 16, 4, seed), 5)])
        for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first[..., 1:] - first[..., :-1] == 1).all()  # contiguous slices of the stream
    assert blocks(stream, 16, offset=8).shape == (62, 16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_uses_at_most_2_pow_bits_levels_per_group(bits):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    q = rtn(w, bits, 128)
    for group in q.reshape(8, 2, 128).flatten(0, 1):
        assert group.unique().numel() <= 2**bits
    scale = (w.reshape(8, 2, 128).amax(-1) - w.reshape(8, 2, 128).amin(-1)) / (2**bits - 1)
    assert ((q - w).abs().reshape(8, 2, 128) <= scale.unsqueeze(-1) / 2 + 1e-6).all()
