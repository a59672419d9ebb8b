"""Class 6, the file system: a read-only or unwritable run directory, a file where the run directory or a stage
folder belongs, a lock that is a folder or a link, a stage folder that is a link: each is one `error:` line naming the
path and what to do, exit 2, and nothing is removed (or written) through a symbolic link."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from faults.harness import assert_ok, assert_refused, digests, distil

from distilbert_cli import rundir
from distilbert_cli.rundir import read_manifest

pytestmark = pytest.mark.faults


def init_student(run_dir: Path, teacher: Path, *overrides: str):
    return distil("init-student", f"run_dir={run_dir}", f"teacher.name_or_path={teacher}", "student.num_layers=2",
                  *overrides)


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    """A folder outside the run directory that a link points at: it must come out untouched."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    return folder


def test_a_run_dir_that_is_a_file_or_under_one(tmp_path, tiny_teacher):
    (tmp_path / "file").write_text("x")
    assert_refused(init_student(tmp_path / "file", tiny_teacher), f"error: run_dir {tmp_path / 'file'} is a file, not "
                   "a folder: choose another run_dir")
    assert_refused(init_student(tmp_path / "file" / "run", tiny_teacher), f"error: distil init-student cannot go on: "
                   f"{tmp_path / 'file' / 'run'}: a part of this path is a file where a folder belongs")


def test_a_run_dir_that_is_a_broken_link(tmp_path, tiny_teacher):
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    assert_refused(init_student(tmp_path / "run", tiny_teacher), f"{tmp_path / 'run'}: it already exists and is in "
                   "the way: move or remove it")


def test_a_stage_folder_that_is_a_link_is_refused_and_nothing_is_removed_through_it(tmp_path, tiny_teacher,
                                                                                     elsewhere):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "init-student").symlink_to(elsewhere)
    before = digests(elsewhere)
    assert_refused(init_student(run_dir, tiny_teacher, "overwrite=true"), f"error: {run_dir / 'init-student'} is a "
                   f"symbolic link (to {elsewhere}): a stage's folders must be real folders of the run directory",
                   "nothing was removed through it")
    assert digests(elsewhere) == before


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_a_lock_that_is_a_folder_or_a_link_is_refused(tmp_path, tiny_teacher, elsewhere, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".init-student.lock"
    lock.mkdir() if kind == "folder" else lock.symlink_to(elsewhere / "keep.txt")
    expected = "is a folder where a stage's lock file belongs" if kind == "folder" else "is a symbolic link"
    assert_refused(init_student(run_dir, tiny_teacher), f"error: {lock} {expected}")
    assert (elsewhere / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(("number", "advice"), [
    (errno.EROFS, "read-only file system: choose a run_dir on a writable one, or remount it read-write"),
    (errno.EACCES, "permission denied: give this user access to it, or choose another run_dir"),
])
def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, tiny_teacher, monkeypatch, number, advice):
    run_dir = tmp_path / "run"

    def refused(path: Path, text: str):
        raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr(rundir, "write_text_atomic", refused)
    manifest = run_dir / "init-student" / "manifest.json"
    assert_refused(init_student(run_dir, tiny_teacher), f"error: stage init-student failed: {manifest}: {advice}",
                   "its manifest could not even be marked failed")
    monkeypatch.undo()
    assert_ok(init_student(run_dir, tiny_teacher))  # a writable run dir again: the stage runs
    assert read_manifest(run_dir / "init-student")["status"] == "complete"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_run_dir_for_real(tmp_path, tiny_teacher):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        assert_refused(init_student(run_dir, tiny_teacher), "permission denied: give this user access to it")
    finally:
        run_dir.chmod(0o700)
