"""The run-directory contract: manifests, completion, refusal to overwrite or to consume incomplete stages."""

from __future__ import annotations

import json

import pytest

from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import MANIFEST, Run, fingerprint
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
                        "fingerprint": fingerprint(root / "prepare-data")}
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
