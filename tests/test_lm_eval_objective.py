"""The lm-eval objective: the offline stdlib_next_line task, scored on an in-memory model."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from hpsearch.objectives.base import EvalContext
from hpsearch.objectives.lm_eval_accuracy import LMEvalAccuracy, stdlib_next_line_docs
from hpsearch.zoo import load_files


def test_docs_are_deterministic_and_from_held_out_files():
    docs = stdlib_next_line_docs(n=20)
    assert docs == stdlib_next_line_docs(n=20)
    test_text = "\n".join(load_files("test").values())
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert 0 <= d["label"] < 4
        assert d["context"] + d["choices"][d["label"]] in "\n".join(
            ln for ln in test_text.splitlines() if ln.strip())  # the real continuation


def test_objective_scores_an_in_memory_model(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ctx = EvalContext(None, None, tok, torch.device("cpu"), {})
    value = LMEvalAccuracy(limit=8, batch_size=8, cache_dir=str(tmp_path)).evaluate(model, ctx)
    assert 0.0 <= value <= 1.0 and value * 8 == round(value * 8)
    assert ctx.attrs["lm_eval_acc_stdlib_next_line"] == value
    assert (tmp_path / "stdlib_next_line.jsonl").exists()
