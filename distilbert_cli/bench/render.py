"""bench-cpu's results: latency ratios and best backends, the markdown table (the paper's Table 3 beside our
rows), the latency chart, and the machine and versions they were measured on."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from distilbert_cli.bench.backends import BACKENDS
from distilbert_cli.rundir import package_versions

# The paper's Table 3: a full pass over STS-B dev at batch size 1, on the authors' CPU.
PUBLISHED_SOURCE = "Sanh et al. 2019, Table 3 (published, other hardware)"
PUBLISHED = ({"model": "BERT-base", "parameters_millions": 110, "full_pass_s": 668.0},
             {"model": "DistilBERT", "parameters_millions": 66, "full_pass_s": 410.0})



def summarize(models: list[dict], rows: list[dict], batch_sizes: Sequence[int]) -> dict:
    """Latency ratios of every model against the first (same backend and batch size), and each model's
    fastest backend with its speed-up over eager fp32 (median latency)."""
    ok = {(row["model"], row["backend"], row["batch_size"]): row for row in rows if row["status"] == "ok"}
    reference = models[0]["name"]
    ratios, best = [], []
    for size in batch_sizes:
        for model in models[1:]:
            for backend in BACKENDS:
                if (reference, backend, size) in ok and (model["name"], backend, size) in ok:
                    ratios.append({"batch_size": size, "backend": backend, "reference": reference,
                                   "model": model["name"],
                                   "median_latency_ratio": ok[reference, backend, size]["latency_ms"]["median"]
                                   / ok[model["name"], backend, size]["latency_ms"]["median"]})
        for model in models:
            measured = [row for key, row in ok.items() if key[0] == model["name"] and key[2] == size]
            if (model["name"], "eager", size) in ok:
                eager = ok[model["name"], "eager", size]["latency_ms"]["median"]
                fastest = min(measured, key=lambda row: row["latency_ms"]["median"])
                best.append({"batch_size": size, "model": model["name"], "backend": fastest["backend"],
                             "median_ms": fastest["latency_ms"]["median"],
                             "speedup_over_eager": eager / fastest["latency_ms"]["median"]})
    return {"reference_model": reference, "latency_ratios": ratios, "best_backends": best}


def _mb(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:.1f}"


def summary_lines(results: dict) -> list[str]:
    """The headline figures, one sentence each (logged, and listed under Table 3)."""
    lines = [f"Median latency ratio {ratio['reference']}/{ratio['model']} ({ratio['backend']}, batch "
             f"{ratio['batch_size']}): {ratio['median_latency_ratio']:.2f}"
             for ratio in results["summary"]["latency_ratios"]]
    # Stated once, not beside every ratio: it compares a 12-layer BERT with its 6-layer DistilBERT, which says
    # nothing about, say, a BiLSTM student.
    lines.append(f"Published full-pass ratio BERT-base/DistilBERT (12 vs 6 layers, {results['published']['source']}): "
                 f"{results['published']['full_pass_ratio']:.2f}")
    lines += [f"Fastest backend for {best['model']} (batch {best['batch_size']}): {best['backend']}, "
              f"{best['median_ms']:.2f} ms median, {best['speedup_over_eager']:.2f}x eager fp32"
              for best in results["summary"]["best_backends"]]
    return lines


def render_markdown(results: dict) -> str:
    workload, method, machine = results["workload"], results["method"], results["machine"]
    ok = [row for row in results["results"] if row["status"] == "ok"]
    params = {model["name"]: model["parameters"] for model in results["models"]}
    lines = ["# CPU inference benchmark (the paper's Table 3)", ""]
    if workload["generated"]:
        lines += ["**The workload is generated, not the real dev set: compare these times with care.**", ""]
    lines += [f"- Workload: {workload['description']}; {workload['encoding']} (task.max_seq_length), padding "
              f"{workload['padding']}; encoded by the task before timing.",
              f"- Timed: {workload['timed_examples']} of {workload['examples']} examples ({workload['sample']}); "
              f"{method['warmup_batches']} warm-up batches, {method['repeats']} timed passes"
              + (f" in each of {method['rounds']} rounds (models in alternating order), pooled"
                 if method["rounds"] > 1 else "")
              + "; latency = one forward pass of one batch, median over passes per batch.",
              f"- Machine: {machine['cpu']}, threads pinned to {machine['threads']} (torch.set_num_threads; ONNX "
              f"Runtime intra-op) of {machine['usable_cpus']} usable CPUs; torch {results['versions']['torch']}, "
              f"onnxruntime {results['versions']['onnxruntime']}.", ""]

    lines += ["## Table 3: full pass at batch size 1", "",
              "| Model | # params (M) | Inference time (s) | Where |", "|---|---|---|---|"]
    for row in (row for row in ok if row["batch_size"] == 1):
        lines.append(f"| {row['model']}, {row['backend']} | {params[row['model']] / 1e6:.1f} | "
                     f"{row['full_pass_s']:.1f} ({row['full_pass']}) | this machine |")
    for row in results["published"]["rows"]:
        lines.append(f"| {row['model']} | {row['parameters_millions']} | {row['full_pass_s']:.0f} | "
                     f"{results['published']['source']} |")
    lines.append("")
    lines += [f"- {line}" for line in summary_lines(results)]

    lines += ["", "## All measurements", "",
              "| model | backend | batch | median ms | p90 ms | examples/s | full pass s | on disk MB | "
              "peak RSS MB | build s | warm-up s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ok:
        lines.append(f"| {row['model']} | {row['backend']} | {row['batch_size']} | {row['latency_ms']['median']:.2f} | "
                     f"{row['latency_ms']['p90']:.2f} | {row['throughput_examples_per_s']:.1f} | "
                     f"{row['full_pass_s']:.1f} | {_mb(row['size_on_disk_bytes'])} | {_mb(row['peak_rss_bytes'])} | "
                     f"{row['build_s']:.1f} | {row['warmup_s']:.1f} |")
    lines += ["", f"Peak RSS: {method['peak_rss']} (before any model was loaded: "
              f"{_mb(method['rss_before_models_bytes'])} MB). Build: {method['build']}. "
              f"Full pass: {method['full_pass']}.", ""]

    lines += ["## Output checks against eager fp32", "",
              "| model | backend | examples | max abs diff | mean abs diff | Spearman vs eager |",
              "|---|---|---|---|---|---|"]
    for check in results["checks"]:
        spearman = "n/a (constant)" if check["spearman"] is None else f"{check['spearman']:.4f}"
        lines.append(f"| {check['model']} | {check['backend']} | {check['examples']} | {check['max_abs_diff']:.2e} | "
                     f"{check['mean_abs_diff']:.2e} | {spearman} |")
    skipped = {(row["model"], row["backend"]): row["note"] for row in results["results"] if row["status"] != "ok"}
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {model} {backend}: {note}" for (model, backend), note in skipped.items()]
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path: Path) -> None:
    """Median latency by model and backend (bars; p90 as the error bar), one panel per batch size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [row for row in results["results"] if row["status"] == "ok"]
    sizes = results["method"]["batch_sizes"]
    models = [model["name"] for model in results["models"]]
    backends = [backend for backend in BACKENDS if any(row["backend"] == backend for row in ok)]
    figure = Figure(figsize=(2.0 + 1.6 * len(models) * max(len(backends), 1) / 2, 3.8 * len(sizes)))
    FigureCanvasAgg(figure)
    width = 0.8 / max(len(backends), 1)
    for panel, size in enumerate(sizes):
        axes = figure.add_subplot(len(sizes), 1, panel + 1)
        for offset, backend in enumerate(backends):
            found = {row["model"]: row for row in ok if row["backend"] == backend and row["batch_size"] == size}
            xs = [i + offset * width for i, model in enumerate(models) if model in found]
            medians = [found[model]["latency_ms"]["median"] for model in models if model in found]
            spread = [found[model]["latency_ms"]["p90"] - found[model]["latency_ms"]["median"]
                      for model in models if model in found]
            axes.bar(xs, medians, width, yerr=[[0] * len(spread), spread], capsize=3, label=backend)
        axes.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(models))], models)
        axes.set_ylabel("median latency (ms)")
        axes.set_title(f"batch size {size} (error bar: p90), {results['machine']['threads']} threads")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def machine_info(threads: int) -> dict:
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        cpu = platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "threads": threads,
            "torch_interop_threads": torch.get_num_interop_threads(),
            "quantized_engine": torch.backends.quantized.engine, "platform": platform.platform()}


def backend_versions() -> dict[str, str]:
    from importlib import metadata

    versions = package_versions()
    for name in ("onnx", "onnxruntime"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


