"""`distil bench-cpu`: CPU inference time of the teacher and the student (the paper's Table 3), per backend.

    distil bench-cpu glue.data_dir=path/to/glue_data run_dir=runs/exp1
    distil bench-cpu 'bench.backends=[eager,int8,onnx]' bench.max_examples=200 run_dir=runs/exp1
    distil bench-cpu 'bench.models=[bert-base-uncased,distilbert-base-uncased]' glue.data_dir=path/to/glue_data

Each model is timed as deployed for STS-B: loaded (from any checkpoint, an MLM one included) as
AutoModelForSequenceClassification with one regression output, saved once as the deployable checkpoint
that every backend is built from. The workload is the task's dev pairs (STS-B dev: 1500), tokenized
once before any timing; a generated workload replaces it, labelled so, when the hub is unreachable.
Latency is one forward pass of one pre-tokenized batch (`time.perf_counter` around the call only), after
warm-up, repeated `bench.repeats` times with the thread count pinned (and, with `bench.rounds`, the whole
measurement repeated with the models in alternating order, passes pooled). Writes `<run_dir>/bench-cpu/`:
`results.json`, `results.md` (Table 3 beside the published figures) and `latency.png`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.util
import inspect
import logging
import os
import platform
import re
import resource
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distilbert_cli import glue
from distilbert_cli.errors import UsageError
from distilbert_cli.logs import is_main_process
from distilbert_cli.models import load_config, load_model, load_tokenizer
from distilbert_cli.rundir import ModelChoice, open_stage, package_versions, write_json_atomic
from distilbert_cli.rundir import resolve_models as resolve_run_models

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "int8", "onnx", "onnx_int8")
# Packages a backend needs beyond torch; a missing one skips the backend with a note.
BACKEND_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "onnx_int8": ("onnx", "onnxruntime")}
PADDING = ("longest", "max_length")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")

# The paper's Table 3: a full pass over STS-B dev at batch size 1, on the authors' CPU.
PUBLISHED_SOURCE = "Sanh et al. 2019, Table 3 (published, other hardware)"
PUBLISHED = ({"model": "BERT-base", "parameters_millions": 110, "full_pass_s": 668.0},
             {"model": "DistilBERT", "parameters_millions": 66, "full_pass_s": 410.0})

# The fallback workload: as many pairs as STS-B dev, sentences of 4-18 common words (STS-B averages ~10).
GENERATED_PAIRS = 1500
GENERATED_WORDS = (
    "a man woman child dog cat people group city street car train house water food music game film book "
    "is are was were has have will can playing riding eating walking talking sitting running cutting "
    "the of and to in on with at for from by about after before over under near into this that some "
    "new old big small young red black white green two three many one other first last good great local "
    "said says told reports government police president market year day week time world country news"
).split()
GENERATED_LENGTHS = (4, 19)  # [low, high) words per sentence


@dataclass(frozen=True)
class Workload:
    description: str
    generated: bool
    texts: tuple[list[str], list[str] | None]  # first sentences, second sentences (None: single-sentence task)

    def __len__(self) -> int:
        return len(self.texts[0])


@dataclass
class Backend:
    """A built backend: `prepare` turns a numpy batch into its inputs (untimed); `predict` is what is timed."""

    prepare: Callable[[dict[str, np.ndarray]], object]
    predict: Callable[[object], np.ndarray]
    size_bytes: int  # the deployable artifact on disk
    artifact: str


# ---- validation and models ------------------------------------------------------------------------

def check_bench_config(cfg: DictConfig) -> None:
    bench = cfg.bench
    if unknown := [backend for backend in bench.backends if backend not in BACKENDS]:
        raise UsageError(f"unknown backend(s) {unknown} in bench.backends; choose from {', '.join(BACKENDS)}")
    if not bench.backends:
        raise UsageError(f"bench.backends is empty; choose from {', '.join(BACKENDS)}")
    if len(set(bench.backends)) != len(bench.backends):
        raise UsageError(f"bench.backends names a backend twice: {list(bench.backends)}")
    if not bench.batch_sizes or any(size <= 0 for size in bench.batch_sizes) or \
            len(set(bench.batch_sizes)) != len(bench.batch_sizes):
        raise UsageError(f"bench.batch_sizes must list distinct positive sizes, got {list(bench.batch_sizes)}")
    for key in ("max_seq_length", "repeats", "rounds", "check_examples"):
        if bench[key] <= 0:
            raise UsageError(f"bench.{key} must be positive, got {bench[key]}")
    if bench.warmup_batches < 0:
        raise UsageError(f"bench.warmup_batches must be 0 or more, got {bench.warmup_batches}")
    for key in ("num_threads", "max_examples"):
        if bench[key] is not None and bench[key] <= 0:
            raise UsageError(f"bench.{key} must be positive or null, got {bench[key]}")
    if bench.padding not in PADDING:
        raise UsageError(f"bench.padding must be one of {PADDING}, got {bench.padding!r}")
    if len(cfg.glue.tasks) != 1:
        raise UsageError(f"bench-cpu times one task's dev set; glue.tasks names {list(cfg.glue.tasks)} "
                         f"(use glue=stsb, the paper's workload)")


def resolve_models(cfg: DictConfig) -> list[ModelChoice]:
    """`bench.models` entries as (name, source, role); the run's teacher and student need their complete stages."""
    choices = resolve_run_models(cfg.run_dir, cfg.bench.models, "bench.models")
    for choice in choices:
        config = load_config(choice.source, cfg.bench.trust_remote_code, role=f"model {choice.name}")
        if cfg.bench.max_seq_length > config.max_position_embeddings:
            raise UsageError(f"bench.max_seq_length={cfg.bench.max_seq_length} exceeds model {choice.name}'s "
                             f"{config.max_position_embeddings} positions")
    return choices


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def load_regressor(source: str, trust_remote_code: bool, role: str):
    """The encoder with a fresh 1-output regression head (as fine-tuned for STS-B), fp32, SDPA attention."""
    from transformers import AutoModelForSequenceClassification

    return load_model(AutoModelForSequenceClassification, source, trust_remote_code=trust_remote_code, role=role,
                      num_labels=1, problem_type="regression", attn_implementation="sdpa",
                      dtype=torch.float32).eval()


def save_deployable(choice: ModelChoice, tokenizer, cfg: DictConfig, out_dir: Path) -> tuple[dict, tuple[str, ...]]:
    """Save `choice` as deployed for STS-B to `out_dir`: every backend starts from these exact weights."""
    torch.manual_seed(cfg.seed)  # the regression head is freshly initialised: the same one every run
    model = load_regressor(choice.source, cfg.bench.trust_remote_code, f"model {choice.name}")
    accepted = inspect.signature(model.forward).parameters
    input_names = tuple(name for name in INPUT_NAMES if name in accepted and name in tokenizer.model_input_names)
    model.save_pretrained(out_dir)
    info = {"name": choice.name, "source": choice.source, "architecture": type(model).__name__,
            "num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "parameters": count_parameters(model), "attention": model.config._attn_implementation,
            "inputs": list(input_names)}
    return info, input_names


# ---- workload -------------------------------------------------------------------------------------

def generated_workload(seed: int, reason: str) -> Workload:
    rng = np.random.default_rng(seed)

    def sentence() -> str:
        return " ".join(rng.choice(GENERATED_WORDS, size=rng.integers(*GENERATED_LENGTHS))).capitalize() + "."

    first, second = zip(*[(sentence(), sentence()) for _ in range(GENERATED_PAIRS)], strict=True)
    low, high = GENERATED_LENGTHS
    return Workload(f"GENERATED: {GENERATED_PAIRS} random pairs of {low}-{high - 1} common English words, not "
                    f"real sentences ({reason})", True, (list(first), list(second)))


def load_workload(cfg: DictConfig) -> Workload:
    """The task's first dev split; with glue.data_dir null and the hub unreachable, a labelled generated one."""
    task = glue.get_task(cfg.glue.tasks[0])
    split = task.dev_splits[0]
    try:
        dataset = glue.load_split(task.name, split, cfg.glue.data_dir)
    except UsageError as exc:
        if cfg.glue.data_dir is not None:
            raise  # a local directory the user named must be right
        log.warning("%s; timing a generated workload instead", exc)
        return generated_workload(cfg.seed, f"{task.title} {split} unreachable on the hub")
    where = f"local GLUE dir {cfg.glue.data_dir}" if cfg.glue.data_dir is not None else f"hub {glue.HUB_DATASET}"
    second = dataset["sentence2"] if task.is_pair else None
    return Workload(f"{task.title} {split}, {len(dataset)} {'pairs' if task.is_pair else 'sentences'} ({where})",
                    False, (dataset["sentence1"], second))


def timed_indices(size: int, max_examples: int | None, seed: int) -> np.ndarray:
    """Every example, or a seeded random sample (dev sets are ordered by source; a prefix would be biased)."""
    if max_examples is None or max_examples >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=max_examples, replace=False))


def encode(tokenizer, workload: Workload, indices: np.ndarray, input_names: Sequence[str],
           max_seq_length: int) -> list[dict[str, np.ndarray]]:
    """Each selected example tokenized once (truncated, unpadded), as int64 arrays."""
    first, second = workload.texts
    texts = ([first[i] for i in indices],) + (([second[i] for i in indices],) if second is not None else ())
    encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length, return_attention_mask=True,
                        return_token_type_ids="token_type_ids" in input_names)
    return [{name: np.asarray(encoded[name][row], dtype=np.int64) for name in input_names}
            for row in range(len(indices))]


def make_batches(examples: list[dict[str, np.ndarray]], batch_size: int, pad_to: int | None,
                 pad_token_id: int) -> list[dict[str, np.ndarray]]:
    """Consecutive examples padded to the batch's longest (`pad_to` None) or to `pad_to` tokens."""
    batches = []
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        width = pad_to or max(len(row["input_ids"]) for row in rows)
        batch = {}
        for name in rows[0]:
            fill = pad_token_id if name == "input_ids" else 0
            batch[name] = np.full((len(rows), width), fill, dtype=np.int64)
            for i, row in enumerate(rows):
                batch[name][i, :len(row[name])] = row[name]
        batches.append(batch)
    return batches


# ---- backends -------------------------------------------------------------------------------------

def missing_packages(backend: str) -> list[str]:
    return [name for name in BACKEND_PACKAGES.get(backend, ()) if importlib.util.find_spec(name) is None]


def _torch_backend(model, size_bytes: int, artifact: str) -> Backend:
    def prepare(batch):
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    def predict(inputs):
        with torch.inference_mode():
            return model(**inputs).logits.numpy()

    return Backend(prepare, predict, size_bytes, artifact)


class _PositionalLogits(torch.nn.Module):
    """ONNX export traces positional inputs: feed them by name and keep only the logits."""

    def __init__(self, model, input_names: Sequence[str]):
        super().__init__()
        self.model, self.input_names = model, tuple(input_names)

    def forward(self, *tensors):
        return self.model(**dict(zip(self.input_names, tensors, strict=True))).logits


def export_sample(example: dict[str, np.ndarray], pad_token_id: int) -> dict[str, np.ndarray]:
    """A batch of `example` and a shorter copy: with padding in the traced batch the exported graph keeps the
    attention mask (a mask of all ones can be traced away)."""
    short = {name: array[:max(2, len(array) // 2)] for name, array in example.items()}
    return make_batches([example, short], 2, None, pad_token_id)[0]


def export_onnx(checkpoint: Path, input_names: Sequence[str], sample: dict[str, np.ndarray], path: Path,
                trust_remote_code: bool) -> Path:
    """The deployable model as ONNX (opset 17), batch and sequence axes dynamic; reused once exported."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = load_regressor(str(checkpoint), trust_remote_code, "deployable checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about every Python-level shape check
        # The TorchScript exporter (dynamo=False) needs no onnxscript.
        torch.onnx.export(_PositionalLogits(model, input_names),
                          tuple(torch.from_numpy(sample[name]) for name in input_names), str(path),
                          input_names=list(input_names), output_names=["logits"], opset_version=17,
                          dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in input_names},
                                        "logits": {0: "batch"}}, dynamo=False)
    return path


def _onnx_backend(path: Path, input_names: Sequence[str], threads: int, artifact: str) -> Backend:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def prepare(batch):
        return {name: batch[name] for name in input_names}

    def predict(inputs):
        return session.run(["logits"], inputs)[0]

    return Backend(prepare, predict, path.stat().st_size, artifact)


def build_backend(name: str, checkpoint: Path, input_names: Sequence[str], sample: dict[str, np.ndarray],
                  workdir: Path, threads: int, cfg: DictConfig) -> Backend:
    """Build one backend from the deployable checkpoint (torch.compile compiles lazily, at the first batch)."""
    trust = cfg.bench.trust_remote_code
    weights = directory_size(checkpoint)
    if name == "eager":
        return _torch_backend(load_regressor(str(checkpoint), trust, "checkpoint"), weights, "safetensors fp32")
    if name == "compile":
        model = torch.compile(load_regressor(str(checkpoint), trust, "checkpoint"),
                              backend=cfg.bench.compile_backend, dynamic=True)
        return _torch_backend(model, weights, f"safetensors fp32, torch.compile({cfg.bench.compile_backend})")
    if name == "int8":
        model = torch.ao.quantization.quantize_dynamic(load_regressor(str(checkpoint), trust, "checkpoint"),
                                                       {torch.nn.Linear}, dtype=torch.qint8)
        path = workdir / "int8.pt"
        torch.save(model.state_dict(), path)
        return _torch_backend(model, path.stat().st_size, "torch state_dict, int8 Linear weights")
    fp32_path = export_onnx(checkpoint, input_names, sample, workdir / "onnx" / "model.onnx", trust)
    if name == "onnx":
        return _onnx_backend(fp32_path, input_names, threads, "ONNX fp32")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = workdir / "onnx" / "model.int8.onnx"
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    return _onnx_backend(int8_path, input_names, threads, "ONNX, int8 MatMul weights")


# ---- measuring ------------------------------------------------------------------------------------

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


def bench_model(choice: ModelChoice, tokenizer, cfg: DictConfig, workload: Workload, indices: np.ndarray,
                workdir: Path, threads: int) -> tuple[dict, list[dict], list[dict]]:
    """Time one model under every backend and batch size: (model facts, result rows, output checks)."""
    bench = cfg.bench
    checkpoint = workdir / "checkpoint"
    info, input_names = save_deployable(choice, tokenizer, cfg, checkpoint)
    examples = encode(tokenizer, workload, indices, input_names, bench.max_seq_length)
    info["mean_tokens"] = float(np.mean([len(example["input_ids"]) for example in examples]))
    pad_to = bench.max_seq_length if bench.padding == "max_length" else None
    check_batches = make_batches(examples[:bench.check_examples], 1, pad_to, tokenizer.pad_token_id)
    sample = export_sample(examples[0], tokenizer.pad_token_id)
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
            backend = build_backend(name, checkpoint, input_names, sample, workdir, threads, cfg)
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
            batch_size: int, pad_to: int | None, pad_token_id: int, full_examples: int, bench: DictConfig) -> dict:
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


# ---- reporting ------------------------------------------------------------------------------------

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
    published_ratio = results["published"]["full_pass_ratio"]
    lines = [f"Median latency ratio {ratio['reference']}/{ratio['model']} ({ratio['backend']}, batch "
             f"{ratio['batch_size']}): {ratio['median_latency_ratio']:.2f} (published full-pass ratio "
             f"BERT-base/DistilBERT: {published_ratio:.2f})" for ratio in results["summary"]["latency_ratios"]]
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
    lines += [f"- Workload: {workload['description']}; max_seq_length {workload['max_seq_length']}, padding "
              f"{workload['padding']}; tokenized before timing.",
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


# ---- the stage ------------------------------------------------------------------------------------

def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Time every model under every backend and batch size; write results.{json,md} and latency.png."""
    check_bench_config(cfg)
    task = glue.get_task(cfg.glue.tasks[0])
    if cfg.glue.data_dir is not None:
        glue.check_local_files([task], cfg.glue.data_dir, dev_only=True)
    choices = resolve_models(cfg)
    bench = cfg.bench
    tokenizers = [load_tokenizer(choice.source, bench.trust_remote_code, role=f"model {choice.name} tokenizer")
                  for choice in choices]

    with open_stage(cfg, "bench-cpu", overrides) as stage:
        for choice in choices:
            if choice.stage is not None:
                stage.use_stage(cfg.run_dir, choice.stage)
            stage.use_model(choice.source, f"model {choice.name}")
        workload = load_workload(cfg)
        if cfg.glue.data_dir is not None:
            stage.use_path(glue.tsv_path(task, task.dev_splits[0], cfg.glue.data_dir), "workload")
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
                        info, model_rows, model_checks = bench_model(choice, tokenizer, cfg, workload, indices,
                                                                     workdir, threads)
                        models.setdefault(number, info)
                        rows_by_round[-1] += model_rows
                        checks += model_checks if round_number == 0 else []
        finally:
            torch.set_num_threads(default_threads)
        models = [models[number] for number in sorted(models)]
        rows = pool_rounds(rows_by_round)

        sampled = len(indices) < len(workload)
        results = {
            "workload": {"description": workload.description, "generated": workload.generated,
                         "examples": len(workload), "timed_examples": int(len(indices)),
                         "sample": f"seeded random sample (seed {cfg.seed})" if sampled else "all",
                         "max_seq_length": bench.max_seq_length, "padding": bench.padding},
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
        write_json_atomic(stage.path / "results.json", results)
        (stage.path / "results.md").write_text(render_markdown(results))
        write_chart(results, stage.path / "latency.png")
        stage.update(workload=workload.description, summary=results["summary"])
        for line in summary_lines(results):
            log.info(line)
    return results
