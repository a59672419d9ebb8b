"""The config schema: one pydantic model per config group, one per command. Every composed config is validated
once, before any work (types, finiteness, ranges, choices, unknown keys), so an impossible value is one `error:` line
naming the key, the value and what is allowed; the validated object (immutable) is what the stage and the library
code read, each function taking the sections it needs.

The YAML in conf/ holds every default once; the models here hold no defaults, only what a value may be. Checks
that need the run (the number of processes, the data, the models) stay with the stage that has them.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from distilbert_cli.errors import UsageError
from distilbert_cli.models.run_models import entry_name_problem
from distilbert_cli.training.losses import LOSS_TERMS
from distilbert_cli.training.task_losses import TASK_LOSS_TERMS

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # a probability or a share, 0..1
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # what every generator takes (NumPy's legacy seeding: 32 bits)
Precision = Literal["no", "bf16", "fp16"]


class Group(BaseModel):
    """Strict: no string-to-number coercion, no unknown keys; frozen: what was validated is what runs."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError("must not name an entry twice")
    return values


def _folder_names(entries: list[str] | str) -> list[str] | str:
    """Model entries whose names become folders (`name:path`, or a path's last component) are single safe path
    components: a name such as `..` would write outside the stage folder."""
    for entry in [entries] if isinstance(entries, str) else entries:
        if (problem := entry_name_problem(entry)) is not None:
            raise ValueError(problem)
    return entries


# ---- groups shared by several commands ------------------------------------------------------------------

class Common(Group):
    run_dir: str
    overwrite: bool
    seed: Seed
    trust_remote_code: bool
    upstream_run_dir: str | None  # null: no upstream run


class Teacher(Group):
    name_or_path: str | None  # train: null = the teacher init-student recorded


class TrainTeacher(Teacher):
    dtype: Literal["auto", "fp32", "bf16", "fp16"]  # auto: the type of train.mixed_precision


class QuestionAnswering(Group):
    max_seq_length: PositiveInt
    doc_stride: PositiveInt
    max_query_length: PositiveInt
    n_best_size: PositiveInt
    max_answer_length: PositiveInt
    null_score_diff_threshold: Annotated[float, Field(allow_inf_nan=False)]

    @model_validator(mode="after")
    def _room_for_context(self):
        if self.max_query_length >= self.max_seq_length:
            raise ValueError(f"task.qa.max_query_length={self.max_query_length} leaves no room for the context in "
                             f"task.qa.max_seq_length={self.max_seq_length}")
        return self


class OwnData(Group):
    hub: str | None  # null: local files
    hub_config: str | None
    train: str | None  # a file, or a split of `hub`
    validation: str | None
    test: str | None
    text_field: str
    text_pair_field: str | None
    label_field: str
    label_names: Annotated[list[str], Field(min_length=2)] | None

    @field_validator("label_names")
    @classmethod
    def _distinct_labels(cls, values):
        return values if values is None else _distinct(values)


class Task(Group):
    names: Annotated[list[str], Field(min_length=1)]
    data_dir: str | None
    max_seq_length: Annotated[int, Field(ge=3)]  # [CLS], a token, [SEP]
    truncation: Literal["head", "head_tail"]
    head_tokens: NonNegativeInt
    qa: QuestionAnswering
    data: OwnData

    _distinct_names = field_validator("names")(_distinct)

    @model_validator(mode="after")
    def _head_fits(self):
        if self.truncation == "head_tail" and self.head_tokens >= self.max_seq_length:
            raise ValueError(f"task.head_tokens={self.head_tokens} leaves no room for the tail in "
                             f"task.max_seq_length={self.max_seq_length}")
        return self


# ---- prepare-data -------------------------------------------------------------------------------------

class LocalData(Group):
    source: Literal["local"]
    paths: str | Annotated[list[str], Field(min_length=1)]
    txt_split: Literal["line", "blank_line"]
    text_field: str
    bad_lines: Literal["skip", "fail"]


class HubDataset(Group):
    name: str
    config: str | None
    split: str
    revision: str | None
    text_field: str


class HubData(Group):
    source: Literal["hub"]
    datasets: Annotated[list[HubDataset], Field(min_length=1)]
    streaming: bool
    bad_lines: Literal["skip", "fail"]


class Prepare(Group):
    max_seq_length: Annotated[int, Field(ge=3)]  # [CLS], a token, [SEP]
    min_seq_length: NonNegativeInt
    max_unk_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    pack: bool
    # a fraction of the sequences, or a number of sequences
    validation_size: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | PositiveInt
    num_proc: PositiveInt | None  # null: one per CPU core
    batch_size: PositiveInt

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_seq_length > self.max_seq_length:
            raise ValueError(f"prepare.min_seq_length={self.min_seq_length} exceeds prepare.max_seq_length="
                             f"{self.max_seq_length}")
        return self


class PrepareData(Common):
    teacher: Teacher
    data: Annotated[LocalData | HubData, Field(discriminator="source")]
    prepare: Prepare


# ---- init-student -------------------------------------------------------------------------------------

class Student(Group):
    # auto: DistilBERT for a BERT teacher, else its own class; mobilebert: transformers' MobileBERT (random init)
    arch: Literal["auto", "distilbert", "same_arch", "mobilebert"]
    num_layers: PositiveInt | None  # null: half the teacher's (MobileBERT: the teacher's)
    hidden_size: PositiveInt | None  # null: the teacher's
    num_attention_heads: PositiveInt | None
    intermediate_size: PositiveInt | None


class BiLSTMStudent(Group):
    arch: Literal["bilstm"]
    embedding_size: PositiveInt
    hidden_size: PositiveInt  # per direction
    classifier_size: PositiveInt
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class Init(Group):
    strategy: Literal["every_other", "uniform", "first_k", "last_k", "explicit", "random"]
    layers: list[NonNegativeInt] | None  # init=explicit only


class InitStudent(Common):
    teacher: Teacher
    student: Annotated[Student | BiLSTMStudent, Field(discriminator="arch")]
    init: Init
    fold_token_type_embeddings: bool
    copy_mlm_head_transform: bool


# ---- train ------------------------------------------------------------------------------------------------

def loss_weights(section: str, terms) -> type[Group]:
    """A group with one weight `alpha_<name>` per term of a loss registry, at least one of them nonzero: adding a
    term to the registry adds its weight here."""
    def some_weight(self):
        if not any(getattr(self, f"alpha_{name}") for name in terms):
            raise ValueError(f"every {section} weight is 0: set at least one of "
                             + ", ".join(f"{section}.alpha_{name}" for name in terms))
        return self

    return create_model(f"{section}_weights", __base__=Group,
                        __validators__={"_some_weight": model_validator(mode="after")(some_weight)},
                        **{f"alpha_{name}": (NonNegativeFloat, ...) for name in terms})


class Loss(loss_weights("loss", LOSS_TERMS)):
    temperature: PositiveFloat
    restrict_ce_to_mask: bool
    teacher_layer: int | None  # null: every student layer paired; an index (negative from the top): MiniLM's
    relation_heads: PositiveInt | None  # null: the teacher's attention heads


class Batch(Group):
    global_batch_size: PositiveInt
    micro_batch_size: PositiveInt
    group_window: PositiveInt  # 1: no length grouping
    num_workers: NonNegativeInt


class Optim(Group):
    lr: PositiveFloat
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]], Field(min_length=2, max_length=2)]
    eps: PositiveFloat
    weight_decay: NonNegativeFloat
    warmup_fraction: Fraction
    max_grad_norm: PositiveFloat | None  # null: no clipping


class WandbLogger(Group):
    name: Literal["wandb"]
    mode: Literal["online", "offline", "disabled"]
    project: str


class NoLogger(Group):
    name: Literal["none"]


class Masking(Group):
    mlm_probability: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    mask_fraction: Fraction
    random_fraction: Fraction
    smoothing_exponent: NonNegativeFloat

    @model_validator(mode="after")
    def _fractions(self):
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError(f"masking.mask_fraction + masking.random_fraction = "
                             f"{self.mask_fraction + self.random_fraction} exceeds 1")
        return self


class TrainSettings(Group):
    max_steps: PositiveInt | None
    epochs: PositiveFloat | None
    max_tokens: PositiveInt | None
    log_every: PositiveInt
    checkpoint_every: PositiveInt
    keep_last: PositiveInt
    resume: str  # never | auto | a checkpoint directory
    mixed_precision: Precision
    compile: bool
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"]
    gradient_checkpointing: bool
    deterministic: bool
    max_bad_steps: NonNegativeInt
    progressive_transfer: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # share of the steps; 0: off
    head_only_steps: NonNegativeInt  # the first steps train the MLM head alone; 0: off

    @model_validator(mode="after")
    def _one_budget(self):
        budgets = {k: getattr(self, k) for k in ("max_steps", "epochs", "max_tokens") if getattr(self, k) is not None}
        if len(budgets) != 1:
            raise ValueError(f"set exactly one training budget among train.max_steps, train.epochs, "
                             f"train.max_tokens (the others null); got {budgets or 'none'}")
        return self


class Validation(Group):
    max_sequences: PositiveInt
    batch_size: PositiveInt
    seed: Seed
    smoothing_exponent: NonNegativeFloat


class Train(Common):
    loss: Loss
    batch: Batch
    optim: Optim
    logger: Annotated[WandbLogger | NoLogger, Field(discriminator="name")]
    teacher: TrainTeacher
    masking: Masking
    train: TrainSettings
    validation: Validation


# ---- finetune, evaluate -----------------------------------------------------------------------------------

class SoftTargets(Group):
    teacher: str | None  # null (off), `teacher`, or a path template with {task} and {seed}
    alpha_ce: NonNegativeFloat
    alpha_task: NonNegativeFloat
    temperature: PositiveFloat


class TaskTraining(Group):
    """What finetune and task-distill train a task model with (downstream/task_training.py, through the engine)."""

    seeds: Annotated[list[Seed], Field(min_length=1)]
    batch_size: PositiveInt  # global
    micro_batch_size: PositiveInt | None  # per process and forward pass; null: batch_size / processes
    group_window: PositiveInt  # micro batches sorted by length together; 1: no length grouping
    learning_rate: PositiveFloat
    weight_decay: NonNegativeFloat
    warmup_ratio: Fraction
    max_grad_norm: PositiveFloat | None  # null: no clipping
    max_train_samples: PositiveInt | None
    max_eval_samples: PositiveInt | None
    mixed_precision: Precision
    log_every: PositiveInt
    checkpoint_every: PositiveInt
    keep_last: PositiveInt
    resume: str  # never | auto | a checkpoint directory
    max_bad_steps: NonNegativeInt
    validation_split: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]  # held out when eval_every is set
    eval_every: PositiveInt | None  # null: no model selection, the last step's model is kept
    early_stopping: PositiveInt | None  # evaluations without a better held-out score before stopping; null: never

    _distinct_seeds = field_validator("seeds")(_distinct)

    @model_validator(mode="after")
    def _selection(self):
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping counts evaluations: set eval_every too")
        return self


class FinetuneSettings(TaskTraining):
    models: Annotated[list[str], Field(min_length=1)]
    epochs: PositiveInt
    long_tasks: list[str]
    long_task_epochs: PositiveInt
    save_models: bool
    soft_targets: SoftTargets

    _model_names = field_validator("models")(_folder_names)

    @model_validator(mode="after")
    def _teacher_listed(self):
        if self.soft_targets.teacher == "teacher" and "teacher" not in self.models:
            raise ValueError("finetune.soft_targets.teacher=teacher needs teacher in finetune.models")
        return self


class Finetune(Common):
    task: Task
    logger: Annotated[WandbLogger | NoLogger, Field(discriminator="name")]
    finetune: FinetuneSettings


# ---- task-distill ---------------------------------------------------------------------------------------------

class TinyBertAugment(Group):
    method: Literal["tinybert"]
    copies: PositiveInt
    replace_probability: Fraction
    candidates: PositiveInt
    masked_lm: str  # `teacher`: the run's teacher (init-student's); or a directory / hub name
    batch_size: PositiveInt


class TangAugment(Group):
    method: Literal["tang"]
    copies: PositiveInt
    mask_probability: Fraction
    ngram_probability: Fraction
    max_ngram: PositiveInt


class NoAugment(Group):
    method: Literal["none"]


class TaskLoss(loss_weights("task_distill.loss", TASK_LOSS_TERMS)):
    temperature: PositiveFloat


class IntermediateLayers(Group):
    epochs: NonNegativeFloat  # 0: no intermediate-layer step
    alpha_embed: NonNegativeFloat
    alpha_hidden: NonNegativeFloat
    alpha_attn_scores: NonNegativeFloat


class TaskDistillSettings(TaskTraining):
    teacher: str  # `teacher`: the run's fine-tuned teacher; or a directory with the task's head
    student: str  # `student`: the run's student; or a directory / hub name
    transfer_set: str | None  # another run's task-distill/transfer/ to reuse; null: build it here
    teacher_batch_size: PositiveInt
    epochs: PositiveFloat | None
    max_steps: PositiveInt | None
    loss: TaskLoss
    intermediate: IntermediateLayers

    _student_name = field_validator("student")(_folder_names)

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError(f"set exactly one of task_distill.epochs, task_distill.max_steps (the other null); got "
                             f"epochs={self.epochs}, max_steps={self.max_steps}")
        return self


class TaskDistill(Common):
    task: Task
    logger: Annotated[WandbLogger | NoLogger, Field(discriminator="name")]
    augment: Annotated[TinyBertAugment | TangAugment | NoAugment, Field(discriminator="method")]
    task_distill: TaskDistillSettings

    @model_validator(mode="after")
    def _one_task(self):
        if len(self.task.names) != 1:
            raise ValueError(f"task-distill distills one task; task.names names {self.task.names}")
        return self


class EvalSettings(Group):
    model_dirs: list[str]
    batch_size: PositiveInt
    max_samples: PositiveInt | None
    note: str | None


class Evaluate(Common):
    task: Task
    eval: EvalSettings


# ---- bench-cpu, report ------------------------------------------------------------------------------------

class BenchSettings(Group):
    models: Annotated[list[str], Field(min_length=1)]
    backends: Annotated[list[Literal["eager", "compile", "int8", "onnx", "onnx_optimized", "onnx_int8"]],
                        Field(min_length=1)]
    batch_sizes: Annotated[list[PositiveInt], Field(min_length=1)]
    padding: Literal["longest", "max_length"]
    num_threads: PositiveInt | None
    warmup_batches: NonNegativeInt
    repeats: PositiveInt
    rounds: PositiveInt
    max_examples: PositiveInt | None
    check_examples: PositiveInt
    compile_backend: str

    _distinct_entries = field_validator("backends", "batch_sizes")(_distinct)
    _model_names = field_validator("models")(_folder_names)


class BenchCpu(Common):
    task: Task
    bench: BenchSettings

    @model_validator(mode="after")
    def _one_task(self):
        if len(self.task.names) != 1:
            raise ValueError(f"bench-cpu times one task's dev set; task.names names {self.task.names} "
                             "(use task=stsb, the paper's workload)")
        return self


# ---- export, publish ---------------------------------------------------------------------------------------

class ExportSettings(Group):
    models: Annotated[list[str], Field(min_length=1)]
    task: Literal["auto", "text-classification", "question-answering", "fill-mask", "feature-extraction"]
    per_channel: bool
    static_int8: bool
    calibration_samples: PositiveInt
    parity_samples: PositiveInt | None  # null: every dev row
    batch_size: PositiveInt
    max_metric_drop: NonNegativeFloat

    _distinct_models = field_validator("models")(_distinct)
    _model_names = field_validator("models")(_folder_names)


class Export(Common):
    task: Task
    export: ExportSettings

    @model_validator(mode="after")
    def _one_task(self):
        if len(self.task.names) != 1:
            raise ValueError(f"export checks its models on one task's dev rows; task.names names {self.task.names}")
        return self


class PublishSettings(Group):
    models: list[str] | None  # null: every model of the export stage
    repo_id: str | None  # owner/name, or a template with {name}; null: dry runs only
    dry_run: bool
    private: bool
    license: str
    datasets: list[str]
    commit_message: str


class Publish(Common):
    publish: PublishSettings

    @model_validator(mode="after")
    def _repo_for_upload(self):
        if not self.publish.dry_run and self.publish.repo_id is None:
            raise ValueError("publish.dry_run=false uploads to publish.repo_id: set it (owner/name)")
        return self


class ReportSettings(Group):
    baselines: list[str]
    teacher_note: str | None
    bootstrap_resamples: NonNegativeInt  # 0: off
    reference: str | None  # a sweep's reference member (its name or one of its swept values); null: the first


class Report(Common):
    report: ReportSettings


# ---- sweep ----------------------------------------------------------------------------------------------

# The stage commands a sweep member can run, in the pipeline's order.
SweepCommand = Literal["prepare-data", "init-student", "train", "finetune", "task-distill", "evaluate", "bench-cpu"]


class SlurmSettings(Group):
    partition: str | None  # null: the cluster's default
    account: str | None
    nodes: PositiveInt
    gpus_per_node: NonNegativeInt
    cpus_per_task: PositiveInt
    timeout_min: PositiveInt
    array_parallelism: PositiveInt


class SweepSettings(Group):
    stages: Annotated[list[SweepCommand], Field(min_length=1)]
    launcher: Literal["local", "submitit_local", "slurm"]
    parallel: PositiveInt
    status: bool
    report: bool
    slurm: SlurmSettings

    @field_validator("stages")
    @classmethod
    def _in_pipeline_order(cls, stages):
        order = list(get_args(SweepCommand))
        if _distinct(stages) != sorted(stages, key=order.index):
            raise ValueError(f"must follow the pipeline's order ({', '.join(order)})")
        return stages


class Sweep(Common):
    sweep: SweepSettings


# The schema of each command's primary config (conf/<name>.yaml).
COMMAND_SCHEMAS: dict[str, type[BaseModel]] = {
    "prepare_data": PrepareData, "init_student": InitStudent, "train": Train, "finetune": Finetune,
    "task_distill": TaskDistill, "evaluate": Evaluate, "bench_cpu": BenchCpu, "export": Export,
    "publish": Publish, "report": Report, "sweep": Sweep,
}


def validated(command: str, config: dict) -> BaseModel:
    """The typed config of `command` (a composed config as a plain dict); a UsageError naming every problem, one
    `key=value: what is allowed` per key."""
    try:
        return COMMAND_SCHEMAS[command].model_validate(config)
    except ValidationError as exc:
        raise UsageError("; ".join(_problems(config, exc))) from None


def _problems(config: dict, exc: ValidationError) -> list[str]:
    """What is wrong with a composed config, one `key=value: what is allowed` per key."""
    by_key: dict[str, list[str]] = {}
    for error in exc.errors():
        key, value = _locate(config, error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required"
        elif value is not _NO_VALUE and not isinstance(value, dict):
            key = f"{key}={_shown(value)}"
        by_key.setdefault(key, [])
        if message not in by_key[key]:
            by_key[key].append(message[0].lower() + message[1:])
    return [f"{key}: {' or '.join(messages)}" if key else " or ".join(messages) for key, messages in by_key.items()]


_NO_VALUE = object()


def _locate(config: dict, loc: tuple) -> tuple[str, object]:
    """The dotted key of an error location and the value there: pydantic's location also names union members
    and discriminator tags, which are not keys of the config."""
    parts, node = [], config
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        if in_dict or isinstance(node, list) and isinstance(part, int) and part < len(node):
            parts.append(str(part))
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part == loc[-1]:
            return ".".join([*parts, part]), _NO_VALUE  # a key that is not there
    return ".".join(parts), node


def _shown(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value) if isinstance(value, bool | int | float) else repr(value)
