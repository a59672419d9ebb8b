"""The inference backends bench-cpu times, each built from the same deployable checkpoint: eager PyTorch, its
torch.compile, dynamic int8, and ONNX Runtime on the fp32 graph, its fused graph and int8 of that. The ONNX graphs
come from the run's export stage when it exported this very model (`export/<name>/onnx*/`), and are otherwise built
by the same code (deploy/onnx_models.py): bench-cpu never has an ONNX path of its own."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from distilbert_cli import artifacts
from distilbert_cli.deploy import onnx_models
from distilbert_cli.models.loading import count_parameters, load_model
from distilbert_cli.models.run_models import ModelChoice
from distilbert_cli.rundir import Run

if TYPE_CHECKING:
    from distilbert_cli.schema import BenchCpu

ONNX_BACKENDS = (onnx_models.FP32, onnx_models.OPTIMIZED, onnx_models.INT8)  # the export stage's folder names
BACKENDS = ("eager", "compile", "int8", *ONNX_BACKENDS)
# Packages a backend needs beyond torch; a missing one skips the backend with a note.
BACKEND_PACKAGES = {name: ("onnx", "onnxruntime", "onnxscript") for name in ONNX_BACKENDS}


@dataclass
class Backend:
    """A built backend: `prepare` turns a numpy batch into its inputs (untimed); `predict` is what is timed."""

    prepare: Callable[[dict[str, np.ndarray]], object]
    predict: Callable[[object], np.ndarray]
    size_bytes: int  # the deployable artifact on disk
    artifact: str


@dataclass
class Deployable:
    """The checkpoint every backend of one model starts from, and its ONNX graphs (the export stage's, or built
    into `onnx_root` when first asked for)."""

    checkpoint: Path
    onnx_root: Path
    exported: bool  # the export stage's copy of this model
    input_names: tuple[str, ...]
    graphs: dict[str, tuple[Path, str]] = field(default_factory=dict)  # ONNX backend -> (graph, how it was made)


def load_regressor(source: str, trust_remote_code: bool, role: str):
    """The encoder with a fresh 1-output regression head (as fine-tuned for STS-B; a checkpoint fine-tuned on
    another task loses its head), fp32, SDPA attention."""
    from transformers import AutoModelForSequenceClassification

    return load_model(AutoModelForSequenceClassification, source, trust_remote_code=trust_remote_code, role=role,
                      num_labels=1, problem_type="regression", attn_implementation="sdpa",
                      dtype=torch.float32, ignore_mismatched_sizes=True).eval()


def load_deployed(checkpoint: Path, trust_remote_code: bool, attn_implementation: str = "sdpa"):
    """The deployable checkpoint as saved, head included."""
    from transformers import AutoModelForSequenceClassification

    return load_model(AutoModelForSequenceClassification, str(checkpoint), trust_remote_code=trust_remote_code,
                      role="deployable checkpoint", attn_implementation=attn_implementation,
                      dtype=torch.float32).eval()


def exported_copy(run_dir: Run, choice: ModelChoice) -> dict | None:
    """What the run's export stage recorded of `choice` (same name and source, a sequence-classification head:
    what bench-cpu times), or None."""
    facts = artifacts.exported_models(run_dir).get(choice.name)
    if facts is None or facts["export_task"] != "text-classification":
        return None
    return facts if Path(facts["source"]).resolve() == Path(choice.source).resolve() else None


def deployable(choice: ModelChoice, tokenizer, cfg: BenchCpu, run_dir: Run, workdir: Path) -> tuple[Deployable, dict]:
    """The checkpoint every backend starts from, and the model's facts: the export stage's copy of this model (its
    own head) when there is one, else `choice` saved as deployed for STS-B (a fresh regression head)."""
    exported = exported_copy(run_dir, choice)
    if exported is not None:
        folder = artifacts.ExportedModel(run_dir.stage_dir(artifacts.EXPORT) / choice.name)
        model = load_deployed(folder.path, cfg.trust_remote_code)
        deployed = Deployable(folder.path, folder.path, True, tuple(exported["inputs"]),
                              {name: (folder.variant(name), exported["variants"][name]["how"])
                               for name in ONNX_BACKENDS if name in exported["variants"]})
        deployed_as = f"export/{choice.name} (its own {model.config.num_labels}-output head, as exported)"
    else:
        torch.manual_seed(cfg.seed)  # the regression head is freshly initialised: the same one every run
        model = load_regressor(choice.source, cfg.trust_remote_code, f"model {choice.name}")
        model.save_pretrained(workdir / "checkpoint")
        deployed = Deployable(workdir / "checkpoint", workdir / "onnx-graphs", False,
                              onnx_models.model_input_names(model, tokenizer))
        deployed_as = "the encoder with a fresh 1-output regression head (STS-B)"
    info = {"name": choice.name, "source": choice.source, "architecture": type(model).__name__,
            "num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "parameters": count_parameters(model), "attention": model.config._attn_implementation,
            "inputs": list(deployed.input_names), "deployed_as": deployed_as}
    return deployed, info


def missing_packages(backend: str) -> list[str]:
    return [name for name in BACKEND_PACKAGES.get(backend, ()) if importlib.util.find_spec(name) is None]


def _torch_backend(model, size_bytes: int, artifact: str) -> Backend:
    def prepare(batch):
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    def predict(inputs):
        with torch.inference_mode():
            return model(**inputs).logits.numpy()

    return Backend(prepare, predict, size_bytes, artifact)


def _onnx_backend(path: Path, threads: int, artifact: str) -> Backend:
    session = onnx_models.OnnxModel(path, threads)

    def predict(feed):
        return session.run(feed)["logits"]

    return Backend(session.feed, predict, path.stat().st_size, artifact)


def onnx_graph(name: str, deployed: Deployable, sample: dict[str, np.ndarray], cfg: BenchCpu) -> tuple[Path, str]:
    """The graph of ONNX backend `name` and how it was made: the export stage's, or built now (every ONNX backend
    asked for at once, once per model, eager attention as the export stage exports)."""
    if name not in deployed.graphs and not deployed.exported:
        wanted = [backend for backend in ONNX_BACKENDS if backend in cfg.bench.backends]
        model = load_deployed(deployed.checkpoint, cfg.trust_remote_code, attn_implementation="eager")
        graphs = onnx_models.build_variants(model, sample, deployed.onnx_root, wanted, per_channel=False)
        deployed.graphs.update({variant: (graph.path, graph.how) for variant, graph in graphs.items()})
    if name not in deployed.graphs:
        raise FileNotFoundError(f"the export stage has no {name} graph of this model")
    return deployed.graphs[name]


def build_backend(name: str, deployed: Deployable, sample: dict[str, np.ndarray], workdir: Path, threads: int,
                  cfg: BenchCpu) -> Backend:
    """Build one backend from the deployable checkpoint (torch.compile compiles lazily, at the first batch)."""
    trust, checkpoint = cfg.trust_remote_code, deployed.checkpoint
    weights = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))
    if name == "eager":
        return _torch_backend(load_deployed(checkpoint, trust), weights, "safetensors fp32")
    if name == "compile":
        model = torch.compile(load_deployed(checkpoint, trust), backend=cfg.bench.compile_backend, dynamic=True)
        return _torch_backend(model, weights, f"safetensors fp32, torch.compile({cfg.bench.compile_backend})")
    if name == "int8":
        model = torch.ao.quantization.quantize_dynamic(load_deployed(checkpoint, trust), {torch.nn.Linear},
                                                       dtype=torch.qint8)
        path = workdir / "int8.pt"
        torch.save(model.state_dict(), path)
        return _torch_backend(model, path.stat().st_size, "torch state_dict, int8 Linear weights")
    path, how = onnx_graph(name, deployed, sample, cfg)
    return _onnx_backend(path, threads, f"ONNX Runtime: {how}" + (" (export stage)" if deployed.exported else ""))
