"""Every data reader fed generated, structurally wrong documents: corpus files (.txt, .jsonl, .parquet), GLUE TSV,
your own task files (CSV, TSV, JSON lines, Parquet), SQuAD JSON, stage manifests and checkpoint JSON. Each ends in
what it read (bad lines or rows counted), or one `UsageError` line; never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import open_stage
from fuzz.strategies import JSON_VALUES, budget, mutated, refused_or_read
from hypothesis import given
from hypothesis import strategies as st

from distilbert_cli import artifacts
from distilbert_cli.config import compose_config
from distilbert_cli.data.corpus import BadLines, check_corpus_file, read_corpus
from distilbert_cli.rundir import MANIFEST, Run, read_manifest, verify_outputs
from distilbert_cli.schema import LocalData
from distilbert_cli.stages.evaluate import finetune_notes
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.glue import TASKS as GLUE_TASKS
from distilbert_cli.tasks.squad import check_answers, read_squad_json
from distilbert_cli.training.checkpoint import TRAINER_STATE, read_checkpoint, read_state_json

pytestmark = pytest.mark.fuzz

LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
RAW_LINES = st.lists(st.one_of(LINE_TEXT, JSON_VALUES.map(json.dumps), st.binary(max_size=30)), max_size=12)


def _joined(lines: list) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass") for line in lines)


# ---- corpus files ---------------------------------------------------------------------------------------------

def _column(kind: str):
    """Values of one Parquet column of the given kind (the corpus wants strings: the others are wrong)."""
    values = {"string": st.one_of(st.none(), LINE_TEXT), "int64": st.one_of(st.none(), st.integers(-9, 9)),
              "binary": st.binary(max_size=8), "list": st.lists(st.integers(0, 3), max_size=2),
              "struct": st.fixed_dictionaries({"text": LINE_TEXT})}[kind]
    return st.lists(values, max_size=8)


@st.composite
def corpus_files(draw):
    suffix = draw(st.sampled_from([".txt", ".jsonl", ".parquet"]))
    if suffix != ".parquet":
        return suffix, _joined(draw(RAW_LINES))
    name, kind = draw(st.sampled_from(["text", "body"])), draw(st.sampled_from(["string", "int64", "binary", "list",
                                                                                   "struct"]))
    return suffix, pa.table({name: pa.array(draw(_column(kind)))})


@budget("readers")
@given(file=corpus_files(), policy=st.sampled_from(["skip", "fail"]), split=st.sampled_from(["line", "blank_line"]))
def test_a_corpus_file_is_read_counted_or_refused(file, policy, split):
    suffix, content = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corpus{suffix}"
        pq.write_table(content, path) if suffix == ".parquet" else path.write_bytes(content)
        data = LocalData(source="local", paths=[str(path)], txt_split=split, text_field="text", bad_lines=policy)
        bad = BadLines(policy)

        def read():
            check_corpus_file(path, "text")
            return read_corpus(data, 16, [path], Path(tmp), bad)

        if (corpus := refused_or_read(read)) is not None:
            assert all(isinstance(text, str) for text in corpus["text"])
            assert policy == "skip" or bad.count == 0


# ---- GLUE TSV --------------------------------------------------------------------------------------------------

TSV_FIELDS = st.lists(st.one_of(LINE_TEXT, st.sampled_from(["0", "1", "entailment", "not_entailment", "neutral",
                                                             "2.5", "-1", "nan", '"', "sentence1"])), max_size=6)


@budget("readers")
@given(task=st.sampled_from(sorted(GLUE_TASKS)), header=st.booleans(), rows=st.lists(TSV_FIELDS, max_size=10),
       latin1=st.booleans())
def test_a_glue_tsv_file_is_read_with_malformed_rows_counted_or_refused(task, header, rows, latin1):
    glue = GLUE_TASKS[task]
    lines = [["index", "sentence", "sentence1", "sentence2", "label", "#1 String", "#2 String", "Quality", "score",
              "question1", "question2", "is_duplicate", "question", "gold_label"]] if header else []
    text = "\n".join("\t".join(fields) for fields in lines + rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = glue.tsv_path("train", tmp)
        path.parent.mkdir(parents=True)
        path.write_bytes(text.encode("latin-1", "replace") if latin1 else text.encode("utf-8", "surrogatepass"))
        if (dataset := refused_or_read(lambda: glue.load_split("train", tmp))) is not None:
            labels = np.asarray(dataset["label"])
            assert len(dataset) > 0
            assert ((labels >= 0) & (labels <= 5)).all() if glue.is_regression else \
                set(labels.tolist()) <= set(range(len(glue.label_names)))


# ---- your own task files ---------------------------------------------------------------------------------------

OWN_TASKS = ("text_classification", "text_regression", "text_pair_classification")
SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_SETTINGS: dict = {}


def own_settings(task: str, folder: Path, suffix: str):
    """task settings naming train and validation files in `folder` (composed once per task and suffix)."""
    key = (task, folder, suffix)
    if key not in _SETTINGS:
        _SETTINGS[key] = compose_config("finetune", [
            "run_dir=unused", f"task={task}", f"task.data.train={folder / ('train' + suffix)}",
            f"task.data.validation={folder / ('validation' + suffix)}",
            *(["task.data.text_pair_field=text_pair"] if task == "text_pair_classification" else [])]).task
    return _SETTINGS[key]


RECORD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 200_000), st.floats(allow_nan=False),
                          LINE_TEXT, st.lists(st.integers(0, 2), max_size=2))
RECORDS = st.lists(st.dictionaries(st.sampled_from(["text", "text_pair", "label", "other"]), RECORD_VALUES,
                                   max_size=4), max_size=8)


def _write_task_file(path: Path, records: list[dict], raw: bytes | None) -> None:
    if raw is not None:
        path.write_bytes(raw)
    elif path.suffix == ".parquet":
        columns = sorted({key for record in records for key in record})
        try:
            table = pa.table({key: pa.array([record.get(key) for record in records]) for key in columns})
        except (pa.ArrowException, OverflowError):  # mixed types: each value as text, as a CSV would hold them
            table = pa.table({key: pa.array([None if key not in r else str(r[key]) for r in records])
                              for key in columns})
        pq.write_table(table, path)
    elif path.suffix in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        columns = sorted({key for record in records for key in record})
        path.write_text("\n".join([sep.join(columns)] + [sep.join(str(r.get(key, "")) for key in columns)
                                                          for r in records]))


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("own-task")


@budget("readers")
@given(task=st.sampled_from(OWN_TASKS), suffix=st.sampled_from(SUFFIXES), train=RECORDS, validation=RECORDS,
       raw=st.one_of(st.none(), RAW_LINES.map(_joined)))
def test_own_task_files_are_read_with_empty_rows_counted_or_refused(task_folder, task, suffix, train, validation,
                                                                      raw):
    settings = own_settings(task, task_folder, suffix)
    _write_task_file(task_folder / f"train{suffix}", train, raw)
    _write_task_file(task_folder / f"validation{suffix}", validation, None)
    if (data := refused_or_read(lambda: get_task(task).load(settings, ("train", "validation")))) is not None:
        for split in ("train", "validation"):
            assert len(data.splits[split]) > 0
            labels = data.splits[split]["label"]
            if data.label_names is not None:
                assert set(labels) <= set(range(len(data.label_names)))


# ---- SQuAD JSON ------------------------------------------------------------------------------------------------

SQUAD = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
    {"id": "a", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}],
     "is_impossible": False},
    {"id": "b", "question": "Why?", "answers": [], "is_impossible": True}]}]}]}


@budget("readers")
@given(document=mutated(SQUAD), with_negative=st.booleans())
def test_a_squad_file_is_read_with_bad_answers_counted_or_refused(tmp_path_factory, document, with_negative):
    path = tmp_path_factory.getbasetemp() / "fuzz-squad.json"
    path.write_text(json.dumps(document))
    if (rows := refused_or_read(lambda: read_squad_json(path))) is not None:
        kept, problems = check_answers(rows, with_negative)
        assert len(kept) + problems.get("questions left without an answer", 0) == len(rows)
        assert all(row["context"][start:start + len(text)] == text
                   for row in kept for text, start in zip(row["answers"], row["answer_starts"], strict=True))


# ---- manifests -------------------------------------------------------------------------------------------------

FACTS = artifacts.InitStudentFacts(teacher="/models/teacher", teacher_has_mlm_head=True, layer_map=[0, 2],
                                   strategy="every_other", student_arch="distilbert",
                                   student_class="DistilBertForMaskedLM", fold_token_type_embeddings=True,
                                   copied_mlm_head_transform=True, param_counts={"teacher": 10, "student": 6})


@pytest.fixture(scope="module")
def complete_stages(tmp_path_factory) -> dict[str, dict]:
    """The manifests of a complete init-student and finetune stage (the ones whose facts other stages read)."""
    run_dir = tmp_path_factory.mktemp("manifests") / "run"
    cfg = compose_config("finetune", [f"run_dir={run_dir}", "task.names=[rte]"])
    with open_stage(cfg, artifacts.INIT_STUDENT) as stage:
        (stage.path / "model").mkdir()
        (stage.path / "model" / "config.json").write_text("{}")
        stage.update(**FACTS.as_manifest())
    with open_stage(cfg, artifacts.FINETUNE) as stage:
        (stage.path / "student" / "rte" / "seed-1").mkdir(parents=True)
        (stage.path / "student" / "rte" / "seed-1" / "predictions.jsonl").write_text("{}\n")
        stage.update(data_problems={"rte": {"dev": {"malformed rows": 1}}})
    return {stage: read_manifest(run_dir / stage) for stage in (artifacts.INIT_STUDENT, artifacts.FINETUNE)}


@budget("readers")
@given(data=st.data(), stage=st.sampled_from([artifacts.INIT_STUDENT, artifacts.FINETUNE]))
def test_a_manifest_is_read_or_refused(tmp_path_factory, complete_stages, data, stage):
    document = data.draw(mutated(complete_stages[stage]))
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp))
        stage_dir = run.stage_dir(stage)
        for name in complete_stages[stage]["files"]:
            (stage_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (stage_dir / name).write_text("{}" if name.endswith(".json") else "{}\n")
        (stage_dir / MANIFEST).write_text(json.dumps(document))

        def read():
            manifest = read_manifest(stage_dir)
            if run.complete(stage) is None:
                return run.require(stage)
            verify_outputs(stage_dir, manifest)
            if stage == artifacts.INIT_STUDENT:
                return artifacts.init_student_facts(run), artifacts.recorded_teacher(run)
            return finetune_notes(manifest, stage_dir / MANIFEST, [get_task("rte")])

        refused_or_read(read)


# ---- checkpoint JSON -------------------------------------------------------------------------------------------

TRAINER = {"step": 2, "tokens_seen": 100, "bad_steps": 0,
           "log_window": {"micro_batches": 2, "names": ["loss"], "sums": [[1.5]]},
           "best_score": 71.5, "best_step": 2, "stale_evaluations": 0, "stopped_early": False,
           "resume_state": {"seed": 1, "loss": {"alpha_ce": 5.0}, "inputs": {"prepare-data": "sha256:ab"}}}
SCHEDULER = {"base_lrs": [0.001], "last_epoch": 2, "_step_count": 3, "_is_initial": False,
             "_get_lr_called_within_step": False, "_last_lr": [0.0005], "lr_lambdas": [{}]}


@budget("readers")
@given(trainer=mutated(TRAINER), scheduler=mutated(SCHEDULER))
def test_checkpoint_json_is_read_or_refused(trainer, scheduler):
    import torch
    from transformers import get_linear_schedule_with_warmup

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        for name in ("model.safetensors", "optimizer.safetensors"):
            (checkpoint / name).write_bytes(b"")
        (checkpoint / TRAINER_STATE).write_text(json.dumps(trainer))
        (checkpoint / "scheduler.json").write_text(json.dumps(scheduler))
        state = refused_or_read(lambda: read_checkpoint(checkpoint, TRAINER["resume_state"], "train.resume"))
        assert state is None or state.step >= 0 and state.tokens_seen >= 0
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        fresh = get_linear_schedule_with_warmup(optimizer, 1, 10)
        if (saved := refused_or_read(lambda: read_state_json(checkpoint / "scheduler.json",
                                                             fresh.state_dict()))) is not None:
            fresh.load_state_dict(saved)
            optimizer.step()
            fresh.step()  # a state that loads also steps
