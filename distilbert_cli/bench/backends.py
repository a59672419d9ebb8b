"""The inference backends bench-cpu times, each built from the same deployable checkpoint: eager PyTorch, its
torch.compile, dynamic int8, and ONNX Runtime fp32 / int8."""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from distilbert_cli.bench.workload import make_batches
from distilbert_cli.models.loading import count_parameters, load_model
from distilbert_cli.models.run_models import ModelChoice

BACKENDS = ("eager", "compile", "int8", "onnx", "onnx_int8")
# Packages a backend needs beyond torch; a missing one skips the backend with a note.
BACKEND_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "onnx_int8": ("onnx", "onnxruntime")}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Backend:
    """A built backend: `prepare` turns a numpy batch into its inputs (untimed); `predict` is what is timed."""

    prepare: Callable[[dict[str, np.ndarray]], object]
    predict: Callable[[object], np.ndarray]
    size_bytes: int  # the deployable artifact on disk
    artifact: str



def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def load_regressor(source: str, trust_remote_code: bool, role: str):
    """The encoder with a fresh 1-output regression head (as fine-tuned for STS-B; a checkpoint fine-tuned on
    another task loses its head), fp32, SDPA attention."""
    from transformers import AutoModelForSequenceClassification

    return load_model(AutoModelForSequenceClassification, source, trust_remote_code=trust_remote_code, role=role,
                      num_labels=1, problem_type="regression", attn_implementation="sdpa",
                      dtype=torch.float32, ignore_mismatched_sizes=True).eval()


def save_deployable(choice: ModelChoice, tokenizer, cfg: DictConfig, out_dir: Path) -> tuple[dict, tuple[str, ...]]:
    """Save `choice` as deployed for STS-B to `out_dir`: every backend starts from these exact weights."""
    torch.manual_seed(cfg.seed)  # the regression head is freshly initialised: the same one every run
    model = load_regressor(choice.source, cfg.trust_remote_code, f"model {choice.name}")
    accepted = inspect.signature(model.forward).parameters
    input_names = tuple(name for name in INPUT_NAMES if name in accepted and name in tokenizer.model_input_names)
    model.save_pretrained(out_dir)
    info = {"name": choice.name, "source": choice.source, "architecture": type(model).__name__,
            "num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "parameters": count_parameters(model), "attention": model.config._attn_implementation,
            "inputs": list(input_names)}
    return info, input_names


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


def _onnx_backend(path: Path, threads: int, artifact: str) -> Backend:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # The exporter drops an input the graph never reads (DeBERTa-v3's token_type_ids: it has no token types).
    graph_inputs = [graph_input.name for graph_input in session.get_inputs()]

    def prepare(batch):
        return {name: batch[name] for name in graph_inputs}

    def predict(inputs):
        return session.run(["logits"], inputs)[0]

    return Backend(prepare, predict, path.stat().st_size, artifact)


def build_backend(name: str, checkpoint: Path, input_names: Sequence[str], sample: dict[str, np.ndarray],
                  workdir: Path, threads: int, cfg: DictConfig) -> Backend:
    """Build one backend from the deployable checkpoint (torch.compile compiles lazily, at the first batch)."""
    trust = cfg.trust_remote_code
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
        return _onnx_backend(fp32_path, threads, "ONNX fp32")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = workdir / "onnx" / "model.int8.onnx"
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    return _onnx_backend(int8_path, threads, "ONNX, int8 MatMul weights")


