"""The model card of an exported model (README.md in the Hub's format, built with huggingface_hub's ModelCard), and
its check. Every figure is read from the run's own files: the export stage (variants, parity.json), the stages the
model came from (init-student, distill, prepare-data, finetune or task-distill, evaluate) and bench-cpu. None is
typed in.

The model's origin is found from its path: a model inside a run directory (distill/final,
finetune/<model>/<task>/seed-<s>/model, task-distill/student/<task>/seed-<s>/model, init-student/model) belongs to
the stage whose manifest sits above it, and that run's stages tell how it was made. Its `model-index` holds its own
dev metrics (the metrics.json of its seed run, what the evaluation stage scores); `check_card` compares a written
card's model-index with those files again before anything is uploaded.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from distilbert_cli import artifacts
from distilbert_cli.artifacts import read_json
from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import MANIFEST, Run, read_manifest
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.base import Task
from distilbert_cli.tasks.glue import HUB_DATASET as GLUE_HUB
from distilbert_cli.tasks.glue import GlueTask

CITATION = """@article{sanh2019distilbert,
  title   = {DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter},
  author  = {Sanh, Victor and Debut, Lysandre and Chaumond, Julien and Wolf, Thomas},
  journal = {arXiv preprint arXiv:1910.01108},
  year    = {2019}
}"""
TANG_CITATION = """@article{tang2019distilling,
  title   = {Distilling Task-Specific Knowledge from BERT into Simple Neural Networks},
  author  = {Tang, Raphael and Lu, Yao and Liu, Linqing and Mou, Lili and Vechtomova, Olga and Lin, Jimmy},
  journal = {arXiv preprint arXiv:1903.12136},
  year    = {2019}
}"""


@dataclass
class Origin:
    """Where a model was made: its run directory, the stage that wrote it, and its seed run (fine-tuned models)."""

    run_dir: Path | None = None
    stage: str | None = None
    seed_run: artifacts.FinetuneRun | None = None
    manifests: dict[str, dict] = field(default_factory=dict)  # the run's complete stages


def origin(source: str) -> Origin:
    """The run and stage a model directory belongs to (the nearest stage manifest above it); empty for a model from
    outside any run."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return Origin()
    for parent in [path.resolve(), *path.resolve().parents]:
        manifest = read_manifest(parent) if (parent / MANIFEST).exists() else None
        if manifest is not None and manifest.get("stage") in artifacts.STAGES:
            run_dir = parent.parent
            seed_dir = path.resolve().parent
            seed_run = (artifacts.FinetuneRun(seed_dir) if seed_dir.name.startswith("seed-")
                        and artifacts.FinetuneRun(seed_dir).metrics.exists() else None)
            run = Run(run_dir)
            manifests = {stage: run.manifest(stage) for stage in artifacts.STAGES if run.complete(stage) is not None}
            return Origin(run_dir, manifest["stage"], seed_run, manifests)
    return Origin()


def dataset_of(task: Task, data_dir: str | None) -> tuple[str, str | None, str]:
    """(dataset id, config, name) of a task's data for the card: the hub dataset it came from, or, for local files,
    the task's name, which the dataset name says is local."""
    hub = GLUE_HUB if isinstance(task, GlueTask) else getattr(task, "hub_dataset", None)
    if data_dir is None and hub is not None:
        return hub, task.name if hub == GLUE_HUB else None, task.title
    return task.name, None, f"{task.title} (local files)"


@dataclass(frozen=True)
class Score:
    """One model-index entry."""

    task_type: str
    dataset_type: str
    dataset_config: str | None
    dataset_name: str
    dataset_split: str
    metric_type: str
    metric_value: float


def expected_scores(found: Origin, export_task: str) -> list[Score]:
    """The model's own dev metrics, from the metrics.json of the seed run it was saved by."""
    if found.seed_run is None:
        return []
    run = read_json(found.seed_run.metrics)
    manifest = found.manifests.get(found.stage, {})
    task = get_task(run["task"])
    dataset, config, name = dataset_of(task, manifest.get("config", {}).get("task", {}).get("data_dir"))
    return [Score(export_task, dataset, config, name, split, metric, round(float(run["metrics"][task.metric_key(split,
                  metric)]), 2)) for split in task.dev_splits for metric in task.metrics]


def _hours(manifest: dict) -> float:
    start, end = (datetime.fromisoformat(manifest[key]) for key in ("started_at", "ended_at"))
    return (end - start).total_seconds() / 3600


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows), ""]


def _making(found: Origin) -> list[str]:
    """Teacher, student shape and layer map, objective, data and budget, validation MLM: what the manifests say."""
    lines, manifests = [], found.manifests
    if (init := manifests.get(artifacts.INIT_STUDENT)) is not None:
        counts = init["param_counts"]
        lines += [f"- **Teacher**: `{init['teacher']}` ({counts['teacher'] / 1e6:.1f}M parameters).",
                  f"- **Student**: {init['student_class']} (`student.arch={init['student_arch']}`), "
                  f"{counts['student'] / 1e6:.1f}M parameters, initialised `{init['strategy']}` with teacher layers "
                  f"{init['layer_map']} (student layer i <- teacher layer map[i])."]
    if (distill := manifests.get(artifacts.DISTILL)) is not None:
        loss = distill["config"]["loss"]
        weights = ", ".join(f"{value:g} x L_{key.removeprefix('alpha_')}" for key, value in loss.items()
                            if key.startswith("alpha_") and value)
        budget, batch = distill["config"]["train"], distill["config"]["batch"]["global_batch_size"]
        lines += [f"- **Objective** (general distillation): {weights}; temperature {loss['temperature']:g}.",
                  f"- **Budget**: {distill.get('total_steps', '–')} steps of {batch} sequences, "
                  f"{distill.get('tokens_seen', 0):,} tokens seen, {distill.get('world_size', '–')} "
                  f"process(es), mixed precision `{budget['mixed_precision']}`, {_hours(distill):.2f} hours "
                  f"(manifest start to end; the manifests do not record the device)."]
        validation = read_json(artifacts.DistillOutputs(found.run_dir / artifacts.DISTILL).validation)
        def loss_and_accuracy(scores: dict) -> str:
            return f"{_fmt(scores['mlm_loss'], 3)} / {_fmt(100 * scores['mlm_accuracy'], 1)}%"

        scores = [f"{model} loss {loss_and_accuracy(validation[model])} (uniform masks: "
                  f"{loss_and_accuracy(validation[model]['uniform'])})"
                  for model in ("student", "teacher") if validation.get(model)]
        lines += ["- **Validation MLM** (held-out, fixed masks drawn ~ count^-"
                  f"{validation['smoothing_exponent']:g}, mostly rare tokens): " + "; ".join(scores) + "."]
    if (prepared := manifests.get(artifacts.PREPARE_DATA)) is not None:
        data = prepared["config"]["data"]
        paths = data.get("paths")
        where = (", ".join(map(str, paths)) if isinstance(paths, list) else paths) if data["source"] == "local" \
            else ", ".join(dataset["name"] for dataset in data["datasets"])
        sequences, tokens = prepared["sequences"], prepared["tokens"]
        lines += [f"- **Distillation corpus**: {where}: {sequences['train']:,} training sequences, "
                  f"{tokens['total']:,} tokens (prepare-data)."]
    if (task_distill := manifests.get(artifacts.TASK_DISTILL)) is not None and found.stage == artifacts.TASK_DISTILL:
        settings, augment = task_distill["config"]["task_distill"], task_distill["config"]["augment"]
        terms = ", ".join(f"{value:g} x {key.removeprefix('alpha_')}" for key, value in settings["loss"].items()
                          if key.startswith("alpha_") and value)
        stats = task_distill.get("transfer", {}).get("stats", {})
        lines += ["- **Task distillation** (Tang et al. 2019): from the fine-tuned teacher "
                  f"`{task_distill['teacher']}`, loss {terms}, augmentation `{augment['method']}`"
                  + (f" ({augment['copies']} copies per example)" if "copies" in augment else "")
                  + (f", a transfer set of {stats['rows']:,} rows" if "rows" in stats else "")
                  + f"; {_hours(task_distill):.2f} hours."]
    if found.seed_run is not None:
        run = read_json(found.seed_run.metrics)
        lines += [f"- **This checkpoint**: {run['task']} seed {run['seed']}"
                  + (f", {run['steps']} training steps" if "steps" in run else "")
                  + (f" on {run['train_examples']:,} training examples" if "train_examples" in run else "") + "."]
    return lines or ["- This model comes from outside a distilbert_cli run: no training facts are recorded."]


def _results(found: Origin) -> list[str]:
    """The evaluation stage's tables (medians over seeds) beside the paper's published rows."""
    if found.run_dir is None or (evaluate := Run(found.run_dir).complete(artifacts.EVALUATE)) is None:
        return ["_The run has no complete evaluate stage._", ""]
    results = read_json(evaluate / artifacts.RESULTS_JSON)
    lines = [f"Data: {results['data']}.", ""]
    tasks = sorted({task for row in results["models"].values() for task in row["tasks"]})
    rows = [[f"{model} (this run)", *[row["tasks"].get(task, {}).get("score") for task in tasks], row["score"]]
            for model, row in results["models"].items()]
    for table in results["published"].values():
        for model, cells in table["rows"].items():
            scores = [cells.get(task) for task in tasks]
            if any(score is not None for score in scores):
                rows.append([f"{model} ({table['source']})",
                             *[sum(s) / len(s) if isinstance(s, list | tuple) else s for s in scores], None])
    lines += _table(["model", *tasks, "score"], rows)
    lines += [f"- {note}" for note in results["notes"]] + ([""] if results["notes"] else [])
    return lines


def _speed(bench_dir: Path | None, name: str) -> list[str]:
    if bench_dir is None:
        return ["_No complete bench-cpu stage in the export's run._", ""]
    results = read_json(bench_dir / artifacts.RESULTS_JSON)
    rows = [[row["model"], row["backend"], row["batch_size"], row["latency_ms"]["median"], row["latency_ms"]["p90"],
             row["size_on_disk_bytes"] / 2**20] for row in results["results"] if row["status"] == "ok"]
    machine = results["machine"]
    return [f"bench-cpu on {machine['cpu']}, {machine['threads']} thread(s), {results['workload']['description']} "
            f"(`{name}` is this model; the others are for comparison):", "",
            *_table(["model", "backend", "batch", "median ms", "p90 ms", "MB on disk"], rows)]


def _parity(parity_json: dict) -> list[str]:
    metric = parity_json["metric"]
    lines = [f"Every variant against PyTorch on {parity_json['examples']} {parity_json['data_task']} "
             f"{parity_json['split']} rows" + (f"; PyTorch's {metric}: {_fmt(parity_json['pytorch']['metric'])}"
                                               if metric else "; the export task has no task metric") + ".", ""]
    rows = [[variant, f"{entry['max_abs_diff']:.2e}", f"{_fmt(entry['agreement'])} ({entry['agreement_kind']})",
             entry["metric"], entry["metric_drop"], entry["status"]]
            for variant, entry in parity_json["variants"].items()]
    lines += _table(["variant", "max abs diff", "agreement", metric or "metric", "drop", "status"], rows)
    gated = [v for v, e in parity_json["variants"].items() if e["status"] == "not_recommended"]
    if gated:
        lines += [f"**Not recommended**: {', '.join(gated)}: the {metric} falls more than "
                  f"{parity_json['max_metric_drop']:g} points below PyTorch's; these files are left out of the upload.",
                  ""]
    return lines


def _commands(found: Origin, export_run: Run) -> list[str]:
    def command(stage: str, manifest: dict) -> str:
        return shlex.join(["distil", artifacts.STAGE_COMMANDS[stage], *manifest["overrides"]])

    commands = [command(stage, manifest) for stage, manifest in found.manifests.items()
                if stage not in (artifacts.PUBLISH, artifacts.REPORT)]
    if found.run_dir is None or export_run.path.resolve() != found.run_dir.resolve():
        commands.append(command(artifacts.EXPORT, export_run.manifest(artifacts.EXPORT)))
    return ["```bash", *commands, "```", ""]


def build_card(name: str, export_run: Run, license_id: str, extra_datasets: list[str]):
    """The ModelCard of export `name` of the run `export_run`, every figure from the run's files."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    facts = artifacts.exported_models(export_run)[name]
    exported = artifacts.ExportedModel(export_run.stage_dir(artifacts.EXPORT) / name)
    parity_json = read_json(exported.parity)
    found = origin(facts["source"])
    scores = expected_scores(found, facts["export_task"])
    teacher = found.manifests.get(artifacts.INIT_STUDENT, {}).get("teacher")
    datasets = list(dict.fromkeys([*(s.dataset_type for s in scores if "/" in s.dataset_type), *extra_datasets]))
    bilstm = facts["architecture"].startswith("BiLSTM")
    data = ModelCardData(
        model_name=name, license=license_id, library_name="transformers", pipeline_tag=facts["export_task"],
        base_model=teacher if teacher is not None and not Path(teacher).is_absolute() else None,
        datasets=datasets or None, tags=["distillation", "distilbert_cli", "onnx", *(["bilstm"] if bilstm else [])],
        eval_results=[EvalResult(task_type=s.task_type, dataset_type=s.dataset_type, dataset_name=s.dataset_name,
                                 dataset_config=s.dataset_config, dataset_split=s.dataset_split,
                                 metric_type=s.metric_type, metric_value=s.metric_value) for s in scores] or None)
    variants = [[variant, info["how"], info["size_bytes"] / 2**20,
                 ", ".join(f"{op} x{n}" for op, n in info["fused_ops"].items()) or info["note"] or "–"]
                for variant, info in facts["variants"].items()]
    gated = set(facts["not_recommended"])
    body = [f"# {name}", "",
            f"A {facts['architecture']} ({facts['parameters'] / 1e6:.1f}M parameters) for {facts['export_task']}, "
            "made with distilbert_cli (the recipe of DistilBERT, Sanh et al. 2019, https://arxiv.org/abs/1910.01108) "
            "and exported with its PyTorch weights and ONNX variants. Every figure below is read from the run's own "
            "files.", "",
            "## How it was made", "", *_making(found), "",
            "## Results", "", *_results(found),
            "## Exported variants", "",
            *_table(["variant", "how", "MB", "fusions / note"], variants),
            "## Parity with PyTorch", "", *_parity(parity_json),
            "## CPU speed", "", *_speed(export_run.complete(artifacts.BENCH_CPU), name),
            "## Usage", "", "```python", "from transformers import pipeline",
            *(["import distilbert_cli.models  # registers the BiLSTM with the Auto classes"] if bilstm else []),
            f'pipe = pipeline("{facts["export_task"]}", model="<this repository>")', "```", "",
            "ONNX Runtime: `onnxruntime.InferenceSession(\"onnx_int8/model.onnx\")` with the tokenizer's "
            f"{', '.join(facts['inputs'])} as int64 arrays.", "",
            "## Reproduce", "", *_commands(found, export_run),
            "## Limitations", "",
            "- Scores are on the dev split of one task at this run's scale; they say nothing of other domains.",
            "- The student inherits its teacher's biases and its teacher's and data's license terms.",
            *([f"- Variants left out as not recommended: {', '.join(sorted(gated))}."] if gated else []),
            *(["- Trained and scored outside a distilbert_cli run: no training figures."] if found.run_dir is None
              else []), "",
            "## Citation", "", "```bibtex", CITATION, *([TANG_CITATION] if found.stage == artifacts.TASK_DISTILL
                                                        else []), "```", ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(body))


def check_card(path: Path, name: str, export_run: Run) -> None:
    """The card at `path` parses as a model card and its model-index equals the run's results files."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path)
    except Exception as exc:
        raise UsageError(f"model card {path} does not parse: {exc}") from exc
    facts = artifacts.exported_models(export_run)[name]
    expected = {(s.dataset_type, s.dataset_split, s.metric_type): s.metric_value
                for s in expected_scores(origin(facts["source"]), facts["export_task"])}
    written = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value
               for r in card.data.eval_results or []}
    if set(written) != set(expected):
        raise UsageError(f"model card {path}: model-index lists {sorted(written)}, the run's results "
                         f"{sorted(expected)}")
    for key, value in expected.items():
        if not math.isclose(float(written[key]), value, abs_tol=1e-9):
            raise UsageError(f"model card {path}: model-index says {key[2]} {written[key]} on {key[0]} {key[1]}, "
                             f"the run's results file says {value}")

