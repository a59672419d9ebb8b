"""bench-cpu: rounds in alternating order, backend outputs checked against eager, the results schema, skipped
backends, the workload, bad input (exit 2). No test here asserts on a measured time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import GLUE_DIR, build_tiny_bert, build_tiny_distilbert, open_stage
from datasets import Dataset
from typer.testing import CliRunner

from distilbert_cli.bench import backends, measure, workload
from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.deploy.onnx_models import export_sample
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import load_tokenizer
from distilbert_cli.models.run_models import ModelChoice
from distilbert_cli.rundir import Run, read_manifest
from distilbert_cli.stages import bench_cpu
from distilbert_cli.tasks import get_task

runner = CliRunner()
# One thread: on a busy 2-core machine two OpenMP threads wait on each other and swamp the timings.
QUICK = ["bench.num_threads=1", "bench.repeats=2", "bench.warmup_batches=2", "bench.check_examples=8",
         f"task.data_dir={GLUE_DIR}"]



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run dir whose init-student recorded a 2-layer BERT teacher and whose distill/final is a DistilBERT."""
    root = tmp_path_factory.mktemp("bench")
    teacher = build_tiny_bert(root / "teacher", num_layers=2)
    run_dir = root / "run"
    with open_stage(compose_config("init_student", [f"run_dir={run_dir}"]), "init-student") as stage:
        stage.update(teacher=str(teacher))
    with open_stage(compose_config("train", [f"run_dir={run_dir}"]), "distill") as stage:
        build_tiny_distilbert(stage.path / "final", teacher, num_layers=1)
    return run_dir


# ---- rounds: the models timed in alternating order, their passes pooled ----------------------------
# (No wall-clock assertion here: whether the harness times what it says, a deeper model measuring slower, is a
# figure for scripts/bench_cpu_table3.py to print; the timed region itself is checked with a fake clock in
# tests/bench/test_measure.py.)

def test_rounds_alternate_the_model_order_and_pool_their_passes(tmp_path, caplog):
    shallow = build_tiny_bert(tmp_path / "shallow", num_layers=1)
    deep = build_tiny_bert(tmp_path / "deep", num_layers=2)
    cfg = compose_config("bench_cpu", [f"run_dir={tmp_path / 'run'}", f"bench.models=[{deep},{shallow}]",
                                       "bench.backends=[eager]", "bench.max_examples=10", *QUICK,
                                       "bench.repeats=3", "bench.rounds=2"])
    with caplog.at_level("INFO", logger="distilbert_cli.bench.measure"):
        results = bench_cpu.run(cfg)
    timed_order = [r.getMessage().split(":")[0] for r in caplog.records if "tokens per example" in r.getMessage()]
    assert timed_order == ["deep", "shallow", "shallow", "deep"]
    assert [(row["model"], row["timed_passes"]) for row in results["results"]] == [("deep", 6), ("shallow", 6)]
    (ratio,) = results["summary"]["latency_ratios"]
    assert (ratio["reference"], ratio["model"]) == ("deep", "shallow")
    medians = {row["model"]: row["latency_ms"]["median"] for row in results["results"]}
    assert ratio["median_latency_ratio"] == pytest.approx(medians["deep"] / medians["shallow"])
    assert results["workload"]["timed_examples"] == 10 and results["workload"]["examples"] == 64


# ---- backends, outputs, schema --------------------------------------------------------------------

def test_run_teacher_and_student_every_backend_checked_against_eager(tiny_run):
    cfg = compose_config("bench_cpu", [f"run_dir={tiny_run}", "bench.backends=[eager,int8,onnx,onnx_int8]",
                                       "bench.batch_sizes=[1,3]", "bench.max_examples=12", *QUICK])
    threads = torch.get_num_threads()
    results = bench_cpu.run(cfg)
    assert torch.get_num_threads() == threads  # pinned for the benchmark only
    stage_dir = tiny_run / "bench-cpu"
    assert json.loads((stage_dir / "results.json").read_text()) == json.loads(json.dumps(results))

    assert set(results) == {"workload", "method", "machine", "versions", "models", "results", "checks", "summary",
                            "published"}
    assert results["workload"]["description"].startswith("STS-B dev, 64 pairs") and not results["workload"][
        "generated"]
    assert results["machine"]["threads"] == 1
    teacher, student = results["models"]
    assert (teacher["name"], teacher["architecture"], teacher["num_layers"]) == ("teacher",
                                                                                 "BertForSequenceClassification", 2)
    assert (student["name"], student["architecture"]) == ("student", "DistilBertForSequenceClassification")
    assert student["inputs"] == ["input_ids", "attention_mask"]  # DistilBERT takes no token_type_ids
    assert 0 < student["parameters"] < teacher["parameters"]

    rows = results["results"]
    assert len(rows) == 2 * 4 * 2 and all(row["status"] == "ok" for row in rows), [r["note"] for r in rows]
    for row in rows:
        assert row["timed_examples"] == 12 and row["full_pass"] == "extrapolated"
        assert row["full_pass_s"] == pytest.approx(row["timed_pass_s"] * 64 / 12)
        assert row["size_on_disk_bytes"] > 0
    sizes = {(r["model"], r["backend"]): r["size_on_disk_bytes"] for r in rows}
    assert sizes["teacher", "int8"] < sizes["teacher", "eager"]

    checks = {(c["model"], c["backend"]): c for c in results["checks"]}
    assert set(checks) == {(m, b) for m in ("teacher", "student") for b in ("int8", "onnx", "onnx_int8")}
    for model in ("teacher", "student"):
        assert checks[model, "onnx"]["max_abs_diff"] < 1e-5 and checks[model, "onnx"]["spearman"] > 0.99
        assert checks[model, "int8"]["max_abs_diff"] < 0.05 and checks[model, "onnx_int8"]["max_abs_diff"] < 0.05
    assert {(r["model"], r["batch_size"]) for r in results["summary"]["best_backends"]} == {
        (m, s) for m in ("teacher", "student") for s in (1, 3)}

    markdown = (stage_dir / "results.md").read_text()
    assert "| BERT-base | 110 | 668 |" in markdown and "| DistilBERT | 66 | 410 |" in markdown
    assert "published, other hardware" in markdown
    assert "Median latency ratio teacher/student (eager, batch 1)" in markdown
    # the published ratio (668 / 410) is stated once, not beside each measured pair
    assert markdown.count("Published full-pass ratio BERT-base/DistilBERT") == 1 and "): 1.63" in markdown
    assert (stage_dir / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "complete"
    assert {i.get("stage") or i["role"] for i in manifest["inputs"]} == {
        "init-student", "distill", "model teacher", "model student", "workload"}


def test_onnx_export_keeps_the_attention_mask_for_padded_batches(tmp_path):
    model_dir = build_tiny_bert(tmp_path / "model", num_layers=1)
    cfg = compose_config("bench_cpu", [*QUICK, "bench.backends=[eager,onnx,onnx_optimized,onnx_int8]"])
    tokenizer = load_tokenizer(str(model_dir))
    deployed, _ = backends.deployable(ModelChoice("m", str(model_dir), "other"), tokenizer, cfg, Run.of(cfg), tmp_path)
    texts = ["the city", "a small river", "the first book of the war", "music", "he was born in the city"]
    pairs = workload.Workload("test", False, Dataset.from_dict({"sentence1": texts, "sentence2": texts[::-1],
                                                                "label": [0.0] * 5}))
    examples = workload.encode(get_task("stsb"), tokenizer, pairs, np.arange(len(texts)), deployed.input_names,
                               cfg.task)
    sample = export_sample(examples, deployed.input_names, tokenizer.pad_token_id)
    assert sample["attention_mask"].tolist()[1].count(0) > 0
    built = {name: backends.build_backend(name, deployed, sample, tmp_path, 1, cfg)
             for name in ("eager", "onnx", "onnx_optimized", "onnx_int8")}
    assert set(deployed.graphs) == {"onnx", "onnx_optimized", "onnx_int8"}  # built once, all three
    eager = built.pop("eager")
    for batch in workload.make_batches(examples, 3, None, tokenizer.pad_token_id) + [sample]:
        expected = eager.predict(eager.prepare(batch))
        for name, backend in built.items():
            np.testing.assert_allclose(backend.predict(backend.prepare(batch)), expected,
                                       atol=2e-2 if name == "onnx_int8" else 1e-5)


def test_compile_backend_matches_eager(tmp_path):
    model_dir = build_tiny_bert(tmp_path / "model", num_layers=1)
    # The dynamo-only backend keeps the test quick; inductor is the default (and needs a C++ compiler).
    cfg = compose_config("bench_cpu", [f"run_dir={tmp_path / 'run'}", f"bench.models=[{model_dir}]",
                                       "bench.backends=[eager,compile]", "bench.compile_backend=eager",
                                       "bench.max_examples=6", *QUICK])
    results = bench_cpu.run(cfg)
    assert [row["status"] for row in results["results"]] == ["ok", "ok"]
    (check,) = results["checks"]
    assert check["backend"] == "compile" and check["max_abs_diff"] < 1e-5


def test_missing_package_and_failed_build_are_skipped_with_a_note(tmp_path, monkeypatch):
    model_dir = build_tiny_bert(tmp_path / "model", num_layers=1)
    monkeypatch.setattr(measure, "missing_packages", lambda backend: ["onnxruntime"] if "onnx" in backend else [])

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = compose_config("bench_cpu", [f"run_dir={tmp_path / 'run'}", f"bench.models=[{model_dir}]",
                                       "bench.backends=[eager,compile,onnx]", "bench.max_examples=4", *QUICK])
    results = bench_cpu.run(cfg)
    notes = {row["backend"]: (row["status"], row["note"]) for row in results["results"]}
    assert notes["eager"] == ("ok", "")
    assert notes["onnx"] == ("skipped", "skipped: onnxruntime not installed (pip install 'distilbert_cli[onnx]')")
    assert notes["compile"] == ("skipped", "skipped: failed (RuntimeError: no C++ compiler found)")
    assert results["checks"] == []
    markdown = (tmp_path / "run" / "bench-cpu" / "results.md").read_text()
    assert "## Skipped" in markdown and "model compile: skipped: failed" in markdown
    assert read_manifest(tmp_path / "run" / "bench-cpu")["status"] == "complete"


# ---- workload -------------------------------------------------------------------------------------

def test_workload_is_stsb_dev_or_a_labelled_generated_fallback():
    local = workload.load_workload(compose_config("bench_cpu", [f"task.data_dir={GLUE_DIR}"]))
    assert len(local) == 64 and not local.generated
    assert local.examples["sentence1"][0] == "A man with a hard hat is dancing."
    # HF_HUB_OFFLINE=1 (conftest): the hub is unreachable, so the generated workload stands in.
    offline = workload.load_workload(compose_config("bench_cpu"))
    assert offline.generated and len(offline) == 1500 and offline.description.startswith("GENERATED")
    assert "STS-B dev unreachable on the hub" in offline.description
    assert offline.examples.to_dict() == workload.generated_workload(56, "x").examples.to_dict()  # seeded


def test_task_max_seq_length_changes_what_is_timed(tmp_path):
    """The workload goes through the task's encode: task.max_seq_length cuts every timed pair (there is no
    bench.max_seq_length of its own)."""
    model_dir = build_tiny_bert(tmp_path / "model", num_layers=1)
    tokenizer = load_tokenizer(str(model_dir))
    local = workload.load_workload(compose_config("bench_cpu", [f"task.data_dir={GLUE_DIR}"]))
    indices = workload.timed_indices(len(local), 8, 56)
    timed = {}
    for length in (12, 64):
        cfg = compose_config("bench_cpu", [f"run_dir={tmp_path / f'run-{length}'}", f"bench.models=[{model_dir}]",
                                           "bench.backends=[eager]", "bench.max_examples=8", *QUICK,
                                           f"task.max_seq_length={length}"])
        results = bench_cpu.run(cfg)
        # independently: the pairs tokenized with the tokenizer's own truncation at that length
        pairs = local.examples.select(indices)
        lengths = [len(ids) for ids in tokenizer(list(pairs["sentence1"]), list(pairs["sentence2"]), truncation=True,
                                                 max_length=length)["input_ids"]]
        assert results["models"][0]["mean_tokens"] == pytest.approx(np.mean(lengths))
        assert results["workload"]["max_seq_length"] == length
        assert f"inputs cut to {length} tokens" in results["workload"]["encoding"]
        timed[length] = results["models"][0]["mean_tokens"]
    assert timed[12] == 12 < timed[64]  # every STS-B pair is longer than 12 tokens
    with pytest.raises(Exception, match="unknown key|bench.max_seq_length"):
        compose_config("bench_cpu", ["bench.max_seq_length=64"])


def test_local_data_dir_without_stsb_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="STS-B dev file not found"):
        bench_cpu.run(compose_config("bench_cpu", [f"task.data_dir={tmp_path}", f"run_dir={tmp_path / 'run'}"]))


# ---- bad input: one line, exit 2 ------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["bench.models=[/no/such/model]"], "model directory does not exist: /no/such/model"),
    (["bench.models=[/tmp]", "bench.backends=[eager,tensorrt]"],
     "bench.backends.1='tensorrt': input should be 'eager', 'compile'"),
    (["bench.batch_sizes=[0]"], "bench.batch_sizes.0=0: input should be greater than or equal to 1"),
    (["bench.padding=none"], "bench.padding='none': input should be 'longest' or 'max_length'"),
    ([], "input stage init-student not found"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, overrides, message):
    result = runner.invoke(app, ["bench-cpu", f"run_dir={tmp_path / 'run'}", *overrides])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "bench-cpu").exists()  # nothing started
