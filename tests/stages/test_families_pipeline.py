"""Every stage on every teacher family, through the `distil` CLI on tiny teachers built in code: prepare-data
(byte-level BPE and Unigram tokenizers, with or without the word memo), init-student with the defaults, a 2-step
train with every loss term, finetune (classification and regression) and bench-cpu (the STS-B regression head,
eager and ONNX). BERT runs the same pipeline in tests/test_pipeline.py."""

from __future__ import annotations

import json
import math

import pytest
from builders import GLUE_DIR, TINY_TEACHERS, write_corpus
from transformers import AutoConfig
from typer.testing import CliRunner

from distilbert_cli.cli import app
from distilbert_cli.models.families import family_of, max_sequence_length
from distilbert_cli.rundir import read_manifest
from distilbert_cli.training.losses import LOSS_TERMS

ATTENTION_NEEDS = {"query", "key", "value"}

runner = CliRunner()
# Tiny teacher -> (whether prepare-data memoizes its tokenizer word by word, the default student's class). The
# RoBERTa family runs as XLM-R (Unigram tokenizer); ModernBERT brings the byte-level BPE tokenizer.
FAMILIES = {
    "xlm-roberta": (True, "XLMRobertaForMaskedLM"),
    "electra": (True, "ElectraForMaskedLM"),
    "deberta-v2": (False, "DebertaV2ForMaskedLM"),
    "modernbert": (False, "ModernBertForMaskedLM"),
    "distilbert": (True, "DistilBertForMaskedLM"),
}
GLUE = [f"task.data_dir={GLUE_DIR}"]


def distil(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_runs_for_the_family(tmp_path, family):
    memoized, student_class = FAMILIES[family]
    teacher = TINY_TEACHERS[family](tmp_path / "teacher", num_layers=4)
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=40)
    run = f"run_dir={tmp_path / 'run'}"

    distil("prepare-data", run, f"teacher.name_or_path={teacher}", "data=local", f"data.paths=[{corpus}]",
           "prepare.validation_size=8", "prepare.num_proc=1", "prepare.max_seq_length=48")
    stats = json.loads((tmp_path / "run" / "prepare-data" / "stats.json").read_text())
    assert stats["word_memo"]["used"] is memoized, stats["word_memo"]
    assert read_manifest(tmp_path / "run" / "prepare-data")["word_memo"] is memoized

    distil("init-student", run, f"teacher.name_or_path={teacher}")  # the defaults: half the layers, auto
    facts = read_manifest(tmp_path / "run" / "init-student")
    assert (facts["layer_map"], facts["student_class"]) == ([0, 3], student_class)

    # Every loss term the family's table entry allows (the attention ones need its query/key/value modules).
    teacher_family = family_of(AutoConfig.from_pretrained(teacher))
    terms = [name for name, term in LOSS_TERMS.items()
             if all(getattr(teacher_family, f"attention_{kind}") for kind in ATTENTION_NEEDS & term.needs)]
    distil("train", run, "+experiment=triple_loss", "+debug=tiny", "train.max_steps=2",
           *(f"loss.alpha_{name}=1.0" for name in terms if name not in ("ce", "mlm", "cos")))
    last = json.loads((tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and all(math.isfinite(last[f"loss_{name}"]) for name in terms), last

    distil("finetune", run, "task.names=[rte,stsb]", *GLUE, "finetune.epochs=1", "finetune.max_train_samples=32",
           "finetune.max_eval_samples=16", "task.max_seq_length=48", "finetune.save_models=false")
    for task, metric in (("rte", "accuracy"), ("stsb", "pearson")):  # a classification and a regression head
        result = json.loads((tmp_path / "run" / "finetune" / "student" / task / "seed-56" / "metrics.json").read_text())
        assert math.isfinite(result["metrics"][metric]) and result["train_examples"] == 32, result

    bench = [run, *GLUE, "bench.models=[student]"]
    longest = max_sequence_length(AutoConfig.from_pretrained(teacher))  # XLM-R: 130 positions, 128 tokens
    refused = runner.invoke(app, ["bench-cpu", *bench, f"task.max_seq_length={longest + 1}"])
    assert refused.exit_code == 2 and f"exceeds the {longest} tokens model student takes" in refused.output
    distil("bench-cpu", *bench, "bench.backends=[eager,onnx]", "bench.max_examples=4", "bench.warmup_batches=0",
           "bench.repeats=1", "bench.check_examples=4", "bench.num_threads=1", "task.max_seq_length=48")
    results = json.loads((tmp_path / "run" / "bench-cpu" / "results.json").read_text())
    assert all(row["status"] == "ok" for row in results["results"]), results["results"]
    (check,) = results["checks"]
    assert (check["backend"], check["examples"]) == ("onnx", 4) and check["max_abs_diff"] < 1e-4, check
