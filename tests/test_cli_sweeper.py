"""The command line end to end, in subprocesses: a study, its resume, failures and NaNs,
constraints, launcher batches, W&B offline runs, the report; and one-line errors for bad input."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent


def hpsearch(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load(db: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def study(model_dir, db: Path, name: str, *overrides: str, experiment: str = "quickstart") -> list[str]:
    """Arguments of a short study of the tiny model without W&B, ending in ``-m``."""
    return [f"model.name_or_path={model_dir}", f"+experiment={experiment}", f"hydra.sweeper.storage=sqlite:///{db}",
            f"hydra.sweeper.study_name={name}", "logging.wandb=false", "objectives.perplexity.max_tokens=1024",
            *overrides, "-m"]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_model_dir):
    """One study of 6 trials with a memory budget, W&B offline; then the same command resumed to 8."""
    cwd = tmp_path_factory.mktemp("cli")
    db = cwd / "multirun" / "s.db"
    args = [f"model.name_or_path={tiny_model_dir}", "+experiment=quickstart", f"hydra.sweeper.storage=sqlite:///{db}",
            "hydra.sweeper.study_name=cli", "hydra/sweeper/sampler=random", "objectives.perplexity.max_tokens=2048",
            "constraints=['memory_gb<=0.00138']"]
    first = hpsearch([*args, "hydra.sweeper.n_trials=6", "-m"], cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = load(db, "cli").trials
    second = hpsearch([*args, "hydra.sweeper.n_trials=8", "-m"], cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    return cwd, db, after_first, first, second


def test_study_has_baselines_first_and_three_objectives(study_run):
    _, db, first_trials, _, _ = study_run
    assert len(first_trials) == 6 and all(t.state == TrialState.COMPLETE for t in first_trials)
    assert [t.user_attrs.get("baseline") for t in first_trials[:3]] == ["fp16", "w8", "w4"]
    study = load(db, "cli")
    assert study.metric_names == ["perplexity", "memory_gb", "latency_ms"]
    fp16, w8, w4 = first_trials[:3]
    assert fp16.values[1] > w8.values[1] > w4.values[1]  # memory falls with bits
    assert all(t.user_attrs["latency_source"] == "roofline:h100" for t in first_trials)


def test_resume_continues_the_study(study_run):
    _, db, first_trials, _, second = study_run
    trials = load(db, "cli").trials
    assert len(trials) == 8
    assert [t.params for t in trials[:6]] == [t.params for t in first_trials]
    assert sum("baseline" in t.user_attrs for t in trials) == 3  # baselines are not enqueued again
    assert "resuming study" in second.stderr + second.stdout


def test_constraints_recorded_and_front_feasible(study_run):
    _, db, _, _, _ = study_run
    study = load(db, "cli")
    for t in study.trials:
        (value,) = t.constraints.values()
        assert value == pytest.approx(t.values[1] - 0.00138)
    assert all(all(v <= 0 for v in t.constraints.values()) for t in study.best_trials)


def test_report_and_wandb_files(study_run):
    cwd, db, _, first, _ = study_run
    out = db.parent / "cli"
    for name in ("report.md", "pareto.csv", "trials.csv", "perplexity_vs_memory_gb.png", "perplexity_vs_latency_ms.png"):
        assert (out / name).stat().st_size > 0, name
    assert "Pareto front" in (out / "report.md").read_text()
    assert "optuna-dashboard sqlite:///" in first.stderr + first.stdout
    runs = glob.glob(str(cwd / "multirun" / "*" / "*" / "wandb" / "offline-run-*"))
    files = [glob.glob(os.path.join(r, "run-*.wandb")) for r in runs]
    assert len(runs) == 8 + 2  # one per trial, one pareto run per sweep
    assert all(files)
    manifests = glob.glob(str(cwd / "multirun" / "*" / "*" / "*" / "manifest.json"))
    assert len(manifests) == 8


def test_failures_and_nan_are_failed_trials_and_study_goes_on(tmp_path, tiny_model_dir):
    db = tmp_path / "f.db"
    result = hpsearch(study(
        tiny_model_dir, db, "faults", "hydra.sweeper.n_trials=10", "hydra/sweeper/sampler=random",
        "hydra.sweeper.baselines=false", "+stages.boom={_target_:faults.FailOnBits,bits:2}", "pipeline=[quantize,boom]",
        "+objectives.nan_probe={_target_:faults.NaNOnBits,bits:3}"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(db, "faults").trials
    assert len(trials) == 10
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the seeded random sampler proposes 2- and 3-bit layers within 10 trials"
    for t in trials:
        bits = {v for k, v in t.params.items() if k.startswith("bits.")}
        if 2 in bits:
            assert t.state == TrialState.FAIL and "refusing 2-bit layers" in t.user_attrs["fail_reason"]
        elif 3 in bits:
            assert t.state == TrialState.FAIL and "nan_probe is nan" in t.user_attrs["fail_reason"]
        else:
            assert t.state == TrialState.COMPLETE
    assert "## Failed trials" in (tmp_path / "faults" / "report.md").read_text()


def test_joblib_launcher_runs_batches(tmp_path, tiny_model_dir):
    db = tmp_path / "j.db"
    result = hpsearch(study(
        tiny_model_dir, db, "batches", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(db, "batches").trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert (result.stderr + result.stdout).lower().count("launching 2 jobs") == 2  # two batches of two
    assert len(glob.glob(str(tmp_path / "multirun" / "*" / "*" / "[0-3]" / "manifest.json"))) == 4


@pytest.mark.parametrize("override,key,allowed", [
    ("model.name_or_path=/nonexistent/model", "model.name_or_path", "local model directory"),
    ("model.name_or_path=no-such-org/no-such-model", "model.name_or_path", "cannot be reached"),
    ("search.layer.bits.choices=[4,5]", "search.layer.bits.choices", "2, 3, 4, 8, 16"),
    ("hydra/sweeper/sampler=annealing", "hydra/sweeper/sampler", "nsgaii"),
    ("constraints=['vram<=2']", "constraints[0]", "memory_gb"),
    ("pipeline=[quantize,prunez]", "pipeline[1]", "quantize"),
    ("stages.quantize.methodz=1", "stages.quantize", "methods"),
    ("model.dtype=float64", "model.dtype", "bfloat16"),
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials", ">= 1"),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, override, key, allowed):
    result = hpsearch(["+experiment=quickstart", override, "-m"], tmp_path, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("hpsearch: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert key in lines[0] and allowed in lines[0]
    assert not (tmp_path / "multirun").exists()  # nothing ran


def test_optuna_dashboard_serves_the_study(study_run):
    import io
    import json

    from optuna_dashboard import wsgi

    _, db, _, _, _ = study_run
    app = wsgi(f"sqlite:///{db}")
    status = {}

    def start_response(code, headers, exc_info=None):
        status["code"] = code

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "QUERY_STRING": "", "SERVER_NAME": "localhost",
               "SERVER_PORT": "8080", "wsgi.input": io.BytesIO(b""), "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO()}
    body = b"".join(app(environ, start_response))
    assert status["code"].startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in studies] == ["cli"]
    assert studies[0]["directions"] == ["minimize", "minimize", "minimize"]


def test_report_renders_again_for_any_storage(study_run, tmp_path, capsys):
    from hpsearch.report import main

    _, db, _, _, _ = study_run
    assert main(["--storage", f"sqlite:///{db}", "--study", "cli", "--out", str(tmp_path / "again")]) == 0
    text = (tmp_path / "again" / "report.md").read_text()
    study = load(db, "cli")
    assert f"## Pareto front ({len(study.best_trials)} trials)" in text
    rows = (tmp_path / "again" / "pareto.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(study.best_trials)
    assert "Pareto front of cli" in capsys.readouterr().out


def test_sensitivity_seeded_trials_come_first(tmp_path, tiny_model_dir):
    db = tmp_path / "m.db"
    result = hpsearch(study(
        tiny_model_dir, db, "seeded", "hydra.sweeper.n_trials=3", "hydra.sweeper.baselines=false",
        "hydra.sweeper.sensitivity_seeds=2", "calib.n_samples=8", "calib.seq_len=64",
        experiment="mixed_precision"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(db, "seeded").trials
    assert [t.user_attrs.get("seed") for t in trials[:2]] == ["sensitivity-0", "sensitivity-1"]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].values[1] < trials[1].values[1]  # spread over memory, smallest first


def test_report_compares_searched_families(tmp_path):
    from hpsearch.report import FEATURES, feature_wins

    study = optuna.create_study(directions=["minimize", "minimize"], storage=f"sqlite:///{tmp_path / 'f.db'}")
    dist = {"kv_k_bits": optuna.distributions.CategoricalDistribution([4, 16])}
    for k, ppl, mem in [(16, 10.0, 5.0), (16, 11.0, 4.0), (4, 10.0, 4.5), (4, 12.0, 4.2)]:
        study.add_trial(optuna.trial.create_trial(params={"kv_k_bits": k}, distributions=dist, values=[ppl, mem]))
    wins, n_with, n_without = feature_wins(study, FEATURES["a quantized KV cache"])
    assert (wins, n_with, n_without) == ([2], 2, 2)  # trial 3 is covered by trial 1 (11.0 at 4.0)
    assert feature_wins(study, FEATURES["sparsity"]) is None  # the study never used it


def test_export_rebuilds_a_trial_and_writes_it_loadable(study_run, tmp_path):
    """A trial of the study written out: a transformers checkpoint that reproduces the rebuilt model,
    the trial's manifest, and the packed layers, which dequantize to the checkpoint's weights."""
    import json

    from transformers import AutoModelForCausalLM

    from hpsearch.export import load_packed, main
    from hpsearch.kernels import PackedLinear, dequantize

    _, db, _, _, _ = study_run
    trial = load(db, "cli").trials[2]
    assert trial.user_attrs["baseline"] == "w4"
    out = tmp_path / "w4"
    assert main(["--storage", f"sqlite:///{db}", "--study", "cli", "--trial", "2", "--out", str(out), "--packed"]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["reload_check"]["equal"] and record["trial"] == 2 and record["stages"] == ["quantize", "kv_cache"]
    assert record["runtime_only"] == []  # the w4 baseline keeps a 16-bit KV cache
    # the rebuilt model is the evaluated one: the same per-layer record as the trial's manifest
    ours = json.loads((out / "manifest.json").read_text())["layers"]
    theirs = json.loads(Path(trial.user_attrs["manifest"]).read_text())["layers"]
    assert ours == theirs and all(r["bits"] == 4 for r in ours.values() if r["block"] >= 0)
    hf = AutoModelForCausalLM.from_pretrained(out)
    packed = load_packed(out, dtype=hf.dtype)
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert record["packed"]["packed_layers"] == len(layers) == sum(r["block"] >= 0 for r in ours.values())
    for name, layer in layers.items():
        weight = hf.get_submodule(name).weight
        torch.testing.assert_close(dequantize(layer.packed, weight.dtype), weight, rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 9, 2, 30, 17]])
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # and the checkpoint scores what the trial scored: its perplexity, with the study's own objective
    from omegaconf import OmegaConf

    from hpsearch.manifest import Manifest
    from hpsearch.models import load_model
    from hpsearch.objectives.base import EvalContext
    from hpsearch.structure import structure_of
    from hpsearch.trial import TrialSetup

    cfg = OmegaConf.load(record["config"])
    loaded = load_model(cfg.model)
    structure = structure_of(loaded.model)
    perplexity = next(o for o in TrialSetup(cfg, structure).objectives if o.name == "perplexity")
    ctx = EvalContext(structure, Manifest.for_structure("x", structure), loaded.tokenizer, loaded.device, {})
    assert perplexity.evaluate(hf.to(loaded.device, loaded.dtype), ctx) == pytest.approx(trial.values[0], rel=1e-9)


@pytest.mark.parametrize(("argv", "message"), [
    (["--study", "cli", "--trial", "2"], "--storage: needed without --config"),
    (["--storage", "DB", "--study", "cli", "--trial", "99"], "--trial: study 'cli' has no trial 99"),
    (["--storage", "DB", "--study", "nope", "--trial", "0"], "--study: no study 'nope'"),
    (["--config", "missing.yaml"], "--config: missing.yaml is not a file"),
])
def test_export_refuses_what_it_cannot_find_in_one_line(study_run, tmp_path, capsys, argv, message):
    from hpsearch.export import main

    _, db, _, _, _ = study_run
    argv = [f"sqlite:///{db}" if a == "DB" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpsearch.export: error: ") and message in err and "\n" not in err
