"""ONNX copies of a PyTorch model: the one code path that builds them (`distil export` writes them, bench-cpu times
them, or builds them here when the run has no export of the model).

    onnx/model.onnx              fp32, batch and sequence axes dynamic (torch.onnx's dynamo exporter)
    onnx_optimized/model.onnx    ONNX Runtime's transformer fusions (Attention, EmbedLayerNormalization,
                                 SkipLayerNormalization, BiasGelu) for the families the optimizer supports
                                 (`Family.onnx_fusions`); the others unfused
    onnx_int8/model.onnx         dynamic int8 of the optimized graph (MatMul and attention weights; per channel as an
                                 option)
    onnx_int8_static/model.onnx  static int8 (QDQ) of the optimized graph, calibrated on task rows (an option)

optimum-onnx (the Hub's exporter) pins transformers below 5, so the export is torch.onnx's own: the dynamo exporter
(torch.export), whose graph matches PyTorch to float rounding. A model that torch.export cannot capture (the
BiLSTM packs each row's tokens to a data-dependent length) is exported by torch.onnx's TorchScript tracer instead,
and the variant says so.

ONNX Runtime's attention fusion matches the additive mask transformers 4 built, not transformers 5's (an indexed
boolean mask), so a family with fusions is exported with the transformers-4 mask built in front of the model
(`_AdditiveMask`), which transformers 5 passes through unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from distilbert_cli.models.families import find_family

log = logging.getLogger(__name__)

FP32, OPTIMIZED, INT8, INT8_STATIC = "onnx", "onnx_optimized", "onnx_int8", "onnx_int8_static"
VARIANTS = (FP32, OPTIMIZED, INT8, INT8_STATIC)
MODEL_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 18  # the dynamo exporter's default


@dataclass
class Graph:
    """One built variant: where it is and what was done to it."""

    variant: str
    path: Path
    size_bytes: int
    how: str  # in words: the exporter, the fusions, the quantisation
    fused_ops: dict[str, int] = field(default_factory=dict)  # fused operator -> count (onnx_optimized only)
    note: str = ""

    def as_json(self) -> dict:
        return {**asdict(self), "path": f"{self.variant}/{MODEL_FILE}"}  # inside the model folder


def variant_path(root: Path, variant: str) -> Path:
    return root / variant / MODEL_FILE


def model_input_names(model, tokenizer) -> tuple[str, ...]:
    """The inputs both the model's forward() and the tokenizer have (DistilBERT takes no token_type_ids)."""
    accepted = inspect.signature(model.forward).parameters
    return tuple(name for name in INPUT_NAMES if name in accepted and name in tokenizer.model_input_names)


def pad_batch(rows: Sequence[dict[str, Sequence[int]]], names: Sequence[str], pad_token_id: int,
              pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Rows of token ids as one int64 batch, padded to the longest row (or `pad_to`): input_ids with the pad token,
    every other input with 0."""
    width = pad_to or max(len(row["input_ids"]) for row in rows)
    batch = {}
    for name in names:
        batch[name] = np.full((len(rows), width), pad_token_id if name == "input_ids" else 0, dtype=np.int64)
        for i, row in enumerate(rows):
            batch[name][i, :len(row[name])] = row[name]
    return batch


def export_sample(rows: Sequence[dict[str, Sequence[int]]], names: Sequence[str], pad_token_id: int
                  ) -> dict[str, np.ndarray]:
    """The batch an export traces: the first row and a shorter copy of it, so that the batch holds padding (with a
    mask of all ones an exporter may drop the attention mask) and both axes vary."""
    first = {name: list(rows[0][name]) for name in names}
    short = {name: values[:max(2, len(values) // 2)] for name, values in first.items()}
    return pad_batch([first, short], names, pad_token_id)


def output_names(model, sample: dict[str, np.ndarray]) -> list[str]:
    """The outputs a model returns for `sample`, in order (logits; start_logits, end_logits; last_hidden_state...)."""
    with torch.no_grad():
        outputs = model(**{name: torch.from_numpy(array) for name, array in sample.items()})
    return [name for name, value in outputs.items() if isinstance(value, torch.Tensor)]


def export_fp32(model, sample: dict[str, np.ndarray], path: Path) -> str:
    """`model` (eval mode) as an fp32 ONNX graph at `path` taking the inputs of `sample`, batch and sequence axes
    dynamic; returns which exporter made it."""
    names = output_names(model, sample)
    inputs = {name: torch.from_numpy(array) for name, array in sample.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    family = find_family(model.config)
    fusable = family is not None and family.onnx_fusions is not None and "attention_mask" in inputs
    try:
        with _quiet():
            # The exporter's graph optimizer would merge the mask's two Unsqueeze nodes, which the attention
            # fusion's pattern needs: it is off, and only its constant folding runs, below (ONNX Runtime's shape
            # inference, which the fusions use, fails on an unfolded QA head's SplitToSequence).
            program = torch.onnx.export(_AdditiveMask(model) if fusable else model, (), kwargs=inputs,
                                        input_names=list(inputs), output_names=names,
                                        dynamic_shapes={name: {0: batch, 1: sequence} for name in inputs},
                                        dynamo=True, opset_version=OPSET, verbose=False, optimize=not fusable)
        if fusable:
            import onnxscript.optimizer

            onnxscript.optimizer.fold_constants(program.model)
            onnxscript.optimizer.remove_unused_nodes(program.model)
        program.save(str(path), external_data=False)
        return f"torch.onnx dynamo exporter, opset {OPSET}" + (", transformers-4 attention mask" if fusable else "")
    except torch.onnx.errors.OnnxExporterError as exc:
        reason = str(exc).split("## Exception summary")[-1].strip().splitlines()[0][:160]
        log.info("%s: torch.export cannot capture it (%s); tracing it with the TorchScript exporter", path, reason)
    with _quiet():
        torch.onnx.export(_NamedOutputs(model, list(inputs), names), tuple(inputs.values()), str(path),
                          input_names=list(inputs), output_names=names, opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "batch", 1: "sequence"} for name in inputs})
    return "torch.onnx TorchScript exporter, opset 17 (torch.export cannot capture this model)"


class _AdditiveMask(torch.nn.Module):
    """The model fed the additive 4-D attention mask as transformers 4 built it (expanded, inverted, the dtype's
    minimum where a token is padding): the subgraph ONNX Runtime's attention fusion recognises."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train(model.training)  # an exporter restores the wrapper's mode, and with it the model's, when done

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        batch, length = attention_mask.shape
        expanded = attention_mask.unsqueeze(1).unsqueeze(2).expand(batch, 1, length, length).to(torch.float32)
        inverted = 1.0 - expanded
        additive = torch.where(inverted.to(torch.bool), torch.tensor(torch.finfo(torch.float32).min), inverted)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=additive, **extra)


class _NamedOutputs(torch.nn.Module):
    """The TorchScript tracer feeds positional inputs and wants a tuple back: name them, keep the named outputs."""

    def __init__(self, model, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names
        self.train(model.training)  # the exporter restores the wrapper's mode, and with it the model's, when done

    def forward(self, *tensors):
        outputs = self.model(**dict(zip(self.input_names, tensors, strict=True)))
        return tuple(outputs[name] for name in self.output_names)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about every Python-level shape check, and the optimizer and the
    quantizers log each step to the root logger: what matters of it is returned and logged by the callers."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def optimize(source: Path, target: Path, config) -> tuple[str, dict[str, int], str]:
    """ONNX Runtime's transformer optimizer on a family it supports (how, fused ops, note); a copy otherwise."""
    family = find_family(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    if family is None or family.onnx_fusions is None:
        shutil.copyfile(source, target)
        kind = family.name if family is not None else config.model_type
        return ("unfused copy", {}, f"ONNX Runtime's transformer optimizer has no fusions for {kind} graphs: "
                "left unfused (ONNX Runtime still applies its generic graph optimizations when it loads it)")
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(family.onnx_fusions)
    # The 2-D mask itself, not the optimizer's default of one length per row (which is only right for masks
    # that are all ones followed by all zeros).
    options.use_raw_attention_mask(True)
    with _quiet():  # the head count and width from the config: the exported reshapes are dynamic
        optimized = optimize_model(str(source), model_type=family.onnx_fusions, optimization_options=options,
                                   num_heads=config.num_attention_heads, hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(target))
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    return f"onnxruntime transformer optimizer (model_type {family.onnx_fusions})", fused, ""


def quantize_dynamic_int8(source: Path, target: Path, per_channel: bool) -> str:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        # Fused contrib ops have no shape inference: their outputs are float (the optimizer keeps fp32).
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=per_channel,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return f"dynamic int8 (MatMul weights{', per channel' if per_channel else ''}; activations quantized at run time)"


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader protocol over fixed batches."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], names: Sequence[str]):
        self._batches = iter([{name: batch[name] for name in names} for batch in batches])

    def get_next(self):
        return next(self._batches, None)


def quantize_static_int8(source: Path, target: Path, per_channel: bool, batches: list[dict[str, np.ndarray]]) -> str:
    """Static int8 in the QDQ format, activation ranges calibrated (min-max) on `batches`."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    target.parent.mkdir(parents=True, exist_ok=True)
    names = OnnxModel(source, threads=1).input_names
    with _quiet():
        quantize_static(source, target, _Calibration(batches, names), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                        extra_options={"DefaultTensorType": TensorProto.FLOAT})
    rows = sum(len(batch["input_ids"]) for batch in batches)
    return f"static int8, QDQ (min-max ranges from {rows} calibration rows{', per channel' if per_channel else ''})"


def build_variants(model, sample: dict[str, np.ndarray], root: Path, variants: Sequence[str], per_channel: bool,
                   calibration: list[dict[str, np.ndarray]] | None = None) -> dict[str, Graph]:
    """Build `variants` of `model` (eval mode, fp32) under `root`/<variant>/model.onnx, each from the one before:
    fp32, then its optimized graph, then int8 of the optimized graph. `calibration`: batches for static int8."""
    built: dict[str, Graph] = {}

    def add(variant: str, how: str, fused: dict | None = None, note: str = "") -> None:
        path = variant_path(root, variant)
        built[variant] = Graph(variant, path, path.stat().st_size, how, fused or {}, note)

    fp32, optimized = variant_path(root, FP32), variant_path(root, OPTIMIZED)
    add(FP32, export_fp32(model, sample, fp32))
    if OPTIMIZED in variants or INT8 in variants or INT8_STATIC in variants:
        how, fused, note = optimize(fp32, optimized, model.config)
        add(OPTIMIZED, how, fused, note)
    if INT8 in variants:
        add(INT8, quantize_dynamic_int8(optimized, variant_path(root, INT8), per_channel))
    if INT8_STATIC in variants:
        if not calibration:
            raise ValueError("static int8 needs calibration batches")
        add(INT8_STATIC, quantize_static_int8(optimized, variant_path(root, INT8_STATIC), per_channel, calibration))
    return {variant: graph for variant, graph in built.items() if variant in variants}


class OnnxModel:
    """An ONNX Runtime CPU session: a numpy batch in, the graph's named outputs out."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the quantized graphs' unused-initializer notes are not ours
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # An exporter drops an input the graph never reads (DeBERTa-v3's token_type_ids: it has no token types).
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.output_names = [output.name for output in self.session.get_outputs()]

    def feed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: batch[name] for name in self.input_names}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feed), strict=True))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(self.feed(batch))


def graph_op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
