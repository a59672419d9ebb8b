"""The other general-distillation methods end to end on tiny models: TinyBERT, MobileBERT, MiniLM and MiniLMv2,
each an experiment over the same prepared data and teacher (init-student, train, then finetune on the GLUE
fixture), and the settings they refuse in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builders import GLUE_DIR, build_tiny_bert, write_corpus
from safetensors.torch import load_file
from typer.testing import CliRunner

from distilbert_cli.cli import app
from distilbert_cli.rundir import read_manifest

runner = CliRunner()
# The 32-wide MobileBERT's embeddings are as wide as its blocks, so its MLM head has no extra dense part.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
TRAIN = ["+debug=tiny", "train.max_steps=2", "validation.max_sequences=8"]
FINETUNE = ["finetune.models=[student]", "task.names=[rte]", f"task.data_dir={GLUE_DIR}", "finetune.epochs=1",
            "finetune.max_train_samples=16", "finetune.max_eval_samples=16", "task.max_seq_length=32"]
# Each experiment's student at a tiny width (the papers' shapes are the experiments' defaults).
TINY_STUDENTS = {
    "tinybert_general": ["student.num_layers=2", "student.hidden_size=16", "student.num_attention_heads=4",
                         "student.intermediate_size=32"],
    "mobilebert": ["student.hidden_size=16", "student.num_attention_heads=2"],
    "minilm": ["student.num_layers=2", "student.hidden_size=16", "student.intermediate_size=32"],
    "minilmv2": ["student.num_layers=2", "student.hidden_size=24", "student.num_attention_heads=3",
                 "student.intermediate_size=48"],
}


def distil(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-layer, 32-wide teacher with 4 heads, and a run directory holding its prepared corpus."""
    root = tmp_path_factory.mktemp("methods")
    teacher = build_tiny_bert(root / "teacher", num_layers=4, num_heads=4)
    corpus = write_corpus(root / "corpus.txt", n_lines=40)
    distil("prepare-data", f"run_dir={root / 'data'}", f"teacher.name_or_path={teacher}", "data=local",
           f"data.paths=[{corpus}]", "prepare.validation_size=8", "prepare.num_proc=1", "prepare.max_seq_length=48")
    return teacher, root / "data"


# 4 layers: 0.8 of 5 steps = one step per layer stage, then one step of pre-training distillation. MiniLMv2: 24
# wide with 3 heads against 32 wide with 4: 4 relation heads divide both widths.
TRAIN_OVERRIDES = {"mobilebert": ["train.max_steps=5", "train.log_every=10", "train.progressive_transfer=0.8"],
                   "minilmv2": ["loss.relation_heads=4", "loss.teacher_layer=2"]}


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory) -> dict[str, Path]:
    """Each experiment's run over the same prepared data and teacher: init-student, train, finetune on RTE rows."""
    teacher, data = prepared
    runs = {}
    for experiment in TINY_STUDENTS:
        run_dir = runs[experiment] = tmp_path_factory.mktemp("runs") / experiment
        shutil.copytree(data, run_dir)
        distil("init-student", f"run_dir={run_dir}", f"teacher.name_or_path={teacher}", f"+experiment={experiment}",
               *TINY_STUDENTS[experiment])
        distil("train", f"run_dir={run_dir}", f"+experiment={experiment}", *TRAIN,
               *TRAIN_OVERRIDES.get(experiment, []))
        distil("finetune", f"run_dir={run_dir}", *FINETUNE)
        distil("evaluate", f"run_dir={run_dir}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}")
    return runs


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]


def loss_keys(record: dict) -> set[str]:
    return {key for key in record if key.startswith("loss_")}


def finetuned_accuracy(run_dir: Path) -> float:
    """The fine-tuned student's RTE dev accuracy (in %): the distilled student loads and trains as a classifier."""
    (path,) = (run_dir / "finetune" / "student" / "rte").glob("seed-*/metrics.json")
    return json.loads(path.read_text())["metrics"]["accuracy"]


@pytest.mark.slow
def test_tinybert_general(runs):
    run_dir = runs["tinybert_general"]
    init = read_manifest(run_dir / "init-student")
    assert (init["student_class"], init["strategy"]) == ("BertForMaskedLM", "random")
    distill = read_manifest(run_dir / "distill")
    assert distill["layer_pairs"] == [[0, 1], [1, 3]]  # student layer m <- teacher layer m * 4 / 2
    assert all(loss_keys(r) == {"loss_embed", "loss_hidden", "loss_attn_scores"} for r in metrics(run_dir))
    # W_e and W_h (16 -> 32) are trained with the student and dropped from the distilled model.
    trained = load_file(run_dir / "distill" / "checkpoints" / "step-2" / "model.safetensors")
    assert trained["projections.embed.weight"].shape == trained["projections.hidden.weight"].shape == (32, 16)
    assert not any(name.startswith("projections") for name in load_file(run_dir / "distill" / "final" /
                                                                           "model.safetensors"))
    assert 0 <= finetuned_accuracy(run_dir) <= 100


@pytest.mark.slow
def test_mobilebert_with_progressive_transfer(runs):
    run_dir = runs["mobilebert"]
    init = read_manifest(run_dir / "init-student")
    assert init["student_class"] == "MobileBertForMaskedLM" and init["layer_map"] == [None] * 4
    config = json.loads((run_dir / "distill" / "final" / "config.json").read_text())
    assert (config["hidden_size"], config["intra_bottleneck_size"], config["num_hidden_layers"]) == (32, 16, 4)
    assert read_manifest(run_dir / "distill")["layer_pairs"] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    rows = metrics(run_dir)  # a line at each stage's end, whatever log_every says
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "layer 0"), (2, "layer 1"), (3, "layer 2"),
                                                       (4, "layer 3"), (5, "pretraining distillation")]
    assert all(loss_keys(r) == {"loss_hidden", "loss_attn_kl"} for r in rows[:4])
    assert loss_keys(rows[4]) == {"loss_ce", "loss_mlm"}
    assert 0 <= finetuned_accuracy(run_dir) <= 100


@pytest.mark.slow
def test_minilm(runs):
    run_dir = runs["minilm"]
    assert read_manifest(run_dir / "distill")["layer_pairs"] == [[1, 3]]  # last layer <- last layer
    assert all(loss_keys(r) == {"loss_attn_kl", "loss_value_relation"} for r in metrics(run_dir))
    assert 0 <= finetuned_accuracy(run_dir) <= 100


@pytest.mark.slow
def test_minilmv2_any_width_and_head_count_from_a_chosen_teacher_layer(runs):
    run_dir = runs["minilmv2"]
    assert read_manifest(run_dir / "distill")["layer_pairs"] == [[1, 2]]
    rows = metrics(run_dir)
    assert all(loss_keys(r) == {"loss_query_relation", "loss_key_relation", "loss_value_relation"} for r in rows)
    assert all(r["loss"] > 0 for r in rows)
    assert 0 <= finetuned_accuracy(run_dir) <= 100


@pytest.mark.slow
def test_report_compares_the_methods_side_by_side(runs):
    main, *baselines = runs.values()
    distil("report", str(main), f"report.baselines=[{','.join(str(run) for run in baselines)}]",
           "report.bootstrap_resamples=20")
    report = (main / "report" / "report.md").read_text()
    ablation = report.split("### Held-out masked-token prediction")[0]  # the ablation table's rows
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in ablation.splitlines() if line.startswith("| ")}
    assert "embed 1, hidden 1, attn_scores 1" in rows["tinybert_general"] and "Bert " in rows["tinybert_general"]
    assert "mlm 0.5, ce 0.5, hidden 1, attn_kl 1" in rows["mobilebert"] and "MobileBert " in rows["mobilebert"]
    assert "query_relation 1, key_relation 1, value_relation 1" in rows["minilmv2"]
    # their validation MLM and downstream figures, whatever the objective
    for name, run in runs.items():
        validation = json.loads((run / "distill" / "validation.json").read_text())
        assert f"{validation['student']['mlm_loss']:.3f}" in rows[name]
        assert f"| {finetuned_accuracy(run):.1f} |" in rows[name]
    assert "the MLM head of tinybert_general, minilm, minilmv2 is as initialised" in report
    # compared downstream only: an untrained head's validation MLM says nothing about the encoder
    assert "- tinybert_general vs mobilebert:\n  - downstream" in report and "validation MLM on" not in report
    assert "95% paired-bootstrap interval" in report
    assert (main / "report" / "loss_curves.png").stat().st_size > 0


def train_error(prepared, tmp_path, experiment: str, init_overrides: list[str], *train_overrides: str) -> str:
    teacher, data = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(data, run_dir)
    distil("init-student", f"run_dir={run_dir}", f"teacher.name_or_path={teacher}", f"+experiment={experiment}",
           *init_overrides)
    result = runner.invoke(app, ["train", f"run_dir={run_dir}", f"+experiment={experiment}", *TRAIN,
                                 *train_overrides])
    assert result.exit_code == 2, result.output
    return result.output


@pytest.mark.parametrize(("experiment", "init_overrides", "train_overrides", "message"), [
    ("minilmv2", TINY_STUDENTS["minilmv2"], [],
     "loss.alpha_query_relation: 48 relation heads (loss.relation_heads) do not divide the query width of the "
     "student (24) and the teacher (32)"),
    ("minilm", [*TINY_STUDENTS["minilm"], "student.num_attention_heads=8"], [],
     "loss.alpha_attn_kl: the student's 8 attention heads must divide the teacher's 4"),
    ("tinybert_general", [*TINY_STUDENTS["tinybert_general"], "student.num_attention_heads=2"], [],
     "loss.alpha_attn_scores needs equal head counts (student 2, teacher 4)"),
    ("minilm", TINY_STUDENTS["minilm"], ["loss.teacher_layer=4"], "loss.teacher_layer=4: the teacher has layers 0..3"),
    ("mobilebert", TINY_STUDENTS["mobilebert"], [],
     "train.progressive_transfer=0.5 of 2 steps leaves no step per layer (4 layers)"),
    ("minilm", TINY_STUDENTS["minilm"], ["train.progressive_transfer=0.5"],
     "train.progressive_transfer needs a layer-wise term"),
])
def test_impossible_method_settings_exit_2_in_one_line(prepared, tmp_path, experiment, init_overrides,
                                                       train_overrides, message):
    last_line = train_error(prepared, tmp_path, experiment, init_overrides, *train_overrides).strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line


def test_mobilebert_student_cannot_copy_teacher_layers(prepared, tmp_path):
    teacher, _ = prepared
    result = runner.invoke(app, ["init-student", f"run_dir={tmp_path}", f"teacher.name_or_path={teacher}",
                                 "+experiment=mobilebert", "init.strategy=uniform"])
    assert result.exit_code == 2
    assert "student.arch=mobilebert has no layer the teacher's weights fit: use init.strategy=random" in result.output
