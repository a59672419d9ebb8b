"""The run-directory contract: manifests, completion, refusal to overwrite or to consume incomplete stages."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest

from distilbert_cli.errors import Interrupted, UsageError
from distilbert_cli.rundir import MANIFEST, Run, fingerprint, folder_name_problem, readers_path
from distilbert_cli.schema import Common

MANIFEST_FIELDS = {"stage", "status", "config", "overrides", "inputs", "versions", "git_commit",
                   "started_at", "ended_at", "fingerprint"}


def _cfg(run_dir, overwrite=False, upstream=None):
    return Common(run_dir=str(run_dir), overwrite=overwrite, seed=1, trust_remote_code=False,
                  upstream_run_dir=None if upstream is None else str(upstream))


def open_stage(cfg, stage, overrides=(), **kwargs):
    return Run.of(cfg).open_stage(stage, cfg, overrides, **kwargs)


def _manifest(stage_dir):
    return json.loads((stage_dir / MANIFEST).read_text())


def test_complete_stage_has_every_manifest_field(run_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello\n")
    with open_stage(_cfg(run_dir), "prepare-data", ["seed=1"]) as stage:
        assert _manifest(stage.path)["status"] == "running"
        stage.use_path(corpus, "corpus")
        (stage.path / "out.txt").write_text("data")
    manifest = _manifest(run_dir / "prepare-data")
    assert manifest.keys() >= MANIFEST_FIELDS
    assert manifest["status"] == "complete" and manifest["overrides"] == ["seed=1"]
    assert manifest["inputs"][0]["fingerprint"] == fingerprint(corpus)
    assert manifest["versions"]["torch"] and manifest["ended_at"]
    assert (run_dir / "prepare-data" / "log.txt").read_text()


def test_crash_leaves_a_failed_not_complete_stage(run_dir):
    with pytest.raises(RuntimeError), open_stage(_cfg(run_dir), "init-student"):
        raise RuntimeError("boom")
    assert _manifest(run_dir / "init-student")["status"] == "failed"
    with pytest.raises(UsageError, match="not complete.*init-student"):
        Run(run_dir).require("init-student")


def test_complete_stage_is_not_overwritten_without_overwrite(run_dir):
    with open_stage(_cfg(run_dir), "bench-cpu") as stage:
        (stage.path / "results.json").write_text("{}")
    with pytest.raises(UsageError, match=f"already complete: {run_dir / 'bench-cpu'}"), \
            open_stage(_cfg(run_dir), "bench-cpu"):
        pass
    assert (run_dir / "bench-cpu" / "results.json").exists()
    with open_stage(_cfg(run_dir, overwrite=True), "bench-cpu"):
        pass
    assert not (run_dir / "bench-cpu" / "results.json").exists()


def test_missing_input_stage_is_refused_with_its_path(run_dir):
    with pytest.raises(UsageError, match=str(run_dir / "prepare-data")), open_stage(_cfg(run_dir), "distill") as stage:
        stage.use_stage("prepare-data")


def test_consumed_stage_fingerprint_is_recorded(run_dir):
    with open_stage(_cfg(run_dir), "prepare-data") as stage:
        (stage.path / "data.bin").write_bytes(b"123")
    with open_stage(_cfg(run_dir), "distill") as stage:
        stage.use_stage("prepare-data")
    recorded = _manifest(run_dir / "distill")["inputs"][0]
    assert recorded["fingerprint"] == _manifest(run_dir / "prepare-data")["fingerprint"]
    assert recorded["fingerprint"] == fingerprint(run_dir / "prepare-data")


def test_partial_files_are_kept_only_when_asked(run_dir):
    with pytest.raises(RuntimeError), open_stage(_cfg(run_dir), "distill") as stage:
        (stage.path / "checkpoint").write_text("step 5")
        raise RuntimeError
    with open_stage(_cfg(run_dir), "distill", keep_partial=True) as stage:
        assert (stage.path / "checkpoint").exists()
    with open_stage(_cfg(run_dir, overwrite=True), "distill") as stage:
        assert not (stage.path / "checkpoint").exists()


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a").write_text("x")
    before = fingerprint(tmp_path)
    (tmp_path / "a").write_text("y")
    assert fingerprint(tmp_path) != before


# ---- read locks, paths into other runs, the end-of-stage checks ---------------------------------------------------

def _complete(run_dir, stage="distill", files=None):
    """A complete stage of `run_dir` holding `files` ({relative name: text})."""
    with open_stage(_cfg(run_dir), stage) as opened:
        for name, text in (files or {"final/model.safetensors": "weights"}).items():
            (opened.path / name).parent.mkdir(parents=True, exist_ok=True)
            (opened.path / name).write_text(text)
    return run_dir / stage


def test_a_stage_read_cannot_be_rewritten_and_names_its_reader(run_dir):
    _complete(run_dir)
    with open_stage(_cfg(run_dir), "finetune") as reader:
        reader.use_stage("distill")
        with pytest.raises(UsageError, match=rf"stage distill of {run_dir} is being read by stage finetune of "
                                             rf"{run_dir} \(pid {os.getpid()} on .*\(lock {run_dir}/.distill.lock\)"), \
                open_stage(_cfg(run_dir, overwrite=True), "distill"):
            pass
        assert (run_dir / "distill" / "final" / "model.safetensors").read_text() == "weights"  # untouched
        assert len(list(readers_path(run_dir, "distill").iterdir())) == 1
    assert not list(readers_path(run_dir, "distill").iterdir())  # the record goes with the reader
    with open_stage(_cfg(run_dir, overwrite=True), "distill"):  # nobody reads it now
        pass


def test_a_stage_being_written_cannot_be_read(run_dir):
    _complete(run_dir)
    written = rf"input stage distill of {run_dir} is being written by pid {os.getpid()}"
    with open_stage(_cfg(run_dir, overwrite=True), "distill"), pytest.raises(UsageError, match=written), \
            open_stage(_cfg(run_dir), "finetune") as reader:
        reader.use_stage("distill")
    assert _manifest(run_dir / "finetune")["status"] == "failed"


def test_a_killed_readers_record_is_cleared_by_the_next_writer(run_dir):
    _complete(run_dir)
    readers_path(run_dir, "distill").mkdir(exist_ok=True)
    (readers_path(run_dir, "distill") / "gone.json").write_text(json.dumps(
        {"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "stage": "finetune"}))  # no such process
    with open_stage(_cfg(run_dir, overwrite=True), "distill"):
        assert not list(readers_path(run_dir, "distill").iterdir())


def test_an_input_rewritten_while_the_stage_runs_fails_it(run_dir):
    stage_dir = _complete(run_dir)
    with pytest.raises(UsageError, match=f"input {stage_dir / 'final' / 'model.safetensors'} changed while stage "
                                         "finetune read it \\(rewritten\\)"), \
            open_stage(_cfg(run_dir), "finetune") as reader:
        reader.use_stage("distill")
        (stage_dir / "final" / "model.safetensors").write_text("other!!")  # as a writer that ignores the lock would
    assert _manifest(run_dir / "finetune")["status"] == "failed"


def test_an_input_stage_replaced_while_the_stage_runs_fails_it(run_dir):
    stage_dir = _complete(run_dir)
    with pytest.raises(UsageError, match="input stage distill of .* changed while stage finetune ran \\(now "
                                         "complete, fingerprint sha256:0+\\)"), \
            open_stage(_cfg(run_dir), "finetune") as reader:
        reader.use_stage("distill", reads="nothing-read")
        manifest = _manifest(stage_dir)
        (stage_dir / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": "sha256:" + "0" * 64}))
    assert _manifest(run_dir / "finetune")["status"] == "failed"


def test_a_path_into_another_runs_stage_is_verified_and_recorded(tmp_path):
    other = tmp_path / "other"
    stage_dir = _complete(other, "task-distill", {"transfer/data.arrow": "rows", "transfer/state.json": "{}"})
    transfer = stage_dir / "transfer"
    with open_stage(_cfg(tmp_path / "run"), "task-distill") as consumer:
        consumer.use_path(transfer, "transfer set")
    (entry,) = _manifest(tmp_path / "run" / "task-distill")["inputs"]
    assert entry == {"role": "transfer set", "path": str(transfer.resolve()), "fingerprint": fingerprint(transfer),
                     "from_stage": {"run_dir": str(other.resolve()), "stage": "task-distill",
                                    "fingerprint": _manifest(stage_dir)["fingerprint"]}}

    (transfer / "data.arrow").write_text("ROWS")  # corrupted in place
    with pytest.raises(UsageError, match=f"{transfer / 'data.arrow'} has changed since stage task-distill wrote it"), \
            open_stage(_cfg(tmp_path / "run", overwrite=True), "task-distill") as consumer:
        consumer.use_path(transfer, "transfer set")


def test_a_path_into_an_unfinished_stage_of_another_run_is_refused(tmp_path):
    other = tmp_path / "other"
    with pytest.raises(RuntimeError), open_stage(_cfg(other), "task-distill") as killed:
        (killed.path / "transfer").mkdir()
        (killed.path / "transfer" / "data.arrow").write_text("half")
        raise RuntimeError("killed")
    with pytest.raises(UsageError, match=f"input stage task-distill is not complete \\(status 'failed'\\): "
                                         f"{(other / 'task-distill').resolve()}"), \
            open_stage(_cfg(tmp_path / "run"), "task-distill") as consumer:
        consumer.use_path(other / "task-distill" / "transfer", "transfer set")


def test_a_path_inside_the_stage_being_written_is_refused(run_dir):
    with pytest.raises(RuntimeError), open_stage(_cfg(run_dir), "distill") as interrupted:
        (interrupted.path / "checkpoint").mkdir()
        (interrupted.path / "checkpoint" / "model.safetensors").write_text("weights")
        raise RuntimeError
    with pytest.raises(UsageError, match="inside the folder of stage distill itself"), \
            open_stage(_cfg(run_dir), "distill", keep_partial=True) as stage:
        stage.use_path(stage.path / "checkpoint", "student")


def test_a_stage_missing_what_it_must_leave_is_failed_not_complete(run_dir):
    with pytest.raises(UsageError, match=f"stage bench-cpu did no work: {run_dir / 'bench-cpu' / 'results.json'} is "
                                         "empty; the stage is failed, not complete"), \
            open_stage(_cfg(run_dir), "bench-cpu") as stage:
        stage.expect("results.json", "results.md")
        (stage.path / "results.json").write_text("")
        (stage.path / "results.md").write_text("# table")
    assert _manifest(run_dir / "bench-cpu")["status"] == "failed"


@pytest.mark.parametrize(("name", "problem"), [
    ("..", "'..' is not a folder of its own"), (".", "'.' is not a folder of its own"), ("", "it is empty"),
    ("a/b", "path separator"), ("a\\b", "path separator"), ("tab\there", "control or unprintable"),
    ("nul\0", "control or unprintable"), (".tmp-x", "starts with a dot"), ("x" * 101, "longer than 100"),
    ("é" * 100, None), ("bert-base_v2.1", None),
])
def test_folder_names_are_single_safe_components(name, problem):
    found = folder_name_problem(name)
    assert (found is None) if problem is None else problem in found


@pytest.mark.parametrize(("change", "message"), [
    ({"files": 5}, "files is not a JSON object"),
    ({"files": {"a": 1}}, "files.a is not a string"),
    ({"status": None}, "status is not a string"),
    ({"stage": "train"}, "it is the manifest of stage 'train', not of its folder 'distill'"),
])
def test_a_manifest_with_a_field_of_the_wrong_type_is_one_line(run_dir, change, message):
    stage_dir = _complete(run_dir)
    (stage_dir / MANIFEST).write_text(json.dumps({**_manifest(stage_dir), **change}))
    unreadable = re.escape(f"{stage_dir / MANIFEST} is unreadable (")
    with pytest.raises(UsageError, match=unreadable + ".*" + re.escape(message)):
        Run(run_dir).require("distill")


def test_links_and_files_in_the_way_are_refused_and_nothing_is_removed_through_them(tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("precious")
    run_dir.mkdir()
    (run_dir / "distill").symlink_to(elsewhere)
    with pytest.raises(UsageError, match=f"{run_dir / 'distill'} is a symbolic link \\(to {elsewhere}\\): a stage's "
                                         "folders must be real folders"), \
            open_stage(_cfg(run_dir, overwrite=True), "distill"):
        pass
    (run_dir / ".finetune.lock").symlink_to(elsewhere / "keep.txt")
    with pytest.raises(UsageError, match=f"{run_dir / '.finetune.lock'} is a symbolic link"), \
            open_stage(_cfg(run_dir), "finetune"):
        pass
    assert (elsewhere / "keep.txt").read_text() == "precious" and sorted(os.listdir(elsewhere)) == ["keep.txt"]
    (run_dir / ".report.lock").mkdir()
    with pytest.raises(UsageError, match=f"{run_dir / '.report.lock'} is a folder where a stage's lock file belongs"), \
            open_stage(_cfg(run_dir), "report"):
        pass
    (run_dir / "evaluate").write_text("a file")
    with pytest.raises(UsageError, match=f"{run_dir / 'evaluate'} is a file where the stage's folder belongs"), \
            open_stage(_cfg(run_dir), "evaluate"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=f"run_dir {tmp_path / 'file'} is a file, not a folder"), \
            open_stage(_cfg(tmp_path / "file"), "evaluate"):
        pass


def test_an_interrupt_marks_the_stage_failed_and_names_it(run_dir):
    with pytest.raises(Interrupted) as raised, open_stage(_cfg(run_dir), "distill", keep_partial=True):
        raise KeyboardInterrupt
    assert _manifest(run_dir / "distill")["status"] == "failed"
    assert raised.value.message() == (f"interrupted by SIGINT (stage distill of {run_dir} marked failed; rerun the "
                                      "same command to resume it)")


def test_a_read_only_run_directory_is_one_line_naming_the_path(run_dir, monkeypatch):
    import errno

    from distilbert_cli import rundir

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    with open_stage(_cfg(run_dir), "evaluate"):
        pass
    monkeypatch.setattr(rundir, "write_text_atomic", read_only)
    with pytest.raises(UsageError, match=f"stage report failed: {run_dir / 'report' / MANIFEST}: read-only file "
                                         "system: choose a run_dir on a writable one, or remount it read-write; .*its "
                                         "manifest could not even be marked failed"), \
            open_stage(_cfg(run_dir), "report"):
        pass


def test_a_stage_the_run_lacks_is_read_from_its_upstream_in_place_verified_and_recorded(tmp_path):
    """A sweep member (upstream_run_dir: the sweep's run) uses the sweep's prepare-data where it is: its path and
    fingerprint go into the member's manifest, and a file changed since is refused."""
    root, member = tmp_path / "root", tmp_path / "root" / "sweep" / "a"
    with open_stage(_cfg(root), "prepare-data") as stage:
        (stage.path / "data.bin").write_bytes(b"123")
    with open_stage(_cfg(member, upstream=root), "distill") as stage:
        assert stage.use_stage("prepare-data") == root / "prepare-data"
    recorded = _manifest(member / "distill")["inputs"][0]
    assert recorded == {"stage": "prepare-data", "path": str(root / "prepare-data"),
                        "fingerprint": fingerprint(root / "prepare-data"), "run_dir": str(root)}
    assert not (member / "prepare-data").exists()
    assert Run(member).complete("prepare-data") is None  # without its upstream the member has none
    (root / "prepare-data" / "data.bin").write_bytes(b"124")
    with pytest.raises(UsageError, match="data.bin has changed since stage prepare-data"), \
            open_stage(_cfg(member, upstream=root, overwrite=True), "distill") as stage:
        stage.use_stage("prepare-data")


def test_a_stage_of_its_own_shadows_the_upstream_even_when_it_is_not_complete(tmp_path):
    root, member = tmp_path / "root", tmp_path / "member"
    for run_dir in (root, member):
        with open_stage(_cfg(run_dir), "init-student") as stage:
            (stage.path / "model.bin").write_text(str(run_dir))
    run = Run.of(_cfg(member, upstream=root))
    assert run.require("init-student") == member / "init-student"
    with pytest.raises(RuntimeError), open_stage(_cfg(member, overwrite=True), "init-student"):
        raise RuntimeError("boom")
    with pytest.raises(UsageError, match=f"not complete.*{member / 'init-student'}"):
        Run.of(_cfg(member, upstream=root)).require("init-student")
    with pytest.raises(UsageError, match=f"nor a complete one in the upstream run {root}"):
        Run.of(_cfg(member, upstream=root)).require("distill")
