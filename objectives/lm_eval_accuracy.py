"""Accuracy on lm-eval tasks, measured on the in-memory compressed model.

lm-eval's ``HFLM`` wraps the trial's model object as it is (no save/reload), so what is scored is
exactly what the stages produced, quantized KV cache included. ``tasks`` may name any lm-eval
task (``hellaswag``, ``arc_easy``..., on a machine with the hub) and the offline task that ships
with the project:

``stdlib_next_line``
    multiple choice over the embedded corpus's held-out (test) files: given the 12 lines before
    it, pick the real next line of Python among it and 3 lines drawn from other held-out files.
    Built deterministically on first use (no download) and cached as JSONL.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from torch import nn

from hpsearch.errors import ConfigError
from hpsearch.objectives.base import EvalContext, Objective

__all__ = ["LMEvalAccuracy", "stdlib_next_line_docs", "LOCAL_TASKS"]


def stdlib_next_line_docs(n: int = 400, seed: int = 0, context_lines: int = 12) -> list[dict[str, Any]]:
    """The ``stdlib_next_line`` documents: context, 4 choices, index of the real next line."""
    from hpsearch.zoo import load_files

    files = load_files("test")
    lines_by_file = {p: [ln for ln in t.splitlines() if ln.strip()] for p, t in sorted(files.items())}
    pool = [ln for lines in lines_by_file.values() for ln in lines if len(ln.strip()) >= 12]
    rng = random.Random(seed)
    candidates = [(p, i) for p, lines in lines_by_file.items() for i in range(context_lines, len(lines))
                  if len(lines[i].strip()) >= 12]
    docs = []
    for p, i in rng.sample(candidates, min(n, len(candidates))):
        lines = lines_by_file[p]
        answer = lines[i]
        distractors = set()
        while len(distractors) < 3:
            line = rng.choice(pool)
            if line.strip() != answer.strip():
                distractors.add(line)
        choices = sorted(distractors) + [answer]
        rng.shuffle(choices)
        docs.append({"context": "\n".join(lines[i - context_lines:i]) + "\n", "choices": choices,
                     "label": choices.index(answer)})
    return docs


def _local_task(name: str, cache_dir: Path) -> dict[str, Any]:
    path = cache_dir / f"{name}.jsonl"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(d) for d in stdlib_next_line_docs()))
        os.replace(tmp, path)
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


LOCAL_TASKS = ("stdlib_next_line",)


class LMEvalAccuracy(Objective):
    """Mean accuracy over lm-eval tasks.

    Args:
        tasks: lm-eval task names (the offline ``stdlib_next_line`` or any task lm-eval knows).
        limit: documents per task (a cheap proxy for every trial; null for all).
        batch_size: lm-eval batch size.
        metric: the metric averaged over tasks (``acc`` or ``acc_norm``).
        num_fewshot: few-shot examples.
        cache_dir: where generated local task data is kept (default ``$HPSEARCH_CACHE`` or
            ``~/.cache/hpsearch``).
    """

    def __init__(self, *, name: str = "lm_eval_acc", direction: str = "maximize",
                 tasks: list[str] = ("stdlib_next_line",), limit: int | None = 200, batch_size: int = 16,
                 metric: str = "acc", num_fewshot: int = 0, cache_dir: str | None = None) -> None:
        super().__init__(name=name, direction=direction)
        if not tasks:
            raise ConfigError(f"objectives.{name}.tasks", "needs at least one lm-eval task, e.g. stdlib_next_line")
        self.tasks, self.limit, self.batch_size = list(tasks), limit, batch_size
        self.metric, self.num_fewshot = metric, num_fewshot
        root = Path(os.environ.get("HPSEARCH_CACHE", Path.home() / ".cache" / "hpsearch"))
        self.cache_dir = Path(cache_dir) if cache_dir else root / "lm_eval_tasks"

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        specs = [_local_task(t, self.cache_dir) if t in LOCAL_TASKS else t for t in self.tasks]
        lm = HFLM(pretrained=model, tokenizer=ctx.tokenizer, device=str(ctx.device), batch_size=self.batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=self.limit, num_fewshot=self.num_fewshot,
                                          log_samples=False, bootstrap_iters=0, verbosity="ERROR")
        scores = {}
        for task in self.tasks:
            entry = results["results"][task]
            key = next((k for k in entry if k.split(",")[0] == self.metric), None)
            if key is None:
                raise ConfigError(f"objectives.{self.name}.metric", f"{self.metric!r} not reported by {task}; reported: {', '.join(k.split(',')[0] for k in entry if ',' in k)}")
            scores[task] = float(entry[key])
            ctx.attrs[f"{self.name}_{task}"] = scores[task]
        return sum(scores.values()) / len(scores)
