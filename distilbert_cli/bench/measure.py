"""Measuring a model under every backend: warm-up, timed passes of pre-tokenized batches (only the predict call
inside the timed region), peak resident memory, and the output checks against eager fp32."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform
import re
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from distilbert_cli.bench.backends import Backend, build_backend, deployable, missing_packages
from distilbert_cli.bench.workload import Workload, encode, make_batches
from distilbert_cli.deploy.onnx_models import export_sample
from distilbert_cli.logs import is_main_process
from distilbert_cli.models.run_models import ModelChoice
from distilbert_cli.rundir import Run
from distilbert_cli.tasks.base import Task

if TYPE_CHECKING:
    from distilbert_cli.schema import BenchCpu, BenchSettings

log = logging.getLogger(__name__)

def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so that the next
    backend's peak RSS starts from the memory really in use."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-memory high-water mark (Linux); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The process's peak resident memory: since the last reset on Linux, since start elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    if match := re.search(r"VmHWM:\s+(\d+) kB", status):
        return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # macOS reports bytes, Linux kB


def predict_all(backend: Backend, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([backend.predict(backend.prepare(batch)) for batch in batches]).reshape(-1)


def time_batches(backend: Backend, batches: list[dict[str, np.ndarray]], repeats: int, progress) -> np.ndarray:
    """Seconds per batch, shape (repeats, batches): only the predict call is inside the timed region."""
    prepared = [backend.prepare(batch) for batch in batches]
    timings = np.empty((repeats, len(prepared)))
    gc.collect()
    gc.disable()  # as timeit does: a collection inside a timed call is noise, not the model
    try:
        for repeat in range(repeats):
            for index, inputs in enumerate(prepared):
                start = time.perf_counter()
                backend.predict(inputs)
                timings[repeat, index] = time.perf_counter() - start
                progress.update()
    finally:
        gc.enable()
    return timings


def summarize_timings(timings: np.ndarray, batch_examples: Sequence[int], full_examples: int) -> dict:
    """Latency statistics of a (repeats, batches) timing array; the full pass scaled to `full_examples`."""
    per_batch = np.median(timings, axis=0)
    timed_pass = float(np.median(timings.sum(axis=1)))
    timed_examples = int(sum(batch_examples))
    return {
        "latency_ms": {"median": 1e3 * float(np.median(per_batch)), "p90": 1e3 * float(np.percentile(per_batch, 90)),
                       "mean": 1e3 * float(per_batch.mean()), "min": 1e3 * float(per_batch.min())},
        "throughput_examples_per_s": timed_examples / timed_pass,
        "timed_examples": timed_examples,
        "timed_pass_s": timed_pass,
        "full_pass_s": timed_pass * full_examples / timed_examples,
        "full_pass": "measured" if timed_examples == full_examples else "extrapolated",
    }


def compare_outputs(predictions: np.ndarray, reference: np.ndarray) -> dict:
    """A backend's predictions vs eager fp32: absolute differences and rank agreement (Spearman, as STS-B)."""
    from scipy.stats import spearmanr

    diff = np.abs(predictions.astype(np.float64) - reference.astype(np.float64))
    constant = np.ptp(predictions) == 0 or np.ptp(reference) == 0
    return {"examples": int(reference.size), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "spearman": None if constant else float(spearmanr(predictions, reference)[0])}


def _skipped(model: str, backend: str, batch_sizes: Sequence[int], note: str) -> list[dict]:
    return [{"model": model, "backend": backend, "batch_size": size, "status": "skipped", "note": note}
            for size in batch_sizes]


def bench_model(choice: ModelChoice, tokenizer, cfg: BenchCpu, run_dir: Run, task: Task, workload: Workload,
                indices: np.ndarray, workdir: Path, threads: int) -> tuple[dict, list[dict], list[dict]]:
    """Time one model under every backend and batch size: (model facts, result rows, output checks)."""
    bench = cfg.bench
    deployed, info = deployable(choice, tokenizer, cfg, run_dir, workdir)
    examples = encode(task, tokenizer, workload, indices, deployed.input_names, cfg.task)
    info["mean_tokens"] = float(np.mean([len(example["input_ids"]) for example in examples]))
    pad_to = task.input_length(cfg.task)[0] if bench.padding == "max_length" else None
    check_batches = make_batches(examples[:bench.check_examples], 1, pad_to, tokenizer.pad_token_id)
    sample = export_sample(examples, deployed.input_names, tokenizer.pad_token_id)
    log.info("%s: %s, %d layers, %.1fM parameters, %.1f tokens per example on average", choice.name,
             info["architecture"], info["num_layers"], info["parameters"] / 1e6, info["mean_tokens"])

    rows, checks, reference = [], [], None
    # eager first: its predictions are the reference every other backend is checked against.
    for name in ["eager", *[b for b in bench.backends if b != "eager"]]:
        if missing := missing_packages(name):
            note = f"skipped: {', '.join(missing)} not installed (pip install 'distilbert_cli[onnx]')"
            log.warning("%s %s %s", choice.name, name, note)
            rows += _skipped(choice.name, name, bench.batch_sizes, note)
            continue
        try:
            start = time.perf_counter()
            backend = build_backend(name, deployed, sample, workdir, threads, cfg)
            predictions = predict_all(backend, check_batches)  # torch.compile compiles here
            build_s = time.perf_counter() - start
            if reference is None:
                reference = predictions
            else:
                checks.append({"model": choice.name, "backend": name, **compare_outputs(predictions, reference)})
            if name in bench.backends:
                rows += [measure(choice.name, name, backend, examples, size, pad_to, tokenizer.pad_token_id,
                                 len(workload), bench) | {"build_s": build_s} for size in bench.batch_sizes]
        except Exception as exc:  # an optional backend that fails to build or run is skipped, not fatal
            if name == "eager":
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            note = f"skipped: failed ({type(exc).__name__}: {first_line[:200]})"
            log.warning("%s %s %s", choice.name, name, note)
            rows += _skipped(choice.name, name, bench.batch_sizes, note)  # a backend's rows come all at once
        finally:
            backend = None
            if name == "compile":
                torch._dynamo.reset()  # drop the compiled graphs that hold the model
            release_memory()
    return info, rows, checks


def measure(model: str, backend_name: str, backend: Backend, examples: list[dict[str, np.ndarray]],
            batch_size: int, pad_to: int | None, pad_token_id: int, full_examples: int, bench: BenchSettings) -> dict:
    batches = make_batches(examples, batch_size, pad_to, pad_token_id)
    release_memory()
    reset_peak_rss()
    start = time.perf_counter()
    for batch in batches[:bench.warmup_batches]:
        backend.predict(backend.prepare(batch))
    warmup_s = time.perf_counter() - start
    with tqdm(total=bench.repeats * len(batches), desc=f"{model} {backend_name} batch {batch_size}", leave=False,
              disable=not is_main_process()) as progress:
        timings = time_batches(backend, batches, bench.repeats, progress)
    batch_examples = [len(batch["input_ids"]) for batch in batches]
    stats = summarize_timings(timings, batch_examples, full_examples)
    log.info("%s %s batch %d: median %.2f ms, p90 %.2f ms, %.1f examples/s, full pass %.1f s (%s)", model,
             backend_name, batch_size, stats["latency_ms"]["median"], stats["latency_ms"]["p90"],
             stats["throughput_examples_per_s"], stats["full_pass_s"], stats["full_pass"])
    return {"model": model, "backend": backend_name, "batch_size": batch_size, "status": "ok", "note": "",
            **stats, "size_on_disk_bytes": backend.size_bytes, "artifact": backend.artifact,
            "peak_rss_bytes": peak_rss_bytes(), "warmup_s": warmup_s,
            "timings": timings, "batch_examples": batch_examples, "full_examples": full_examples}


def pool_rounds(rows_by_round: list[list[dict]]) -> list[dict]:
    """One row per (model, backend, batch size): the timed passes of every round pooled, the statistics
    recomputed from them; peak RSS the highest of the rounds, build and warm-up times the first round's."""
    pooled: dict[tuple, dict] = {}
    for rows in rows_by_round:
        for row in rows:
            key = (row["model"], row["backend"], row["batch_size"])
            first = pooled.setdefault(key, row)
            if first is not row and first["status"] == "ok" and row["status"] == "ok":
                first["timings"] = np.concatenate([first["timings"], row["timings"]])
                first["peak_rss_bytes"] = max(first["peak_rss_bytes"], row["peak_rss_bytes"])
    for row in pooled.values():
        if row["status"] == "ok":
            timings, batch_examples, full_examples = row.pop("timings"), row.pop("batch_examples"), \
                row.pop("full_examples")
            row.update(summarize_timings(timings, batch_examples, full_examples), timed_passes=len(timings))
    return list(pooled.values())


