"""`distil export`: each model as a deployable folder, its ONNX variants checked against PyTorch on real task rows.

    distil export 'export.models=[sst2:runs/exp1/finetune/student/sst2/seed-56/model]' task.data_dir=path/to/glue
    distil export 'export.models=[student]' export.static_int8=true task=sst2 task.data_dir=path/to/glue_data

For each model, `<run_dir>/export/<name>/` gets the PyTorch copy (safetensors, config, tokenizer: it loads with
`from_pretrained` and `transformers.pipeline`), `onnx/`, `onnx_optimized/`, `onnx_int8/` (and `onnx_int8_static/`)
built by `deploy/onnx_models.py` (the path bench-cpu uses too), and `parity.json`: every variant against PyTorch on
the dev rows of the task the model was fine-tuned on, through the task's own encoding and metric; a variant more
than `export.max_metric_drop` points below PyTorch is `not_recommended`. The manifest's `models` records each
model's source, tasks and variants, which bench-cpu (it times these variants instead of exporting again) and
`distil publish` read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distilbert_cli import artifacts
from distilbert_cli.deploy import onnx_models, parity
from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import max_sequence_length
from distilbert_cli.models.loading import count_parameters, load_config, load_model, load_tokenizer
from distilbert_cli.models.run_models import ModelChoice, resolve_models
from distilbert_cli.rundir import Run, write_json_atomic
from distilbert_cli.schema import Export
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """One model to export, checked before any work."""

    choice: ModelChoice
    export_task: str
    data_task: Task
    label_names: tuple[str, ...] | None


def plan(choice: ModelChoice, cfg: Export) -> Plan:
    """The export task (the head, or export.task), the task whose rows check it, and that they fit the model."""
    config = load_config(choice.source, cfg.trust_remote_code, role=f"model {choice.name}")
    head = parity.head_task(config)
    export_task = head if cfg.export.task == "auto" else cfg.export.task
    if export_task != head and export_task != "feature-extraction":
        raise UsageError(f"model {choice.name} has a {head} head ({config.architectures}); export.task="
                         f"{export_task} would export a head it never trained (export.task=auto exports its own)")
    # finetune records the task a model was fine-tuned on; task.names names it for any other model.
    recorded = getattr(config, "finetuning_task", None) if export_task in parity.SCORED else None
    data_task = get_task(recorded or cfg.task.names[0])
    label_names = None
    if export_task in parity.SCORED:
        parity.check_task_fits(export_task, data_task)
        try:
            label_names = data_task.model_label_names(config)
        except UsageError as exc:
            raise UsageError(f"model {choice.name} does not fit {data_task.title}: {exc}") from None
    length, setting = data_task.input_length(cfg.task)
    if (longest := max_sequence_length(config)) is not None and length > longest:
        raise UsageError(f"{setting}={length} exceeds the {longest} tokens model {choice.name} takes")
    data_task.check_files(cfg.task, data_task.dev_splits[:1] + (("train",) if cfg.export.static_int8 else ()))
    return Plan(choice, export_task, data_task, label_names)


def dev_rows(plan: Plan, tokenizer, input_names: Sequence[str], cfg: Export) -> parity.DevRows:
    """The first dev split's first `export.parity_samples` rows, encoded as the task encodes them."""
    task, split = plan.data_task, plan.data_task.dev_splits[0]
    examples = task.load(cfg.task, (split,), plan.label_names).splits[split]
    if cfg.export.parity_samples is not None and cfg.export.parity_samples < len(examples):
        examples = examples.select(range(cfg.export.parity_samples))
    if len(examples) == 0:
        raise UsageError(f"{task.title} {split} has no rows to check the export on")
    features = task.encode(examples, tokenizer, cfg.task, "token_type_ids" in input_names, training=False)
    batches = parity.batches_of(features, input_names, tokenizer.pad_token_id, cfg.export.batch_size)
    return parity.DevRows(task, split, examples, features, batches)


def calibration_batches(plan: Plan, tokenizer, input_names: Sequence[str], cfg: Export) -> list:
    """The first `export.calibration_samples` training rows, for static int8."""
    task = plan.data_task
    rows = task.load(cfg.task, ("train",), plan.label_names).splits["train"]
    rows = rows.select(range(min(cfg.export.calibration_samples, len(rows))))
    features = task.encode(rows, tokenizer, cfg.task, "token_type_ids" in input_names, training=False)
    return parity.batches_of(features, input_names, tokenizer.pad_token_id, cfg.export.batch_size)


def export_model(plan: Plan, cfg: Export, out: artifacts.ExportedModel) -> dict:
    """Save the PyTorch copy, build the ONNX variants, check them; returns what the manifest records."""
    import transformers

    name, source = plan.choice.name, plan.choice.source
    tokenizer = load_tokenizer(source, cfg.trust_remote_code, role=f"model {name} tokenizer")
    # Eager attention: the plain MatMul-Softmax graph that ONNX Runtime's fusions look for (DeBERTa has no other).
    model = load_model(getattr(transformers, parity.AUTO_CLASSES[plan.export_task]), source, cfg.trust_remote_code,
                       role=f"model {name}", attn_implementation="eager", dtype=torch.float32).eval()
    model.save_pretrained(out.path)
    tokenizer.save_pretrained(out.path)
    input_names = onnx_models.model_input_names(model, tokenizer)
    rows = dev_rows(plan, tokenizer, input_names, cfg)
    sample = onnx_models.export_sample(rows.features.select_columns(list(input_names)).to_list(), input_names,
                                       tokenizer.pad_token_id)
    variants = [onnx_models.FP32, onnx_models.OPTIMIZED, onnx_models.INT8]
    calibration = None
    if cfg.export.static_int8:
        variants.append(onnx_models.INT8_STATIC)
        calibration = calibration_batches(plan, tokenizer, input_names, cfg)
    log.info("%s: exporting %s (%s) to ONNX: %s", name, type(model).__name__, plan.export_task, ", ".join(variants))
    graphs = onnx_models.build_variants(model, sample, out.path, variants, cfg.export.per_channel, calibration)
    for graph in graphs.values():
        log.info("%s %s: %.1f MB, %s%s%s", name, graph.variant, graph.size_bytes / 2**20, graph.how,
                 f"; fused {graph.fused_ops}" if graph.fused_ops else "", f"; {graph.note}" if graph.note else "")

    reference = parity.run_all(parity.torch_runner(model), rows.batches, f"{name} pytorch")
    outputs = {variant: parity.run_all(onnx_models.OnnxModel(graph.path), rows.batches, f"{name} {variant}")
               for variant, graph in graphs.items()}
    checked = parity.parity(plan.export_task, rows, reference, outputs, cfg.task, cfg.export.max_metric_drop)
    write_json_atomic(out.parity, checked)
    for variant, entry in checked["variants"].items():
        metric = "" if entry["metric"] is None else (f", {checked['metric']} {entry['metric']:.2f} vs "
                                                     f"{checked['pytorch']['metric']:.2f}: {entry['status']}")
        log.info("%s %s vs PyTorch on %d %s %s rows: max abs diff %.2e, agreement %.2f (%s)%s", name, variant,
                 rows.size, rows.task.title, rows.split, entry["max_abs_diff"], entry["agreement"],
                 entry["agreement_kind"], metric)
    return {"source": source, "role": plan.choice.role, "stage": plan.choice.stage,
            "architecture": type(model).__name__, "parameters": count_parameters(model),
            "export_task": plan.export_task, "data_task": rows.task.name, "inputs": list(input_names),
            "variants": {variant: graph.as_json() for variant, graph in graphs.items()},
            "not_recommended": [v for v, entry in checked["variants"].items() if entry["status"] == "not_recommended"]}


def run(cfg: Export, overrides: Sequence[str] = ()) -> dict:
    """Export every model of `export.models`; return the manifest's `models`."""
    run_dir = Run.of(cfg)
    plans = [plan(choice, cfg) for choice in resolve_models(run_dir, cfg.export.models, "export.models")]
    with run_dir.open_stage(artifacts.EXPORT, cfg, overrides) as stage:
        for item in plans:
            if item.choice.stage is not None:
                stage.use_stage(item.choice.stage)
            stage.use_model(item.choice.source, f"model {item.choice.name}")
            for path in item.data_task.local_files(cfg.task, item.data_task.dev_splits[:1]).values():
                stage.use_path(path, "parity rows")
        models = {item.choice.name: export_model(item, cfg, artifacts.ExportedModel(stage.path / item.choice.name))
                  for item in plans}
        stage.update(models=models)
    return models
