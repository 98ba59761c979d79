"""A failed write names the file and the free space and leaves nothing half-written; a
job's log keeps its earlier attempts."""

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from acl_fixture import shared_folder, with_default_acl
from brainage.io import (
    WriteError,
    atomic_path,
    save_tensors,
    sha256_file,
    staged_folder,
    stale_temporaries,
    write_json,
    write_tsv,
)
from conftest import REPO


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out" / "table.tsv"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as temp:
            temp.write_text("half")
            raise RuntimeError("crash")
    assert not final.exists() and list(final.parent.iterdir()) == []
    with atomic_path(final) as temp:
        temp.write_text("whole")
    assert final.read_text() == "whole"


def _write_text(path):
    with atomic_path(path) as temp:
        temp.write_text("whole")


def _write_nifti(path):
    import nibabel as nib
    import numpy as np

    with atomic_path(path) as temp:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(temp))


def _write_torch_by_name(path):
    import torch

    with atomic_path(path) as temp:
        torch.save({"weight": torch.arange(100.0)}, temp)


def _save_tensors(path):
    import torch

    save_tensors(path, {"weight": torch.arange(10.0)})


#: Writers through a handle and by name, the package's and libraries' (name, writer).
WRITERS = {
    "text": ("notes.txt", _write_text),
    "json": ("metrics.json", lambda path: write_json(path, {"mae": 3.5})),
    "tsv": ("table.tsv", lambda path: write_tsv(path, pd.DataFrame({"age": [30, 40]}))),
    "nifti": ("sub-01_T1w.nii.gz", _write_nifti),
    "torch by name": ("encoder.pt", _write_torch_by_name),
    "tensors": ("model.pt", _save_tensors),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_atomic_path_puts_the_data_on_the_disk_before_the_rename(tmp_path, monkeypatch,
                                                                 writer):
    """Without os.fsync the rename can reach the disk before the data: a node crash right
    after the job left an empty or truncated file under the final name."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(handle):
        status = os.fstat(handle)
        events.append(("fsync", status.st_ino, status.st_size))
        return fsync(handle)

    def recording_replace(source, target, **kwargs):
        status = os.stat(source)
        events.append(("rename", status.st_ino, status.st_size))
        return replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    name, write = WRITERS[writer]
    final = tmp_path / "out" / name
    write(final)
    renames = [index for index, (event, *_) in enumerate(events) if event == "rename"]
    assert len(renames) == 1, events
    _, inode, size = events[renames[0]]
    assert size > 0 and final.stat().st_ino == inode and final.stat().st_size == size
    # the file, whole, was synced before the rename; the folder after it
    assert ("fsync", inode, size) in events[:renames[0]], events
    folder = final.parent.stat().st_ino
    assert any(event == "fsync" and synced == folder
               for event, synced, _ in events[renames[0]:]), events


def test_two_writers_of_one_folder_take_turns(tmp_path, caplog):
    """Two exports of one bundle at once: each removed the other's half-written folder as
    a killed writer's, and the other failed with a message about free space. The second
    now waits for the first; both finish, the second's folder is the one left."""
    import threading

    target = tmp_path / "models" / "bundle"
    inside, finished = threading.Event(), []

    def write(content: str, hold: bool) -> None:
        with staged_folder(target, what="an export") as staging:
            (staging / "manifest.json").write_text(content)
            if hold:
                inside.set()
                time.sleep(1.0)  # the second writer starts meanwhile
        finished.append(content)

    first = threading.Thread(target=write, args=("first", True))
    with caplog.at_level("INFO", logger="brainage.io"):
        first.start()
        assert inside.wait(10)
        write("second", False)
        first.join()
    assert finished == ["first", "second"]
    assert (target / "manifest.json").read_text() == "second"
    assert "waiting for another process that writes" in caplog.text
    assert "that was killed" not in caplog.text
    assert sorted(path.name for path in target.parent.iterdir()) == ["bundle"]


def test_a_lock_file_is_the_groups_to_lock_and_a_write_that_cannot_lock_says_so(
        tmp_path, monkeypatch, caplog):
    """On NFS an exclusive lock needs a handle open for writing: a colleague's lock file
    made under umask 022 or 077 could only be opened read-only there, and locked nothing
    without a word. The group may write it whatever the umask; a file system without locks
    is warned of."""
    import errno
    import fcntl

    from brainage.io import writer_lock

    lock = tmp_path / ".bundle.lock"
    umask = os.umask(0o077)
    try:
        with writer_lock(lock, wait=True, what="the bundle"):
            assert lock.stat().st_mode & 0o060 == 0o060
    finally:
        os.umask(umask)

    def no_locks_here(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks_here)
    with caplog.at_level("WARNING", logger="brainage.io"):
        with writer_lock(lock, wait=True, what="the bundle"):
            pass
    assert "could not lock" in caplog.text and "No locks available" in caplog.text
    assert "the bundle is written without holding off another writer" in caplog.text


@pytest.mark.parametrize("code", ["EBADF", "ENOLCK", "EOPNOTSUPP"])
def test_a_writer_that_could_not_lock_leaves_the_lock_of_one_that_holds_it(
        tmp_path, monkeypatch, code):
    """On NFS a read-only handle cannot lock (EBADF), nor can a node whose own lock service
    is down (ENOLCK), while a writer elsewhere holds the lock: the unlocked writer removed
    the lock file as it finished, and a third writer then got in beside the first."""
    import errno
    import fcntl

    from brainage.io import LockHeldError, writer_lock

    lock = tmp_path / ".bundle.lock"
    with writer_lock(lock, wait=False, what="the bundle"):  # the first writer, at work
        real_flock = fcntl.flock

        def cannot_lock_here(handle, operation):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

        monkeypatch.setattr(fcntl, "flock", cannot_lock_here)
        with writer_lock(lock, wait=True, what="the bundle"):
            pass
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert lock.exists()
        with pytest.raises(LockHeldError):  # the third writer is still held off
            with writer_lock(lock, wait=False, what="the bundle"):
                pass


@pytest.mark.parametrize("command, runs", [
    (["/x/.venv/bin/python", "/x/.venv/bin/snakemake", "--cores", "2"], True),
    (["snakemake", "-n"], True),
    (["python3", "-u", "-m", "snakemake", "--cores", "2"], True),
    (["python3", "-msnakemake"], True),
    (["/usr/bin/python3", "-sP", "/usr/bin/snakemake", "--cores", "1"], True),  # a shebang's
    (["python3.11", "-X", "utf8", "../bin/snakemake"], True),
    (["python3", "--check-hash-based-pycs", "always", "-m", "snakemake"], True),
    (["tail", "-f", ".snakemake/log/x.snakemake.log"], False),
    (["tee", "snakemake.log"], False),
    (["python3", "-c", "import snakemake"], False),
    (["python3", "-m", "pytest", "tests/snakemake"], False),
    (["python3", "analyse_snakemake.py"], False),
])
def test_a_running_snakemake_is_known_by_its_own_command_line(command, runs):
    from brainage.interrupted import _is_snakemake

    assert _is_snakemake(command) is runs


def test_the_next_attempt_says_what_an_attempt_without_a_message_may_have_been():
    """Without hard links faulthandler's stacks went with the deleted log, so a crash
    cannot be told from a kill: the warning names both then."""
    from brainage.logs import _how_it_ended

    lines = ["2026-12-06 12:00:00,000 INFO brainage: working"]
    assert "crashed in native code" not in _how_it_ended(lines, 1, linked=True)
    assert "or crashed in native code" in _how_it_ended(lines, 1, linked=False)
    assert _how_it_ended([*lines, "2026-12-06 12:00:01,000 ERROR brainage: job failed"],
                         1) is None


def test_a_colleagues_companion_that_cannot_be_written_is_replaced_by_a_copy(
        tmp_path, monkeypatch):
    """A failed job's companion left by a colleague under umask 022 made every later
    attempt of the job fail at import with PermissionError; a copy of our own replaces it,
    the earlier attempts kept."""
    from brainage import logs

    log = tmp_path / "logs" / "train_encoder.log"
    run_job(log, "failed")
    companion = logs.attempts_file(log)
    before = companion.stat().st_ino
    log.unlink()
    real_access = os.access
    monkeypatch.setattr(logs.os, "access", lambda path, mode: False if Path(path) == companion
                        else real_access(path, mode))
    assert logs._start_attempt(log)
    assert companion.stat().st_ino != before and os.path.samefile(log, companion)
    assert "working in failed" in log.read_text()
    assert re.findall(r"^===== attempt (\d+)", log.read_text(), flags=re.M) == ["1", "2"]


def test_a_colleagues_companion_that_cannot_be_read_is_set_aside_and_named(
        tmp_path, monkeypatch):
    """One left 0600 by an older version under umask 077 could not be copied either, and
    every later attempt of the job failed at import with a PermissionError naming the
    hidden file."""
    from brainage import logs

    log = tmp_path / "logs" / "train_encoder.log"
    run_job(log, "failed")
    companion = logs.attempts_file(log)
    log.unlink()
    real_access, real_copy = os.access, logs.shutil.copyfile
    monkeypatch.setattr(logs.os, "access", lambda path, mode: False if Path(path) == companion
                        else real_access(path, mode))

    def unreadable(source, target, **options):
        if Path(source) == companion:
            raise PermissionError(13, "Permission denied", str(source))
        return real_copy(source, target, **options)

    monkeypatch.setattr(logs.shutil, "copyfile", unreadable)
    logs._start_attempt(log)
    aside = list(companion.parent.glob(f"{companion.name}.unreadable-*"))
    assert len(aside) == 1 and "working in failed" in aside[0].read_text()
    text = log.read_text()
    assert text.startswith("===== attempt 1 ") and os.path.samefile(log, companion)
    assert f"the earlier attempts of this job are in {aside[0]}" in text
    assert not list(companion.parent.glob("*.own-*"))


def test_a_colleagues_companion_that_cannot_be_replaced_is_named_with_its_owner(
        tmp_path, monkeypatch):
    """In a sticky-bit folder only a file's owner may replace it: the job cannot go on, and
    says whose file it is and what to do rather than a bare PermissionError."""
    from brainage import logs

    log = tmp_path / "logs" / "train_encoder.log"
    run_job(log, "failed")
    companion = logs.attempts_file(log)
    log.unlink()
    real_access = os.access
    monkeypatch.setattr(logs.os, "access", lambda path, mode: False if Path(path) == companion
                        else real_access(path, mode))

    def sticky(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(logs.os, "replace", sticky)
    with pytest.raises(PermissionError, match=rf"{re.escape(str(companion))} keeps the earlier "
                                              rf"attempts of the job log .*train_encoder\.log; "
                                              rf"it belongs to user \S+ .*ask them to delete "
                                              rf"it"):
        logs._start_attempt(log)
    assert "working in failed" in companion.read_text()  # nothing of it lost
    assert not list(companion.parent.glob("*.own-*"))


def test_a_companion_is_the_groups_to_append_to_and_a_copy_of_a_colleagues_too(
        tmp_path, monkeypatch):
    """A colleague's rerun of a failed job appends to its companion: made under umask 022
    it could not, and each change of hands copied the history again."""
    from brainage import logs

    log = tmp_path / "logs" / "train_encoder.log"
    umask = os.umask(0o022)
    try:
        run_job(log, "failed")
        companion = logs.attempts_file(log)
        assert companion.stat().st_mode & 0o060 == 0o060
        companion.chmod(0o644)  # as an older version left it
        log.unlink()
        real_access = os.access
        monkeypatch.setattr(logs.os, "access", lambda path, mode: False
                            if Path(path) == companion else real_access(path, mode))
        logs._start_attempt(log)
        assert companion.stat().st_mode & 0o060 == 0o060
    finally:
        os.umask(umask)


def test_without_hard_links_the_next_attempt_names_a_crash_among_the_causes(tmp_path):
    """The stacks of a native crash go with the log Snakemake deletes where the two names
    cannot be one file, so an attempt that just stopped may have crashed too."""
    log = tmp_path / "logs" / "train_encoder.log"
    run_job(log, "killed", NO_HARD_LINKS="1")
    assert run_job(log, "succeeded", NO_HARD_LINKS="1") == 0
    text = log.read_text()
    assert "attempt 1 ended without a message" in text
    assert "or crashed in native code" in text


def test_a_tools_scratch_folder_gets_the_groups_permissions_and_goes_away(tmp_path):
    """Registration and skull stripping work in a folder beside their outputs; made by
    tempfile it was 0700, so the one a killed job left could not be deleted by colleagues
    in the project's group (rm -rf of a subject's folder failed)."""
    import stat

    from brainage.io import work_folder

    umask = os.umask(0o002)
    try:
        with pytest.raises(RuntimeError):
            with work_folder(tmp_path, ".register-") as folder:
                assert folder.parent == tmp_path and folder.name.startswith(".register-")
                assert stat.S_IMODE(folder.stat().st_mode) == 0o775
                (folder / "affine_0GenericAffine.mat").write_bytes(b"x")
                raise RuntimeError("the tool failed")
    finally:
        os.umask(umask)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_must_not_wait_is_told_who_holds_the_lock(tmp_path):
    from brainage.io import LockHeldError, writer_lock

    lock = tmp_path / ".out.lock"
    with writer_lock(lock, wait=False, what="--output out"):
        with pytest.raises(LockHeldError, match=r"another process is writing --output out now"):
            with writer_lock(lock, wait=False, what="--output out"):
                pass
    with writer_lock(lock, wait=False, what="--output out"):  # released: free again
        assert lock.is_file()
    assert not lock.exists()


def test_a_folder_interrupted_between_its_renames_keeps_the_old_one(tmp_path, monkeypatch):
    """A Ctrl-C after the old folder was moved aside and before the new one took its
    place: the old one was deleted (the clean-up ran) and the new one too, leaving no
    folder at all. Now the old one is put back whole."""
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    renames = []

    def replace_interrupted_at_the_second(source, destination):
        renames.append(destination)
        if len(renames) == 2:
            raise KeyboardInterrupt
        return real_replace(source, destination)

    real_replace = os.replace
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target, what="an export") as staging:
            (staging / "manifest.json").write_text("new")
            monkeypatch.setattr(os, "replace", replace_interrupted_at_the_second)
    monkeypatch.undo()
    assert (target / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("acl", [False, True], ids=["umask", "default ACL"])
def test_atomic_path_gives_the_permissions_of_a_plain_write(tmp_path, acl):
    """A temporary from mkstemp is private (0600) and was then given 0666 less the umask:
    in a folder with a default ACL (group rw, others nothing) the output became readable
    by everyone on the cluster and not writable by the group, where a plain write gives
    0660. A result is now created as open() creates any file."""
    folder = tmp_path / "shared"
    folder.mkdir()
    if acl:
        with_default_acl(folder, other=0)
    with open(folder / "plain.tsv", "w") as handle:
        handle.write("age\n30\n")
    expected = stat.S_IMODE((folder / "plain.tsv").stat().st_mode)
    if acl:
        assert expected == 0o660  # the ACL, not the umask, decides
    write_tsv(folder / "table.tsv", pd.DataFrame({"age": [30]}))
    write_json(folder / "metrics.json", {"mae": 3.5})
    for name in ("table.tsv", "metrics.json"):
        assert oct(stat.S_IMODE((folder / name).stat().st_mode)) == oct(expected), name


@pytest.mark.parametrize("acl", [False, True], ids=["umask", "default ACL"])
def test_a_staging_folder_gets_the_permissions_of_a_plain_folder(tmp_path, acl):
    """A model bundle's staging folder came from tempfile.mkdtemp (0700) and was then given
    0777 less the umask: under a shared folder's default ACL (group rwx, others nothing) the
    bundle became readable by everyone and not writable by the group."""
    from brainage.io import create_staging_folder, sync_tree

    folder, expected = shared_folder(tmp_path, acl)
    staging = create_staging_folder(folder, prefix=".bundle.")
    (staging / "encoder.pt").write_bytes(b"weights")
    sync_tree(staging)
    assert staging.name.startswith(".bundle.") and len(staging.name) == len(".bundle.") + 8
    assert oct(stat.S_IMODE(staging.stat().st_mode)) == oct(expected)
    assert (staging / "encoder.pt").read_bytes() == b"weights"


def test_atomic_path_temporaries_do_not_use_the_seeded_random_state(tmp_path):
    """A training seeds Python's random module; the temporary names must neither draw from
    it (the training's random numbers would change with the writes) nor repeat."""
    import random

    random.seed(3)
    expected = random.random()
    random.seed(3)
    names = set()
    for index in range(20):
        with atomic_path(tmp_path / "out.json") as temp:
            names.add(temp.name)
            temp.write_text(str(index))
    assert random.random() == expected
    assert len(names) == 20 and stale_temporaries(tmp_path / "out.json") == []
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]


# -- write failures and deterministic tensor files ---------------------------------------------

def test_save_tensors_on_a_full_disk_names_the_file_the_need_and_the_room(small_disk):
    """Before writing, not half-way with PyTorch's "basic_ios::clear: iostream error"."""
    import torch

    final = small_disk.folder / "encoder.pt"
    with pytest.raises(WriteError, match=rf"writing {re.escape(str(final))} needs about "
                                         rf"4000000 bytes but only \d+ bytes are free on /"):
        save_tensors(final, {"model": {"weight": torch.zeros(1_000_000)}})
    assert list(small_disk.folder.iterdir()) == []


def test_torch_save_failing_inside_atomic_path_names_the_file_and_the_room(small_disk):
    """A write that runs out of space anyway (the size was underestimated): PyTorch's own
    message names neither the file nor the cause."""
    import torch

    final = small_disk.folder / "encoder.pt"
    with pytest.raises(WriteError, match=rf"writing {re.escape(str(final))} failed: .*"
                                         rf"\(\d+ bytes free on /.*\)"):
        with atomic_path(final) as temp:
            if not small_disk.real:  # what PyTorch raises on a full disk
                raise RuntimeError("basic_ios::clear: iostream error")
            torch.save({"weight": torch.zeros(1_000_000)}, temp)
    assert list(small_disk.folder.iterdir()) == []


def test_equal_tensors_give_equal_files_with_their_digest(tmp_path):
    import torch

    payload = {"model": {"weight": torch.arange(12.0).reshape(3, 4)}, "epochs": 2}
    digests = [save_tensors(tmp_path / name, payload) for name in ("a.pt", "b.pt")]
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert digests[0] == digests[1] == sha256_file(tmp_path / "a.pt")


# -- job logs ----------------------------------------------------------------------------------

JOB = """
import errno, logging, os, signal, sys
if os.environ.get("NO_HARD_LINKS"):  # a log folder on SMB or some FUSE mounts
    def no_hard_links(*arguments, **options):
        raise OSError(errno.EPERM, "Operation not permitted")
    os.link = no_hard_links
from brainage.logs import log_to_file
log_to_file(sys.argv[1])
logging.getLogger("brainage").info("working in %s", sys.argv[2])
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "failed":
    raise MemoryError("out of memory in the test")
if sys.argv[2] == "exited":
    sys.exit(3)
if sys.argv[2] == "refused":  # what argparse does with a bad argument
    import argparse
    argparse.ArgumentParser(prog="job").parse_args(["--no-such-option"])
if sys.argv[2] == "stopped":
    sys.exit("job: the input is unusable")
if sys.argv[2] == "finished":
    sys.exit(0)
if sys.argv[2] == "crashed":  # a segmentation fault in native code (ITK, PyTorch, NCCL)
    import ctypes
    ctypes.string_at(0)
if sys.argv[2] == "terminated_in_native":  # SIGTERM, then SLURM's SIGKILL, during BLAS
    import subprocess
    import numpy as np
    square = np.ones((8000, 8000))  # seconds of product on one thread
    subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -TERM {os.getpid()}; sleep 1; "
                                  f"kill -KILL {os.getpid()}"])
    square @ square
if sys.argv[2] == "terminated":  # a SLURM time limit, scancel, preemption
    import time
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


def run_job(log: Path, how: str, **environment: str) -> int:
    # Snakemake deletes a job's log before every attempt
    log.unlink(missing_ok=True)
    return subprocess.run([sys.executable, "-c", JOB, str(log), how], capture_output=True,
                          env={"PYTHONPATH": str(REPO / "workflow"), **environment},
                          check=False).returncode


def test_the_warnings_of_attempts_started_in_this_run_are_found(tmp_path):
    """Only attempts that started at the run's start or later count, whatever the log
    kept of earlier attempts and runs; a warning's first line stands for it."""
    import datetime
    import io

    from brainage.logs import job_warnings, say_job_warnings

    since = datetime.datetime(2026, 12, 6, 12, 0, 0, 500000, tzinfo=datetime.timezone.utc)
    logs = tmp_path / "logs"
    (logs / "preproc" / "sub-a").mkdir(parents=True)
    (logs / "preproc" / "sub-a" / "strip_skull.log").write_text(
        "===== attempt 1 (2026-12-06T11:59:58+00:00, node1, pid 7) =====\n"
        "2026-12-06 11:59:59,100 WARNING brainage.x: of the killed attempt\n"
        "===== attempt 2 (2026-12-06T12:00:00+00:00, node2, pid 8) =====\n"
        "2026-12-06 12:00:01,200 INFO brainage.x: fine\n"
        "2026-12-06 12:00:02,300 WARNING brainage.qc: subject sub-a failed QC\n"
        "  its second line\n")
    (logs / "qc.log").write_text(
        "===== attempt 1 (2026-12-06T11:00:00+00:00, node1, pid 9) =====\n"
        "2026-12-06 11:00:01,000 WARNING brainage.qc: of an earlier run\n")
    (logs / "preproc" / "sub-b").mkdir()
    (logs / "preproc" / "sub-b" / "strip_skull.log").write_text(
        "===== attempt 1 (2026-12-06T12:00:03+00:00, node1, pid 9) =====\n"
        "2026-12-06 12:00:04,100 WARNING brainage.x: FreeSurfer half there\n")
    (logs / "preproc" / "sub-c").mkdir()
    (logs / "preproc" / "sub-c" / "strip_skull.log").write_text(
        "===== attempt 1 (2026-12-06T12:00:03+00:00, node1, pid 9) =====\n"
        "2026-12-06 12:00:04,100 WARNING brainage.x: FreeSurfer half there\n")
    (logs / "train.log").write_text(
        "===== attempt 1 (2026-12-06T13:00:00+01:00, node3, pid 5) =====\n"  # 12:00 UTC
        "2026-12-06 13:00:09,000 WARNING brainage.evaluate: alpha at the grid's end\n")
    written = since.timestamp() + 7200  # whatever this machine's clock says
    for path in logs.rglob("*.log"):
        os.utime(path, (written, written))
    found = job_warnings(logs, since)
    assert [(path.relative_to(logs).as_posix(), message) for path, message in found] == [
        ("preproc/sub-a/strip_skull.log", "subject sub-a failed QC"),
        ("preproc/sub-b/strip_skull.log", "FreeSurfer half there"),
        ("preproc/sub-c/strip_skull.log", "FreeSurfer half there"),
        ("train.log", "alpha at the grid's end")]
    printed = io.StringIO()
    assert say_job_warnings(logs, since, shown=2, stream=printed) == 4
    # one line per message, so that every subject's same warning hides no other
    assert printed.getvalue() == (
        "brainage: the jobs of this run logged 4 warning(s); read them before the results "
        "(paths relative to the run's folder):\n"
        f"  {logs}/preproc/sub-a/strip_skull.log: subject sub-a failed QC\n"
        f"  {logs}/preproc/sub-b/strip_skull.log and 1 more log(s): FreeSurfer half there\n"
        f"  ... and 1 other warning(s): grep -r WARNING {logs}\n")
    emitted = []  # the Snakefile gives Snakemake's logger: the run's .snakemake/log too
    assert say_job_warnings(logs, since, shown=2, emit=emitted.append) == 4
    assert emitted == [printed.getvalue().rstrip("\n")]
    later = datetime.datetime(2026, 12, 6, 13, 0, 0, tzinfo=datetime.timezone.utc)
    assert say_job_warnings(logs, later, stream=printed) == 0
    # a long message keeps its end, what to do: it was cut at 300 characters, in the remedy
    subjects = ", ".join(f"sub-{number:03d}" for number in range(100))
    (logs / "predict.log").write_text(
        "===== attempt 1 (2026-12-06T12:00:03+00:00, node1, pid 9) =====\n"
        f"2026-12-06 12:00:04,100 WARNING brainage.apply: cohort c: {subjects} were "
        f"registered otherwise. Add their T1w scans.\n")
    os.utime(logs / "predict.log", (written, written))
    printed = io.StringIO()
    say_job_warnings(logs, since, shown=10, stream=printed)
    line = next(line for line in printed.getvalue().splitlines() if "cohort c" in line)
    assert line.endswith("were registered otherwise. Add their T1w scans.") and " ... " in line
    assert job_warnings(tmp_path / "no_logs", since) == []


def test_the_warnings_of_this_run_are_found_whatever_the_nodes_and_servers_clocks(
        tmp_path):
    """A node 90 s slow wrote an attempt's start before the run's start, and a file server
    15 minutes slow stamped the logs before it by this host's clock: both warnings were
    left out of the run's summary. An attempt is this run's by the run named in its
    header, and the logs are read by the file system's own clock at the run's start; an
    earlier run's log touched since (a backup, an editor) stays out."""
    import datetime

    from brainage.logs import job_warnings

    since = datetime.datetime(2026, 12, 6, 12, 0, 0, tzinfo=datetime.timezone.utc)
    server_slow_s = 15 * 60
    on_disk_at_start = int((since.timestamp() - server_slow_s) * 1e9)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "slow_node.log").write_text(  # retried: attempt 1 of an earlier run
        "===== attempt 1 (2026-12-06T10:00:00+00:00, node1, pid 7, run 0ld) =====\n"
        "2026-12-06 10:00:01,100 WARNING brainage.x: of an earlier run\n"
        "===== attempt 2 (2026-12-06T11:59:00+00:00, node1, pid 8, run n3w) =====\n"
        "2026-12-06 11:59:02,300 WARNING brainage.qc: subject sub-a failed QC\n")
    (logs / "retried.log").write_text(  # both attempts of this run, on a SLURM node
        "===== attempt 1 (2026-12-06T12:00:05+00:00, node2, pid 9, SLURM job 5, run n3w) "
        "=====\n"
        "2026-12-06 12:00:06,000 WARNING brainage.x: of the killed attempt\n"
        "===== attempt 2 (2026-12-06T12:01:00+00:00, node2, pid 10, run n3w) =====\n"
        "2026-12-06 12:01:01,000 WARNING brainage.x: of the attempt that finished\n")
    (logs / "touched.log").write_text(  # an earlier run's, by a node a minute fast
        "===== attempt 1 (2026-12-06T12:00:30+00:00, node3, pid 11, run 0ld) =====\n"
        "2026-12-06 12:00:31,000 WARNING brainage.x: of an earlier run too\n")
    (logs / "unnamed.log").write_text(  # a header of before runs were named: by its time
        "===== attempt 1 (2026-12-06T11:00:00+00:00, node1, pid 12) =====\n"
        "2026-12-06 11:00:01,000 WARNING brainage.x: of an earlier run, unnamed\n"
        "===== attempt 2 (2026-12-06T12:00:09+00:00, node1, pid 13) =====\n"
        "2026-12-06 12:00:10,000 WARNING brainage.x: of this run, unnamed\n")
    (logs / "earlier.log").write_text(  # not written since the run started
        "===== attempt 1 (2026-12-06T12:00:30+00:00, node3, pid 14, run n3w) =====\n"
        "2026-12-06 12:00:31,000 WARNING brainage.x: never read\n")
    written_this_run = since.timestamp() - server_slow_s + 600  # 10 min into the run
    for name in ("slow_node.log", "retried.log", "touched.log", "unnamed.log"):
        os.utime(logs / name, (written_this_run, written_this_run))
    before = since.timestamp() - server_slow_s - 60
    os.utime(logs / "earlier.log", (before, before))
    found = [(path.name, message) for path, message in
             job_warnings(logs, since, written_since_ns=on_disk_at_start, run_id="n3w")]
    assert found == [("retried.log", "of the killed attempt"),
                     ("retried.log", "of the attempt that finished"),
                     ("slow_node.log", "subject sub-a failed QC"),
                     ("unnamed.log", "of this run, unnamed")]
    # this host's clock alone: the server's stamps hid every log
    assert job_warnings(logs, since) == []


def test_a_full_disk_at_a_jobs_first_log_line_names_the_log(tmp_path):
    """On a full scratch quota every job stopped at ``import brainage`` with a bare
    ``OSError: [Errno 28]`` naming no file, and the log Snakemake pointed to stayed empty
    (a review). The log here is a link to /dev/full, whose writes fail with ENOSPC."""
    log = tmp_path / "logs" / "tabulate_qc.log"
    log.parent.mkdir()
    log.symlink_to("/dev/full")
    started = subprocess.run(
        [sys.executable, "-c", f"from brainage.logs import log_to_file; log_to_file({str(log)!r})"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "workflow")})
    assert started.returncode == 1
    assert (f"brainage.io.WriteError: writing {log} failed: No space left on device"
            in started.stderr), started.stderr
    assert "the job's log could not be started, so the job did nothing. The disk or quota of " \
           "the log folder is full: free space there" in started.stderr


def test_log_keeps_killed_and_failed_attempts_until_a_success(tmp_path):
    log = tmp_path / "logs" / "train_encoder.log"
    for how in ("killed", "failed", "succeeded"):
        run_job(log, how)
    text = log.read_text()
    separators = re.findall(r"^===== attempt (\d+) \((\S+), (\S+), pid (\d+)\) =====$", text,
                            flags=re.M)
    assert [number for number, *_ in separators] == ["1", "2", "3"], text
    assert len({pid for *_, pid in separators}) == 3
    order = [text.index(line) for line in ("working in killed", "working in failed",
                                           "MemoryError: out of memory in the test",
                                           "working in succeeded")]
    assert order == sorted(order), text
    # after a success the next run of the job starts a new history
    run_job(log, "succeeded")
    assert re.findall(r"^===== attempt (\d+)", log.read_text(), flags=re.M) == ["1"]
    assert "working in killed" not in log.read_text()


def test_the_log_says_how_an_attempt_ended_when_it_was_killed(tmp_path):
    """SIGTERM (a SLURM time limit, scancel, preemption) and SIGKILL (the out-of-memory
    killer) left a log that just stopped, and the next attempt did not say why the last one
    had ended. SIGTERM is now logged as it arrives (exit status 143, the clean-ups run); an
    attempt that ended with no error line is named as killed outright by the next one; the
    separator names the SLURM job, to look it up with sacct, and the run (as in every
    workflow run: the job's id was missed when the run's came after it)."""
    log = tmp_path / "logs" / "train_encoder.log"
    assert run_job(log, "killed", SLURM_JOB_ID="4242", BRAINAGE_RUN_ID="a1b2c3") == -9
    assert run_job(log, "terminated", SLURM_JOB_ID="4243", BRAINAGE_RUN_ID="a1b2c3") == 143
    # the stacks at the signal, written at once from C (Python's handler waits for a
    # native call to return), then the handler's own line
    last = log.read_text()
    assert last.index("(most recent call first)") < last.index("job stopped by SIGTERM")
    assert run_job(log, "failed") == 1
    run_job(log, "succeeded")
    text = log.read_text()
    attempts = re.split(r"^===== attempt \d+ .*$", text, flags=re.M)[1:]
    assert len(attempts) == 4, text
    # the Snakemake run the job belongs to, inherited from it: its warnings are told from
    # an earlier run's by it (logs.job_warnings)
    assert re.search(r"^===== attempt 1 \(\S+, \S+, pid \d+, SLURM job 4242, run a1b2c3\) =====$",
                     text, flags=re.M), text
    run_job(log, "succeeded", BRAINAGE_RUN_ID="a1b2c3")
    assert re.search(r"^===== attempt 1 \(\S+, \S+, pid \d+, run a1b2c3\) =====$",
                     log.read_text(), flags=re.M), log.read_text()
    # what ends each attempt, and what the next one says of it
    assert attempts[0].rstrip().endswith("working in killed"), text
    assert re.match(r"\n\S+ \S+ WARNING brainage.logs: attempt 1 ended without a message: its "
                    r"process was killed outright \(SIGKILL", attempts[1]), text
    assert "ERROR brainage: job stopped by SIGTERM" in attempts[1], attempts[1]
    assert "ended without a message" not in attempts[2] + attempts[3], text
    # which of the causes it was is SLURM's to say, for the attempt's own job: a time limit
    # wants a longer runtime, an out-of-memory kill more memory, a preemption nothing
    assert "`sacct -j 4242 -X -o JobID,State,MaxRSS,Elapsed` says which" in attempts[1]
    assert re.search(r"job stopped by SIGTERM \(.*\); `sacct -j 4243 -X -o JobID,State,"
                     r"Timelimit,Elapsed` says which \(TIMEOUT: raise the job's wall time: "
                     r"resources\.<section>\.runtime_min where the config has one for it, else "
                     r"--set-resources <rule>:runtime=<minutes>, as the README's SLURM section "
                     r"says\); a training resumes",
                     attempts[1])
    assert "sacct -j" not in attempts[2]  # not on SLURM: no job to name


def test_a_sigterm_during_a_native_step_leaves_its_stacks_for_the_next_attempt(tmp_path):
    """Python's SIGTERM handler waits for a native call (ITK, N4, BLAS) to return, often
    past SLURM's SIGKILL: the stacks faulthandler wrote at the signal are kept through
    Snakemake's deletion of the log, and the next attempt says what happened."""
    log = tmp_path / "logs" / "correct_and_register.log"
    assert run_job(log, "terminated_in_native", OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1") == -9
    run_job(log, "succeeded")
    text = log.read_text()
    assert re.search(r"working in terminated_in_native\n(.*\n)*.*most recent call first.*"
                     r"===== attempt 2 .*\n.* WARNING brainage.logs: attempt 1 got SIGTERM \(a "
                     r"time limit, scancel or preemption\) and was killed before it could stop",
                     text, flags=re.S), text
    assert "job stopped by SIGTERM" not in text


def test_a_crash_in_native_code_is_in_the_log_and_not_taken_for_a_memory_kill(tmp_path):
    """A segmentation fault or abort in ITK, PyTorch or NCCL left a log that just stopped,
    and the next attempt blamed the out-of-memory killer: the crash and its stack are in
    the log, and the next attempt names a crash as one of the causes."""
    log = tmp_path / "logs" / "register.log"
    assert run_job(log, "crashed") == -11
    run_job(log, "succeeded")  # Snakemake deleted the log before this retry (run_job too)
    text = log.read_text()
    assert re.search(r"Fatal Python error: Segmentation fault\n\n.*most recent call first.*"
                     r"===== attempt 2 .*\n.* WARNING brainage.logs: attempt 1 crashed in "
                     r"native code", text, flags=re.S), text


def test_console_logging_leaves_the_interpreters_hooks_alone():
    """brainage.predict.main called from a notebook replaced sys.excepthook and sys.exit
    for the rest of the session: the hooks record a job's attempts, and only a job's log
    (a path) needs them."""
    script = ("import signal, sys\n"
              "from brainage.logs import log_to_file\n"
              "hooks = (sys.excepthook, sys.exit, signal.getsignal(signal.SIGTERM))\n"
              "log_to_file(None)\n"
              "assert (sys.excepthook, sys.exit, signal.getsignal(signal.SIGTERM)) == hooks\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "workflow")}, check=False)
    assert result.returncode == 0, result.stderr


def test_job_logs_are_utf8_whatever_the_locale(tmp_path):
    """Under a locale whose encoding is not UTF-8 (an older cluster image's latin-1 or
    ASCII), a study named Łódź lost its log lines ("--- Logging error ---") and make_tables
    failed on its notes' dashes: logs and tables are written as UTF-8."""
    # the script's own text in ASCII: the command line is decoded with the locale's codec
    script = (
        "import logging, sys, locale\n"
        "import pandas as pd\n"
        "from brainage.logs import log_to_file\n"
        "from brainage.report.tables import write_table\n"
        "assert locale.getpreferredencoding(False).lower() not in ('utf-8', 'utf8')\n"
        "log_to_file(sys.argv[1])\n"
        "city = '\\u0141\\u00f3d\\u017a'\n"
        "logging.getLogger('brainage').info('study %s \\u2013 3 subjects', city)\n"
        "table = pd.DataFrame({'study': [city], 'mae': [4.2]})\n"
        "write_table(table, table.astype(str), sys.argv[2], title='Tabelle \\u2013 ' + city,\n"
        "            notes=['MAE \\u2013 years'])\n")
    result = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", script, str(tmp_path / "job.log"),
         str(tmp_path / "table")], capture_output=True, text=True, check=False,
        env={"PYTHONPATH": str(REPO / "workflow"), "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0",
             "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert "Logging error" not in result.stderr, result.stderr
    assert "study Łódź – 3 subjects" in (tmp_path / "job.log").read_text(encoding="utf-8")
    assert "Tabelle – Łódź" in (tmp_path / "table.md").read_text(encoding="utf-8")


def test_matplotlib_gets_a_writable_cache_where_home_is_not(tmp_path, monkeypatch):
    """A HOME that cannot be written (read-only on the nodes, a container without one) made
    matplotlib log two warnings in every job, which filled the end-of-run list; a folder a
    user set is kept."""
    import tempfile

    from brainage import io as brainage_io

    # set first, so that monkeypatch restores the variable the function under test sets
    monkeypatch.setenv("MPLCONFIGDIR", "unset below")
    monkeypatch.delenv("MPLCONFIGDIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    writable = {str(tmp_path / "home"): False}
    monkeypatch.setattr(brainage_io.os, "access",
                        lambda path, mode: writable.get(str(path), True))
    brainage_io.use_a_writable_matplotlib_cache()
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / f"brainage-matplotlib-{os.getuid()}")
    monkeypatch.setenv("MPLCONFIGDIR", "/lab/mpl")
    brainage_io.use_a_writable_matplotlib_cache()
    assert os.environ["MPLCONFIGDIR"] == "/lab/mpl"
    monkeypatch.delenv("MPLCONFIGDIR")
    writable[str(tmp_path / "home")] = True
    brainage_io.use_a_writable_matplotlib_cache()
    assert "MPLCONFIGDIR" not in os.environ


def test_log_keeps_attempts_that_ended_with_a_non_zero_exit(tmp_path):
    """sys.exit(3), sys.exit("message") and an argparse error end a job with a failure as an
    exception does, but raise SystemExit, which never reaches sys.excepthook: the
    history was deleted as after a success, and the next attempt's log began at
    attempt 1 without them."""
    log = tmp_path / "logs" / "prepare.log"
    for how in ("exited", "refused", "stopped", "failed"):
        run_job(log, how)
    text = log.read_text()
    assert re.findall(r"^===== attempt (\d+)", text, flags=re.M) == ["1", "2", "3", "4"], text
    for how in ("exited", "refused", "stopped"):
        assert f"working in {how}" in text, text
    # the log says how each ended: the status, or the message that went to stderr
    assert "job ended with exit status 3" in text, text
    assert "job ended with exit status 2" in text, text
    assert "job ended with exit status 1: job: the input is unusable" in text, text
    # sys.exit(0) is a success: the next run starts a new history
    run_job(log, "finished")
    run_job(log, "succeeded")
    assert re.findall(r"^===== attempt (\d+)", log.read_text(), flags=re.M) == ["1"]


def test_a_log_shorter_than_the_attempts_gets_the_earlier_attempts_back(tmp_path):
    """A log that exists when the next attempt starts but holds less than the companion
    (recreated by whatever starts the job, a line written to it): the earlier attempts are
    copied back into it, so it numbers the new attempt 2 below attempt 1."""
    log = tmp_path / "logs" / "train_encoder.log"
    run_job(log, "failed")
    log.unlink()  # Snakemake deletes it; then something writes a new one
    log.write_text("started\n")
    subprocess.run([sys.executable, "-c", JOB, str(log), "succeeded"], capture_output=True,
                   env={"PYTHONPATH": str(REPO / "workflow")}, check=False)
    text = log.read_text()
    assert re.findall(r"^===== attempt (\d+)", text, flags=re.M) == ["1", "2"], text
    assert text.index("working in failed") < text.index("working in succeeded")


# -- what a writer removes, names and hashes ---------------------------------------------------

def test_stale_folders_and_temporaries_are_only_those_of_their_own_target(tmp_path):
    """A writer removes what a killed writer of the SAME output left; another output's
    staging folder (an export of another bundle into results/models/, running now) and a
    user's own files beside it are not its to delete."""
    from brainage.io import stale_staging_folders

    models = tmp_path / "models"
    own = [models / ".a.staging-abcd1234", models / ".a.old-abcd_123"]
    others = [models / ".b.staging-abcd1234", models / ".ab.staging-abcd1234",
              models / ".a.staging-abcd12345", models / ".a.backup-abcd1234",
              # a lab's own hidden copies, named as a release before 2026-12-04 named its
              # staging folders: not told apart, so not removed
              models / ".a.20261206", models / ".a.original", models / ".a.old.20261130"]
    for folder in own + others:
        folder.mkdir(parents=True)
    (models / ".a.old.20261130" / "a").mkdir()
    (models / "a").mkdir()
    (models / "a" / "old.txt").write_text("previous")
    assert stale_staging_folders(models / "a") == sorted(own)
    with staged_folder(models / "a", what="a test") as staging:
        (staging / "new.txt").write_text("new")
    assert all(not folder.exists() for folder in own)
    assert all(folder.is_dir() for folder in others)
    assert [path.name for path in (models / "a").iterdir()] == ["new.txt"]

    temporary = tmp_path / ".out.json.k3j_x9ab.json"
    users = [tmp_path / ".out.json.notes.txt", tmp_path / ".out.json.bak",
             tmp_path / ".other.json.k3j_x9ab.json"]
    for path in [temporary, *users]:
        path.write_text("{}")
    assert stale_temporaries(tmp_path / "out.json") == [temporary]


def test_a_temporary_name_in_use_is_never_written_through(tmp_path, monkeypatch):
    """Two writers drawing the same random name: the second must take another name, not
    write into (and rename away) the first one's temporary file."""
    from brainage import io as io_module

    draws = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(io_module._NAMES, "choices", lambda letters, k: list(next(draws)))
    theirs = tmp_path / ".out.json.aaaaaaaa.json"
    theirs.write_text("another writer's")
    write_json(tmp_path / "out.json", {"mae": 3.5})
    assert theirs.read_text() == "another writer's"
    assert (tmp_path / "out.json").read_text() == '{\n  "mae": 3.5\n}'


def test_a_staged_folder_is_on_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Each file of a bundle is synced under its staging name (before the rename): else a
    crash right after an export can leave the bundle's name on empty files."""
    from brainage import io as io_module

    synced = []
    monkeypatch.setattr(io_module, "_sync_file", lambda path: synced.append(Path(path)))
    with staged_folder(tmp_path / "bundle", what="a test") as staging:
        (staging / "encoder.pt").write_bytes(b"weights")
        (staging / "sub").mkdir()
        (staging / "sub" / "readout.pt").write_bytes(b"readout")
    assert sorted(synced) == sorted([staging / "encoder.pt", staging / "sub" / "readout.pt"])
    assert (tmp_path / "bundle" / "sub" / "readout.pt").read_bytes() == b"readout"


def test_sha256_file_hashes_the_whole_file_chunk_by_chunk(tmp_path):
    """The digest a bundle's manifest records: of every byte, not the first chunk's (a file
    edited past its first MiB would pass the check)."""
    import hashlib

    data = bytes(range(256)) * 10
    (tmp_path / "blob").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "blob", chunk_bytes=100) == expected
    assert sha256_file(tmp_path / "blob") == expected


def test_payload_bytes_counts_a_shared_storage_once():
    """torch.save writes a storage shared by several tensors (a tied weight, a view) once:
    counting it for each would refuse a write on a disk with room for it."""
    import torch

    from brainage.io import payload_bytes

    weight = torch.zeros(1000)  # 4000 bytes of float32
    payload = {"model": {"a": weight, "b": weight, "view": weight[:10]},
               "other": [torch.zeros(5, dtype=torch.float64)]}
    assert payload_bytes(payload) == 4000 + 40


def test_write_json_writes_numpy_numbers_as_the_numbers_they_hold(tmp_path):
    """A count or a seed from NumPy (np.int64) is written as an integer, not 3.0 (which a
    reader of metrics.json or a config would take as a float)."""
    import json

    import numpy as np

    write_json(tmp_path / "m.json", {"n": np.int64(3), "mae": np.float32(0.5),
                                     "ids": np.array([1, 2]), "path": tmp_path / "x"})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"n": 3, "mae": 0.5, "ids": [1, 2], "path": str(tmp_path / "x")}
    assert '"n": 3,' in text
