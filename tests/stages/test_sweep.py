"""distil sweep end to end on tiny models: the paper's Table 4 as one command (shared prepare-data, a member planted
to fail, the report's member table, a re-run that skips), a member failing at run time while the others go on,
the status view, and the submitit path (members as jobs of their own)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from builders import GLUE_DIR, write_corpus
from typer.testing import CliRunner

from distilbert_cli.cli import app
from distilbert_cli.logs import LOGGER_NAME
from distilbert_cli.rundir import read_manifest

runner = CliRunner()
PREPARE = ["data=local", "prepare.validation_size=12", "prepare.num_proc=1", "prepare.max_seq_length=64"]
FINETUNE_SMOKE = ["finetune.models=[student]", "task.names=[rte]", f"task.data_dir={GLUE_DIR}", "finetune.epochs=1",
                  "finetune.max_train_samples=32", "finetune.max_eval_samples=32", "task.max_seq_length=64"]
TABLE4 = "+experiment=triple_loss,no_ce,no_cos,no_mlm,random_init,does_not_exist"  # the last: planted to fail


def distil(*args: str):
    """`distil ARGS` in this process, its log on this invocation's output (the console handler made anew)."""
    logging.getLogger(LOGGER_NAME).handlers.clear()
    return runner.invoke(app, list(args))


def members_of(root: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted((root / "sweep").iterdir()) if path.is_dir() and
            not path.name.startswith(".")}


def inodes(path: Path) -> set[int]:
    return {p.stat().st_ino for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def table4(tmp_path_factory, tiny_teacher):
    """prepare-data once in the sweep's run dir, then the five Table 4 runs and a member that cannot compose, two at
    a time; then the same sweep again."""
    root = tmp_path_factory.mktemp("t4") / "t4"
    corpus = write_corpus(root.parent / "corpus.txt")
    result = distil("prepare-data", f"run_dir={root}", f"teacher.name_or_path={tiny_teacher}",
                    f"data.paths=[{corpus}]", *PREPARE)
    assert result.exit_code == 0, result.output
    sweep = ["sweep", str(root), "sweep.stages=[init-student,train,finetune,evaluate]", TABLE4, "sweep.parallel=2",
             f"teacher.name_or_path={tiny_teacher}", "student.num_layers=2", "+debug=tiny", *FINETUNE_SMOKE]
    first = distil(*sweep)
    started = {name: read_manifest(path / "distill")["started_at"] for name, path in members_of(root).items()
               if (path / "distill").exists()}
    again = distil(*sweep)
    return root, first, again, started


@pytest.mark.slow  # 5 members x 4 stage processes on tiny models: ~3 minutes on 2 cores
def test_table4_sweep_runs_every_member_shares_prepare_data_and_ends_with_the_member_table(table4):
    root, first, _, _ = table4
    assert first.exit_code == 2
    lines = first.output.strip().splitlines()
    assert lines[-1] == ("error: 1 of 6 sweep member(s) failed: +experiment=does_not_exist (not run: init-student: "
                         "In 'init_student': Could not find 'experiment/does_not_exist')")
    table = lines[lines.index("## Sweep members"):-1]  # the report's member table ends the output
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table if line.startswith("| +experiment=")}
    assert list(rows) == [f"+experiment={e}" for e in ("triple_loss", "no_ce", "no_cos", "no_mlm", "random_init",
                                                        "does_not_exist")]
    assert "| complete |" in rows["+experiment=no_ce"] and "| -2.96 |" in rows["+experiment=no_ce"]
    assert "| random |" in rows["+experiment=random_init"] and "| -3.69 |" in rows["+experiment=random_init"]
    assert "failed: init-student: In 'init_student': Could not find" in rows["+experiment=does_not_exist"]

    members = members_of(root)
    prepared = read_manifest(root / "prepare-data")
    for name in ("triple_loss", "no_ce", "no_cos", "no_mlm", "random_init"):
        member = members[f"+experiment={name}"]
        for stage in ("init-student", "distill", "finetune", "evaluate"):
            assert read_manifest(member / stage)["status"] == "complete", (name, stage)
        assert not (member / "prepare-data").exists()  # not copied, not linked
        used = [i for i in read_manifest(member / "distill")["inputs"] if i.get("stage") == "prepare-data"]
        assert used == [{"stage": "prepare-data", "path": str(root / "prepare-data"),
                         "fingerprint": prepared["fingerprint"], "run_dir": str(root)}]  # the upstream run's
        config = read_manifest(member / "distill")["config"]
        assert config["run_dir"] == str(member) and config["upstream_run_dir"] == str(root)
    assert not inodes(root / "sweep") & inodes(root / "prepare-data")  # no hard link either
    weights = {name: read_manifest(members[f"+experiment={name}"] / "distill")["config"]["loss"]["alpha_ce"]
               for name in ("triple_loss", "no_ce")}
    assert weights == {"triple_loss": 5.0, "no_ce": 0.0}
    outcome = json.loads((members["+experiment=does_not_exist"] / "member.json").read_text())
    assert outcome["status"] == "failed" and "experiment/does_not_exist" in outcome["error"]

    report = read_manifest(root / "report")
    assert report["status"] == "complete" and report["reference"] == "+experiment=triple_loss"
    comparison = report["downstream_comparisons"]["+experiment=no_ce"]
    assert comparison["low"] <= comparison["difference"] <= comparison["high"]
    assert comparison["dev_examples"] == 32  # RTE dev, capped at 32
    # the members share prepare-data, so their held-out MLM targets: compared with the reference target by target
    paired = report["mlm_comparisons"]["+experiment=no_ce"]["uniform"]["mlm_loss"]
    assert paired["low"] <= paired["mean"] <= paired["high"]
    text = (root / "report" / "report.md").read_text()
    assert "- +experiment=no_ce vs +experiment=triple_loss:\n  - validation MLM on uniform masks" in text
    assert "Δ compares students fine-tuned at equal steps (no model selection" in text
    assert "Δ compares students fine-tuned at equal steps (no model selection" in first.output  # printed by sweep
    assert "## Fine-tuning budgets (one value per seed)" in text


@pytest.mark.slow
def test_running_the_sweep_again_skips_complete_members_and_retries_the_failed_one(table4):
    root, _, again, started = table4
    assert again.exit_code == 2 and "+experiment=does_not_exist (not run" in again.output.splitlines()[-1]
    for name in ("triple_loss", "no_ce", "no_cos", "no_mlm", "random_init"):
        assert f"member +experiment={name}: complete, skipped" in again.output
    for name, path in members_of(root).items():
        if name in started:
            assert read_manifest(path / "distill")["started_at"] == started[name], name


def test_a_member_failing_at_run_time_leaves_the_other_complete_and_is_retried(tmp_path, tiny_teacher):
    root = tmp_path / "layers"
    sweep = ["sweep", str(root), "sweep.stages=[init-student]", "student.num_layers=2,13",
             f"teacher.name_or_path={tiny_teacher}"]
    result = distil(*sweep)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: 1 of 2 sweep member(s) failed: student.num_layers=13 (init-student: student.num_layers=13: the student "
        "needs 1 to 12 layers (the teacher has 12))")
    good, bad = root / "sweep" / "student.num_layers=2", root / "sweep" / "student.num_layers=13"
    assert read_manifest(good / "init-student")["status"] == "complete"
    assert read_manifest(bad / "init-student") is None  # refused before the stage opened
    assert "$ " in (bad / "sweep-log.txt").read_text()  # the stage's own output, its command first
    status = distil(*sweep, "sweep.status=true")
    assert status.exit_code == 0
    rows = [line for line in status.output.splitlines() if line.startswith("| student")]
    assert rows == ["| student.num_layers=2 | complete | complete |  |",
                    "| student.num_layers=13 | failed | pending | student.num_layers=13: the student needs 1 to 12 "
                    "layers (the teacher has 12) |"]
    started = read_manifest(good / "init-student")["started_at"]
    again = distil(*sweep)
    assert "member student.num_layers=2: complete, skipped" in again.output
    assert "member student.num_layers=13: running init-student" in again.output
    assert read_manifest(good / "init-student")["started_at"] == started
    changed = distil(*sweep, "seed=3")  # complete stages that ran with other overrides are not taken as done
    assert "student.num_layers=2 (not run: its complete init-student ran with other overrides" in changed.output


@pytest.mark.slow  # two submitit jobs, each a fresh interpreter running init-student (~1 min on 2 cores)
def test_submitit_local_runs_each_member_as_a_job_of_its_own(tmp_path, tiny_teacher):
    """The slurm code path (submitit), on this machine: each member runs in a job process of its own."""
    root = tmp_path / "jobs"
    result = distil("sweep", str(root), "sweep.stages=[init-student]", "sweep.launcher=submitit_local",
                    "sweep.slurm.gpus_per_node=0", "sweep.slurm.timeout_min=10", "student.num_layers=1,2",
                    f"teacher.name_or_path={tiny_teacher}")
    assert result.exit_code == 0, result.output
    assert re.search(r"submitted 2 job\(s\) \(local\): \d+, \d+", result.output)
    outcomes = [json.loads((root / "sweep" / f"student.num_layers={n}" / "member.json").read_text()) for n in (1, 2)]
    assert [o["status"] for o in outcomes] == ["complete", "complete"]
    pids = {o["pid"] for o in outcomes}
    assert len(pids) == 2 and os.getpid() not in pids
    assert len([p for p in (root / "sweep" / ".submitit").iterdir() if p.name.isdigit()]) == 2  # a folder per job
    for n in (1, 2):
        manifest = read_manifest(root / "sweep" / f"student.num_layers={n}" / "init-student")
        assert manifest["status"] == "complete" and manifest["config"]["student"]["num_layers"] == n
