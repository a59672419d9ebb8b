"""What each stage leaves in the run directory: its folder, its output files and the manifest facts other
stages read. The stage that writes a file and every stage that reads it name it through this module only.

    <run_dir>/prepare-data/  dataset/, token_counts.npy, tokenizer/, stats.json
    <run_dir>/init-student/  model/                       manifest: InitStudentFacts
    <run_dir>/distill/       final/, metrics.jsonl, validation.json, validation_targets.safetensors, checkpoints/step-N/
    <run_dir>/finetune/      <model>/<task>/seed-<s>/{model/, predictions.jsonl, metrics.json, predictions-<split>.json}
    <run_dir>/task-distill/  transfer/, transfer.json, student/<task>/seed-<s>/{model/, predictions.jsonl, metrics.json,
                             metrics.jsonl}
    <run_dir>/evaluate/      results.json, results.md
    <run_dir>/bench-cpu/     results.json, results.md, latency.png
    <run_dir>/export/        <name>/{config.json, model.safetensors, tokenizer files, onnx/, onnx_optimized/,
                             onnx_int8/[, onnx_int8_static/] (each model.onnx), parity.json}   manifest: models
    <run_dir>/publish/       <name>/{README.md (the model card), the weights, tokenizer and recommended ONNX
                             variants, parity.json}   manifest: pushed
    <run_dir>/report/        report.md and the charts it embeds
    <run_dir>/sweep/         sweep.json; <member>/ (a run directory per member: member.json and its stages)

`UNFINGERPRINTED` names, per stage, the files that record how the run went rather than what it made (timings,
the stage's own checkpoints, tracker files): a stage's fingerprint, which the stages consuming it verify and a
resumed run compares, covers everything else, so a byte-identical re-run has the same fingerprint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from distilbert_cli.errors import invalid_entry, unreadable
from distilbert_cli.rundir import MANIFEST, Run

log = logging.getLogger(__name__)

PREPARE_DATA = "prepare-data"
INIT_STUDENT = "init-student"
DISTILL = "distill"
FINETUNE = "finetune"
TASK_DISTILL = "task-distill"
EVALUATE = "evaluate"
BENCH_CPU = "bench-cpu"
EXPORT = "export"
PUBLISH = "publish"
REPORT = "report"
STAGES = (PREPARE_DATA, INIT_STUDENT, DISTILL, FINETUNE, TASK_DISTILL, EVALUATE, BENCH_CPU, EXPORT, PUBLISH, REPORT)
# The command that writes each stage (`distil <command>`: `distil train` writes distill/), and the other way round.
STAGE_COMMANDS = {PREPARE_DATA: "prepare-data", INIT_STUDENT: "init-student", DISTILL: "train", FINETUNE: "finetune",
                  TASK_DISTILL: "task-distill", EVALUATE: "evaluate", BENCH_CPU: "bench-cpu", EXPORT: "export",
                  PUBLISH: "publish", REPORT: "report"}
COMMAND_STAGES = {command: stage for stage, command in STAGE_COMMANDS.items()}
SWEEP = "sweep"

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PREDICTIONS_JSONL = "predictions.jsonl"


@dataclass(frozen=True)
class PreparedData:
    """prepare-data's outputs."""

    path: Path

    @property
    def dataset(self) -> Path:  # a datasets.DatasetDict (save_to_disk): train and validation
        return self.path / "dataset"

    @property
    def token_counts(self) -> Path:  # int64 count of every token id in train
        return self.path / "token_counts.npy"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def stats(self) -> Path:
        return self.path / "stats.json"

    @property
    def files(self) -> tuple[Path, ...]:  # what a complete stage must hold
        return self.dataset / "train", self.dataset / "validation", self.token_counts, self.tokenizer, self.stats


@dataclass(frozen=True)
class InitStudentOutputs:
    path: Path

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def files(self) -> tuple[Path, ...]:  # what a complete stage must hold: weights, config, tokenizer
        return tuple(self.model / name for name in ("model.safetensors", "config.json", "tokenizer_config.json"))


@dataclass(frozen=True)
class InitStudentFacts:
    """What init-student records about the student it built (its manifest's stage-specific keys)."""

    teacher: str  # hub name, or the absolute path of a local directory
    teacher_has_mlm_head: bool
    layer_map: list  # teacher layer of each student layer (None: random)
    strategy: str
    student_arch: str
    student_class: str
    fold_token_type_embeddings: bool
    copied_mlm_head_transform: bool
    param_counts: dict  # {"teacher": n, "student": n}

    def as_manifest(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DistillOutputs:
    path: Path

    @property
    def final(self) -> Path:  # the distilled student and its tokenizer
        return self.path / "final"

    @property
    def metrics(self) -> Path:  # one JSON line per logged step
        return self.path / "metrics.jsonl"

    @property
    def validation(self) -> Path:  # held-out MLM loss and accuracy of student and teacher
        return self.path / "validation.json"

    @property
    def validation_targets(self) -> Path:  # every held-out MLM target: label, and each model's loss and prediction
        return self.path / "validation_targets.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run: <finetune>/<model>/<task>/seed-<s>/."""

    path: Path

    @classmethod
    def of(cls, finetune_dir: Path, model: str, task: str, seed: int) -> FinetuneRun:
        return cls(finetune_dir / model / task / f"seed-{seed}")

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS_JSONL

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def loss_log(self) -> Path:  # one JSON line of loss terms per logged step, and each held-out evaluation
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:  # the run's resume points; removed once it is finished
        return self.path / "checkpoints"

    def official_predictions(self, split: str) -> Path:
        """A split's predictions in the task's official format (SQuAD: {question id: answer text})."""
        return self.path / f"predictions-{split}.json"

    @property
    def seed(self) -> int:
        return int(self.path.name.removeprefix("seed-"))


@dataclass(frozen=True)
class TaskDistillOutputs:
    """task-distill's outputs: the transfer set, and each student run in finetune's layout (model "student")."""

    path: Path

    @property
    def transfer(self) -> Path:  # a datasets.Dataset (save_to_disk): texts, ids, labels, teacher outputs
        return self.path / "transfer"

    @property
    def transfer_info(self) -> Path:  # how the transfer set was made (its settings, counts, seconds, bytes)
        return self.path / "transfer.json"

    def run(self, task: str, seed: int) -> FinetuneRun:
        return FinetuneRun.of(self.path, TASK_DISTILLED_MODEL, task, seed)


TASK_DISTILLED_MODEL = "student"


@dataclass(frozen=True)
class ExportedModel:
    """One model of the export stage: <export>/<name>/ holds the PyTorch copy (loads with from_pretrained and
    transformers.pipeline), one folder per ONNX variant and parity.json."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def variant(self, variant: str) -> Path:  # onnx, onnx_optimized, onnx_int8, onnx_int8_static
        return self.path / variant / ONNX_FILE

    @property
    def parity(self) -> Path:  # each variant against PyTorch on dev rows of the task
        return self.path / "parity.json"


ONNX_FILE = "model.onnx"
MODEL_CARD = "README.md"  # the Hub reads a repository's model card from README.md


def exported_models(run: Run) -> dict[str, dict]:
    """{name: what export recorded of it (source, export task, data task, variants)} of the run's complete export
    stage; {} without one."""
    return run.manifest(EXPORT).get("models", {}) if run.complete(EXPORT) is not None else {}


@dataclass(frozen=True)
class SweepOutputs:
    """distil sweep's folder: `sweep.json` (its stages and members, each member's overrides) and one run directory
    per member, named by its swept overrides, whose `member.json` says how its last attempt ended."""

    path: Path  # <run_dir>/sweep

    @property
    def record(self) -> Path:
        return self.path / "sweep.json"

    def member(self, name: str) -> Path:
        return self.path / name

    def member_record(self, name: str) -> Path:  # status, the stage that failed and its error line, times
        return self.member(name) / "member.json"

    @property
    def jobs(self) -> Path:  # submitit's job files and logs
        return self.path / ".submitit"


def finetune_runs(finetune_dir: Path, model: str, task: str) -> list[FinetuneRun]:
    """Every seed of one model on one task, in seed order."""
    return sorted((FinetuneRun(path) for path in (finetune_dir / model / task).glob("seed-*")),
                  key=lambda run: run.seed)


def finetuned_models(finetune_dir: Path) -> list[str]:
    return sorted(path.name for path in finetune_dir.iterdir() if path.is_dir())


# stats.json, finetune's and task-distill's metrics.json and transfer.json hold timings; metrics.jsonl throughput;
# checkpoints/ and wandb/ are the training stages' own resume state and tracker files.
_TRAINING_RECORDS = ("metrics.jsonl", "checkpoints", "wandb")
UNFINGERPRINTED = {PREPARE_DATA: ("stats.json",), DISTILL: _TRAINING_RECORDS,
                   FINETUNE: ("metrics.json", *_TRAINING_RECORDS),
                   TASK_DISTILL: ("metrics.json", "transfer.json", *_TRAINING_RECORDS)}
FINETUNE_PREDICTIONS = f"*/{PREDICTIONS_JSONL}"  # what evaluate reads of the finetune stage


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise unreadable(path, exc) from exc


def read_arrays(path: Path) -> dict:
    """numpy arrays by name from a safetensors file (`rundir.save_arrays_atomic`'s)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise unreadable(path, exc) from exc


def read_jsonl(path: Path, drop_torn_tail: bool = False) -> list[dict]:
    """One record per line. `drop_torn_tail`: a last line cut short by a killed writer (no newline, not JSON) is
    dropped with a warning instead of making the file unreadable."""
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise unreadable(path, exc) from exc
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if drop_torn_tail and number == len(lines) and not text.endswith("\n"):
                log.warning("%s: dropped its last line, cut short by an interrupted write: %r", path, line[:60])
                continue
            raise unreadable(path, f"line {number}: {exc}") from exc
        if not isinstance(record, dict):
            raise unreadable(path, f"line {number} is not a JSON object")
        records.append(record)
    return records


def init_student_facts(run: Run) -> InitStudentFacts:
    """The facts of the run's complete init-student stage, each of its type."""
    names = [field.name for field in fields(InitStudentFacts)]
    manifest = _init_student_manifest(run, names)
    try:
        return TypeAdapter(InitStudentFacts).validate_python({name: manifest[name] for name in names})
    except ValidationError as exc:
        raise unreadable(run.stage_dir(INIT_STUDENT) / MANIFEST, invalid_entry(exc)) from None


def recorded_teacher(run: Run) -> str:
    """The teacher (hub name or local path) that the run's complete init-student stage was built from."""
    teacher = _init_student_manifest(run, ["teacher"])["teacher"]
    if not isinstance(teacher, str):
        raise unreadable(run.stage_dir(INIT_STUDENT) / MANIFEST, "teacher is not a string")
    return teacher


def _init_student_manifest(run: Run, needed: list[str]) -> dict:
    stage_dir = run.require(INIT_STUDENT)
    manifest = run.manifest(INIT_STUDENT)
    if missing := [name for name in needed if name not in manifest]:
        raise unreadable(stage_dir / MANIFEST, f"it lacks {', '.join(missing)}")
    return manifest
