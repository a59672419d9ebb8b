"""`distil bench-cpu`: CPU inference time of the teacher and the student (the paper's Table 3), per backend.

    distil bench-cpu task.data_dir=path/to/glue_data run_dir=runs/exp1
    distil bench-cpu 'bench.backends=[eager,int8,onnx]' bench.max_examples=200 run_dir=runs/exp1
    distil bench-cpu 'bench.models=[bert-base-uncased,distilbert-base-uncased]' task.data_dir=path/to/glue_data

Each model is timed as deployed for STS-B: loaded (from any checkpoint, an MLM one included) as
AutoModelForSequenceClassification with one regression output, saved once as the deployable checkpoint
that every backend is built from. A model the run's export stage exported (same name and source, a
classification head) is timed as exported instead: its PyTorch copy, and its onnx, onnx_optimized and
onnx_int8 graphs, which bench-cpu does not build again. The workload is the task's dev pairs (STS-B dev:
1500), encoded once by the task before any timing (task.max_seq_length, task.truncation); a generated
workload replaces it, labelled so, when the hub is unreachable.
Latency is one forward pass of one pre-tokenized batch (`time.perf_counter` around the call only), after
warm-up, repeated `bench.repeats` times with the thread count pinned (and, with `bench.rounds`, the whole
measurement repeated with the models in alternating order, passes pooled). Writes `<run_dir>/bench-cpu/`:
`results.json`, `results.md` (Table 3 beside the published figures) and `latency.png`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from distilbert_cli import artifacts
from distilbert_cli.bench.backends import exported_copy
from distilbert_cli.bench.measure import bench_model, current_rss_bytes, pool_rounds, release_memory, reset_peak_rss
from distilbert_cli.bench.render import (
    PUBLISHED,
    PUBLISHED_SOURCE,
    backend_versions,
    machine_info,
    render_markdown,
    summarize,
    summary_lines,
    write_chart,
)
from distilbert_cli.bench.workload import load_workload, timed_indices
from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import max_sequence_length
from distilbert_cli.models.loading import load_config, load_tokenizer
from distilbert_cli.models.run_models import ModelChoice
from distilbert_cli.models.run_models import resolve_models as resolve_run_models
from distilbert_cli.rundir import Run, Stage, write_json_atomic
from distilbert_cli.schema import BenchCpu
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.base import SequenceClassificationTask

log = logging.getLogger(__name__)


def resolve_models(cfg: BenchCpu, run_dir: Run, task: SequenceClassificationTask) -> list[ModelChoice]:
    """`bench.models` entries as (name, source, role); the run's teacher and student need their complete stages."""
    choices = resolve_run_models(run_dir, cfg.bench.models, "bench.models")
    length, setting = task.input_length(cfg.task)
    for choice in choices:
        config = load_config(choice.source, cfg.trust_remote_code, role=f"model {choice.name}")
        if (longest := max_sequence_length(config)) is not None and length > longest:
            raise UsageError(f"{setting}={length} exceeds the {longest} tokens model {choice.name} takes")
    return choices


def check_measured(stage: Stage, choices: list[ModelChoice], rows: list[dict]) -> None:
    """Every model has at least one measurement, each a finite latency: a bench whose backends were all skipped or
    failed is failed, not complete with an empty table."""
    for choice in choices:
        own = [row for row in rows if row["model"] == choice.name]
        if not any(row["status"] == "ok" for row in own):
            notes = sorted({f"{row['backend']} {row['note']}" for row in own})
            raise stage.no_work(f"model {choice.name} has no measurement: {'; '.join(notes) or 'no backend ran'}")
    for row in rows:
        if row["status"] == "ok" and not (math.isfinite(row["latency_ms"]["median"]) and row["latency_ms"]["median"]
                                          > 0):
            raise stage.no_work(f"model {row['model']} {row['backend']} batch {row['batch_size']} measured a "
                                f"latency of {row['latency_ms']['median']} ms")


def run(cfg: BenchCpu, overrides: Sequence[str] = ()) -> dict:
    """Time every model under every backend and batch size; write results.{json,md} and latency.png."""
    task = get_task(cfg.task.names[0])
    if not isinstance(task, SequenceClassificationTask):
        raise UsageError(f"bench-cpu times sequence classification (the paper's STS-B); {task.name} is not")
    task.check_files(cfg.task, task.dev_splits[:1])
    run_dir = Run.of(cfg)
    choices = resolve_models(cfg, run_dir, task)
    bench = cfg.bench
    tokenizers = [load_tokenizer(choice.source, cfg.trust_remote_code, role=f"model {choice.name} tokenizer")
                  for choice in choices]

    with run_dir.open_stage(artifacts.BENCH_CPU, cfg, overrides) as stage:
        stage.expect(artifacts.RESULTS_JSON, artifacts.RESULTS_MD, "latency.png")
        for choice in choices:
            if choice.stage is not None:
                stage.use_stage(choice.stage)
            stage.use_model(choice.source, f"model {choice.name}")
        if any(exported_copy(run_dir, choice) for choice in choices):
            stage.use_stage(artifacts.EXPORT)  # its graphs are timed, not exported again
        workload = load_workload(cfg)
        for path in task.local_files(cfg.task, task.dev_splits[:1]).values():
            stage.use_path(path, "workload")
        indices = timed_indices(len(workload), bench.max_examples, cfg.seed)
        release_memory()
        baseline_rss = current_rss_bytes()
        rss_scope = ("VmHWM, reset before each warm-up: the process's peak while that backend ran, Python and "
                     "torch included" if reset_peak_rss() else "the process's peak since it started")
        default_threads = torch.get_num_threads()
        threads = bench.num_threads or default_threads
        torch.set_num_threads(threads)
        log.info("timing %s x %s, batch sizes %s, %d threads, %d of %d examples: %s", [c.name for c in choices],
                 list(bench.backends), list(bench.batch_sizes), threads, len(indices), len(workload),
                 workload.description)
        models, rows_by_round, checks = {}, [], []
        try:
            with tempfile.TemporaryDirectory(prefix="distil-bench-cpu-") as tmp:
                for round_number in range(bench.rounds):
                    # Alternate the order (A B, B A, ...): a slow drift of the machine's speed then weighs on
                    # every model alike instead of on whichever is timed last.
                    order = list(enumerate(zip(choices, tokenizers, strict=True)))
                    rows_by_round.append([])
                    for number, (choice, tokenizer) in order if round_number % 2 == 0 else reversed(order):
                        workdir = Path(tmp) / f"round-{round_number}-model-{number}"
                        workdir.mkdir()
                        info, model_rows, model_checks = bench_model(choice, tokenizer, cfg, run_dir, task,
                                                                     workload, indices, workdir, threads)
                        models.setdefault(number, info)
                        rows_by_round[-1] += model_rows
                        checks += model_checks if round_number == 0 else []
        finally:
            torch.set_num_threads(default_threads)
        models = [models[number] for number in sorted(models)]
        rows = pool_rounds(rows_by_round)
        check_measured(stage, choices, rows)

        sampled = len(indices) < len(workload)
        results = {
            "workload": {"description": workload.description, "generated": workload.generated,
                         "examples": len(workload), "timed_examples": int(len(indices)),
                         "sample": f"seeded random sample (seed {cfg.seed})" if sampled else "all",
                         "max_seq_length": task.input_length(cfg.task)[0], "padding": bench.padding,
                         "encoding": task.describe_settings(cfg.task)},
            "method": {"batch_sizes": list(bench.batch_sizes), "warmup_batches": bench.warmup_batches,
                       "repeats": bench.repeats, "rounds": bench.rounds, "check_examples": bench.check_examples,
                       "latency": "time.perf_counter around one forward pass of one pre-tokenized batch; "
                                  "per batch the median over the timed passes",
                       "full_pass": ("extrapolated: the timed pass scaled by examples / timed examples" if sampled
                                     else "measured: the median over passes of the summed batch latencies"),
                       "build": "building the backend (export, quantisation) plus its first pass over the "
                                "check examples, where torch.compile compiles",
                       "peak_rss": rss_scope, "rss_before_models_bytes": baseline_rss},
            "machine": machine_info(threads),
            "versions": backend_versions(),
            "models": models,
            "results": rows,
            "checks": checks,
            "summary": summarize(models, rows, list(bench.batch_sizes)),
            "published": {"source": PUBLISHED_SOURCE, "rows": list(PUBLISHED),
                          "full_pass_ratio": PUBLISHED[0]["full_pass_s"] / PUBLISHED[1]["full_pass_s"]},
        }
        write_json_atomic(stage.path / artifacts.RESULTS_JSON, results)
        (stage.path / artifacts.RESULTS_MD).write_text(render_markdown(results))
        write_chart(results, stage.path / "latency.png")
        stage.update(workload=workload.description, summary=results["summary"])
        for line in summary_lines(results):
            log.info(line)
    return results
