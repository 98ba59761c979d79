"""Writing files so that a kill never leaves half of one: atomic writes (a temporary name,
then a rename), tensors with their sha256, JSON and TSV, and a clear error naming the file
and the free space when a write fails.

Reading and checking the input dataset is :mod:`brainage.inputs`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class WriteError(OSError, RuntimeError):
    """Writing an output failed; the message names the file, the reason and the free space.

    Both an ``OSError`` and a ``RuntimeError``, the two kinds a failed write arrives as
    (PyTorch reports a full disk as ``RuntimeError``), so callers catching either still
    catch it.
    """


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: str | Path) -> int:
    """Bytes free for an unprivileged writer on the filesystem holding ``folder``."""
    return shutil.disk_usage(folder).free


def file_system_clock_ns(folder: str | Path) -> int:
    """The current time as the file system that holds ``folder`` (or will: its nearest
    existing parent) stamps files, in ns since the epoch: the modification time of a file
    created there and removed at once. A network file system stamps files by its server's
    clock, which can differ from this host's by minutes, and Snakemake compares those
    stamps; this host's clock where nothing can be written (a dry run in a read-only
    project)."""
    folder = Path(folder).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".clock-") as probe:
            return os.fstat(probe.fileno()).st_mtime_ns
    except OSError:
        return time.time_ns()


def write_failure(final: Path, error: BaseException) -> WriteError:
    """The error to raise when writing ``final`` failed: what, why, and how much room is
    left, because a full disk is the usual reason on a cluster and its own messages
    (``basic_ios::clear: iostream error``) name neither the file nor the cause."""
    folder = final.parent if final.parent.exists() else Path.cwd()
    try:
        room = f"{free_bytes(folder)} bytes free on {_mount_point(folder)}"
    except OSError:
        room = "free space unknown"
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return WriteError(f"writing {final} failed: {reason} ({room})")


def _temporary_affixes(final: Path, suffix: str = "") -> tuple[str, str]:
    """Prefix and suffix of :func:`atomic_path`'s temporary names for ``final``; between
    them :func:`_create_temporary` puts a random run of :data:`_NAME_LETTERS`."""
    return f".{final.name}.", suffix or "".join(final.suffixes)


#: The letters of a temporary name's random part (those ``tempfile`` uses).
_NAME_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"
#: Its own generator, seeded by the system: a training seeds the random module, and a
#: write must neither change the training's random numbers nor repeat names.
_NAMES = random.SystemRandom()


def _create_unused(folder: Path, prefix: str, suffix: str, create) -> Path:
    """``create`` (which must fail with FileExistsError on an existing name) the first
    free ``<prefix><8 random letters><suffix>`` in ``folder``; returns its path."""
    for _ in range(100):
        path = folder / f"{prefix}{''.join(_NAMES.choices(_NAME_LETTERS, k=8))}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no unused name {prefix}<random>{suffix} in {folder}")


def _create_temporary(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty file ``<prefix><8 random letters><suffix>`` in ``folder``.

    Created as ``open()`` creates any file (mode 0666, which the umask or the folder's
    default ACL reduces), not private as ``tempfile.mkstemp`` makes it (0600): the file
    becomes the output, which must get the permissions a plain write gives. A chmod
    afterwards cannot: it ignores a default ACL (a shared project folder's ``setfacl -d``)
    and made an output readable by every user of the cluster.
    """
    return _create_unused(folder, prefix, suffix, lambda path: os.close(
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def create_staging_folder(parent: str | Path, prefix: str) -> Path:
    """Create an empty folder ``<prefix><8 random letters>`` in ``parent``, to be filled
    and then renamed into place (:func:`sync_tree` first).

    Created as ``mkdir`` creates any folder (mode 0777, which the umask or the parent's
    default ACL reduces), not private as ``tempfile.mkdtemp`` makes it (0700): the folder
    becomes the output (a model bundle, a dataset). A chmod afterwards ignores a shared
    project folder's default ACL, as for files (:func:`_create_temporary`).
    """
    return _create_unused(Path(parent), prefix, "", lambda path: os.mkdir(path, 0o777))


@contextmanager
def work_folder(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A scratch folder in ``parent`` (a subject's output folder) for a tool's own files,
    removed on exit. Made as :func:`create_staging_folder` makes one, with the mode any new
    folder gets: ``tempfile.TemporaryDirectory`` made it 0700, so the one a killed job left
    could not be deleted by colleagues in the project's group."""
    folder = create_staging_folder(parent, prefix)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sync_tree(folder: str | Path) -> None:
    """:func:`_sync_file` every file under ``folder``, then the folders, deepest first:
    before a staging folder is renamed into place, so that a crash leaves the old folder or
    the whole new one, not one of empty files (the files' writers, e.g. ``torch.save``, do
    not sync)."""
    folder = Path(folder)
    entries = sorted(folder.rglob("*"))
    for path in entries:
        if path.is_file() and not path.is_symlink():
            _sync_file(path)
    for path in reversed([folder, *entries]):
        if path.is_dir() and not path.is_symlink():
            _sync_folder(path)


def _sync_file(path: Path) -> None:
    """Wait until the data of the written file ``path`` is on the disk (``os.fsync``).

    The file is opened again by name, so this covers the writers that write by name
    (``nibabel.save``, ``torch.save``, ``DataFrame.to_csv``) as well as those given a
    handle. A write error that the filesystem reports only now (a quota or a full disk on
    NFS, which are checked when the data is sent to the server) is raised here.
    """
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _sync_folder(folder: Path) -> None:
    """Ask for the entries of ``folder`` (a rename into it) to be put on the disk.

    Best effort: some filesystems refuse ``fsync`` on a folder (EINVAL), and the file is
    in place by now, so a failure here must not report the write as failed.
    """
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


class LockHeldError(RuntimeError):
    """Another process holds the lock :func:`writer_lock` was told not to wait for."""


@contextmanager
def writer_lock(lock_file: str | Path, *, wait: bool, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` while inside: two processes that write the
    same output (two exports of one bundle, two ``predict run`` into one folder) took each
    other's half-written folder for a killed writer's and deleted it. ``wait``: wait for
    the other process (logged), else raise :class:`LockHeldError` naming ``what``.

    The file is created empty and removed on release, so it is there only while a writer
    works; a waiter that locked a file removed meanwhile locks the new one instead. Where
    this process cannot lock (a file system or a node without locks, a read-only handle on
    NFS) it writes unlocked, with a warning, and leaves the file: another writer may hold it.
    """
    import fcntl

    lock_file = Path(lock_file)
    handle = None
    while True:
        try:
            handle = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            # writable by the group whatever the umask: on NFS an exclusive lock needs a
            # handle open for writing (flock(2)), and a read-only one locked nothing there
            with contextlib.suppress(OSError):  # a colleague's: not ours to change
                os.fchmod(handle, os.fstat(handle).st_mode & 0o777 | 0o660)
        except OSError:  # a colleague's under a stricter umask (a read-only handle locks it
            try:         # on a local disk)
                handle = os.open(lock_file, os.O_RDONLY)
            except OSError:
                handle = None
                break
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(handle)
                raise LockHeldError(f"another process is writing {what} now (it holds "
                                    f"{lock_file}): wait for it to finish.") from None
            log.info("waiting for another process that writes %s (it holds %s)", what,
                     lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # no locks here (ENOLCK), or a read-only handle on NFS
            log.warning("could not lock %s (%s): %s is written without holding off another "
                        "writer at the same time", lock_file, error.strerror or error, what)
            os.close(handle)
            handle = None
            # and the file stays: another writer may hold a lock on it now (EBADF of a
            # read-only handle on NFS, or ENOLCK of this node's lock service only), and a
            # third would get in beside it if it went. Left empty, it holds off nobody.
            break
        try:
            if os.stat(lock_file).st_ino == os.fstat(handle).st_ino:
                break  # the file that is there now: this process holds the lock
        except FileNotFoundError:
            pass
        os.close(handle)  # removed by the writer before: lock the one there now
    try:
        yield
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                lock_file.unlink()
            os.close(handle)  # releases the lock


@contextmanager
def staged_folder(target: str | Path, *, what: str) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` to write into; on success it is synced
    (:func:`sync_tree`) and replaces ``target`` as a whole, on any error it is removed and
    ``target`` left as it was: :func:`atomic_path` for a folder (a model bundle, a
    simulated dataset). Writers of one ``target`` take turns (:func:`writer_lock` on
    ``.<name>.lock`` beside it, there while one writes, and after a writer that was
    killed or could not lock).

    The folder is ``.<name>.staging-<random>`` (:func:`create_staging_folder`). A
    non-empty ``target`` is first moved into ``.<name>.old-<random>`` and deleted after
    the rename, or put back if the rename fails; at no point does ``target`` hold a mix of
    old and new files. A kill skips the clean-up, so the folders a killed writer of
    ``target`` left are removed first (:func:`stale_staging_folders`), and logged as left
    by ``what`` (e.g. ``"an export"``) that was killed: only the process that holds the
    lock may do this. A ``target`` that is a symbolic link is replaced where it
    points (a bundle folder on a shared drive), and the link kept. An ``OSError`` of
    making, syncing or renaming the folder (a full disk, a folder that cannot be written)
    is re-raised as :class:`WriteError` naming ``target`` and the free space; a
    :class:`WriteError` of a file written into it (``atomic_path``, ``save_tensors``) is
    re-raised naming the file as in ``target``, not in the staging folder, which is gone
    by then.
    """
    target = Path(target)
    if target.is_symlink():  # replaced where the link points (a shared drive), link kept
        target = target.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failure(target, error) from error
    with writer_lock(target.parent / f".{target.name}.lock", wait=True, what=str(target)):
        try:
            for stale in stale_staging_folders(target):
                shutil.rmtree(stale, ignore_errors=True)
                log.info("removed %s, left by %s of %s that was killed", stale, what, target)
            staging = create_staging_folder(target.parent, prefix=f".{target.name}.staging-")
        except OSError as error:
            raise write_failure(target, error) from error
        try:
            try:
                yield staging
            except WriteError as error:  # a file of the folder: named as in ``target``
                raise WriteError(str(error).replace(str(staging), str(target))) from error
            try:  # the caller's own errors (a missing input too) pass unchanged
                sync_tree(staging)  # whole on the disk before it is renamed into place
                _replace_folder(staging, target)
            except OSError as error:  # a full disk, a read-only folder: named, room left
                raise write_failure(target, error) from error
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` onto ``target`` (``os.replace`` cannot replace a
    non-empty folder: such a ``target`` is moved aside first)."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(staging, target)
    else:
        old = create_staging_folder(target.parent, prefix=f".{target.name}.old-")
        os.replace(target, old / target.name)
        try:
            os.replace(staging, target)
        except BaseException:  # a Ctrl-C between the two renames too: never no target
            os.replace(old / target.name, target)  # put the previous folder back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    _sync_folder(target.parent)


def stale_staging_folders(target: str | Path) -> list[Path]:
    """The folders :func:`staged_folder` made beside ``target`` that a killed process left
    behind: ``.<name>.staging-<random>`` (written halfway) and ``.<name>.old-<random>``
    (holding the ``target`` being replaced). Those of releases before 2026-12-04 are left
    alone (README, upgrade notes): their names (``.<name>.<random>``) cannot be told from a
    lab's own hidden copies (``.<name>.original``), and those releases took no lock, so one
    may still be writing."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    name = re.compile(re.escape(f".{target.name}.") + r"(staging|old)-[a-z0-9_]{8}")
    return sorted(path for path in target.parent.iterdir()
                  if name.fullmatch(path.name) and path.is_dir() and not path.is_symlink())


@contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` on success.

    A crash leaves no half-written ``final``; the temporary file is removed (a kill
    leaves it behind: :func:`remove_stale_temporaries`). A failure of the write itself
    (``OSError``, or the ``RuntimeError`` PyTorch raises for a full disk) is re-raised as
    :class:`WriteError` naming ``final`` and the free space.

    The file's data is on the disk before the rename (``os.fsync``), and the folder is
    synced after it: a node that crashes or loses power right after a job leaves ``final``
    whole, or the previous ``final``, never an empty or cut short one under the final
    name. About 0.5 ms a file on a local ext4 disk.
    """
    final = Path(final)
    prefix, temp_suffix = _temporary_affixes(final, suffix)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = _create_temporary(final.parent, prefix, temp_suffix)
    except OSError as error:
        raise write_failure(final, error) from error
    try:
        yield temp
        # Without it the rename can reach the disk before the data does (ext4 with
        # data=writeback, xfs, many network filesystems): after a crash, Snakemake sees a
        # finished output that is empty or truncated, and a later job fails on it.
        _sync_file(temp)
        os.replace(temp, final)
        _sync_folder(final.parent)
    except WriteError:
        raise
    except (OSError, RuntimeError) as error:
        raise write_failure(final, error) from error
    finally:
        if temp.exists():
            temp.unlink()


def stale_temporaries(final: str | Path, suffix: str = "") -> list[Path]:
    """Temporary files of :func:`atomic_path` for ``final`` that a killed process left
    behind (a kill skips the clean-up), e.g. ``.checkpoint.pt.k3j_x9ab.pt`` for
    ``checkpoint.pt``; ``suffix`` as given to :func:`atomic_path`."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    prefix, temp_suffix = _temporary_affixes(final, suffix)
    name = re.compile(re.escape(prefix) + r"[a-z0-9_]+" + re.escape(temp_suffix))
    return sorted(path for path in final.parent.glob(glob.escape(prefix) + "*")
                  if name.fullmatch(path.name) and path.is_file())


def remove_stale_temporaries(final: str | Path, suffix: str = "") -> list[Path]:
    """Delete the :func:`stale_temporaries` of ``final``, logging each; returns what was
    deleted.

    Only for the process that owns ``final`` (e.g. at the start of the job that writes
    it): a temporary still being written by another process looks the same.
    """
    removed = stale_temporaries(final, suffix)
    for path in removed:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by a write that was killed", path)
    return removed


def payload_bytes(payload) -> int:
    """Bytes of the tensor data in a nested dict/list/tuple: what ``torch.save`` writes,
    less a few kB of pickle and zip headers. A storage shared by several tensors counts
    once."""
    import torch

    storages: dict[tuple[int, int], int] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(payload)
    return sum(storages.values())


def ensure_room(final: str | Path, needed_bytes: int) -> None:
    """Raise :class:`WriteError` when the filesystem of ``final`` has fewer than
    ``needed_bytes`` free, before writing starts: a full disk half-way through a
    ``torch.save`` says only ``basic_ios::clear: iostream error``."""
    final = Path(final)
    folder = final.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = free_bytes(folder)
    if needed_bytes > free:
        raise WriteError(f"writing {final} needs about {needed_bytes} bytes but only {free} "
                         f"bytes are free on {_mount_point(folder)}. Free some space there "
                         f"(or move the output folder to a larger disk) and run again; the "
                         f"README's 'Freeing disk space' says which of the pipeline's files "
                         f"can go without costing a rerun.")


class _DigestingWriter:
    """A binary file handle that hashes (sha256) every byte written through it."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()


def write_tensors(temp: str | Path, payload, *, zip_crc32: bool = True) -> str:
    """``torch.save`` ``payload`` into the file ``temp`` through an open handle; returns
    the sha256 (hex) of the bytes written.

    Saving by file name puts the (random) temporary name into every zip member, so
    identical tensors gave different bytes; through a handle the members are always
    ``archive/...``, and identical payloads give identical files and checksums. The
    digest is taken from the bytes on their way to the file (PyTorch writes its zip
    front to back), so a large file is not read again. ``zip_crc32=False`` leaves out the
    zip's CRC32 (PyTorch >= 2.6), for callers that keep the sha256 instead: torch.load
    never checks the CRC.
    """
    import torch

    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    with open(temp, "wb") as handle:
        writer = _DigestingWriter(handle)
        if not zip_crc32 and config is not None and hasattr(config.save, "compute_crc32"):
            with config.patch({"save.compute_crc32": False}):
                torch.save(payload, writer)
        else:
            torch.save(payload, writer)
    return writer.digest.hexdigest()


def save_tensors(path: str | Path, payload, *, zip_crc32: bool = True) -> str:
    """Write ``payload`` to ``path`` with :func:`write_tensors` (identical payloads give
    identical bytes) under a temporary name, then rename; returns the file's sha256.

    Raises
    ------
    WriteError
        Naming ``path``: before anything is written when the filesystem has less room
        than the payload's tensors (:func:`ensure_room`), or when the write fails.
    """
    ensure_room(path, payload_bytes(payload))
    with atomic_path(path) as temp:
        digest = write_tensors(temp, payload, zip_crc32=zip_crc32)
    return digest


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, payload) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=json_default))


def write_tsv(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as temp:
        table.to_csv(temp, sep="\t", index=False)


def json_default(value):
    """``json.dumps``' ``default`` for what the package writes besides plain Python values:
    NumPy scalars (as the numbers they hold), arrays (as lists) and paths (as text)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to an uncompressed ``.npz`` file through a temporary name."""
    with atomic_path(path) as temp, open(temp, "wb") as handle:  # np.savez adds no ".npz"
        np.savez(handle, **arrays)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (no pickles), or ValueError naming the file when it
    is missing or cannot be read; callers add what to rerun."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    # an empty file raises EOFError, a cut-short one zipfile.BadZipFile (neither an OSError
    # nor a ValueError), e.g. after an interrupted copy of the results folder
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error})") from None


def use_a_writable_matplotlib_cache() -> None:
    """Point matplotlib's config and cache folder (``MPLCONFIGDIR``, unless set) at a
    folder of this user's under TMPDIR when HOME is not writable (a read-only HOME on
    cluster nodes, a container without one): matplotlib otherwise logged two warnings in
    every job that draws or imports it (ANTsPy does), one with a random folder name, and
    they filled the end-of-run warnings list. For the processes started after the call
    (Snakemake's jobs), and for this one if it has not imported matplotlib yet."""
    import tempfile

    if "MPLCONFIGDIR" not in os.environ and not os.access(Path.home(), os.W_OK):
        os.environ["MPLCONFIGDIR"] = str(Path(tempfile.gettempdir(),
                                              f"brainage-matplotlib-{os.getuid()}"))


#: Characters that split or expand a word of a path in a shell command (bash splits on
#: ASCII blanks only; ``#`` and ``!`` inside a word are literal): Snakemake writes the
#: Python that runs Snakemake into every job's command unquoted.
SHELL_SPECIAL = re.compile(r"[ \t\n\"'$`\\;&|<>()*?\[]")


def prepare_job_environment(package_dir: str | Path, *, training_python: str) -> None:
    """Set the environment the Snakemake process hands to every job it starts.

    Raises :class:`ValueError` where ``training_python`` (the Python that runs Snakemake,
    outside conda) has a space or another shell character in its path: Snakemake puts it
    into every job's command unquoted, and each job failed with exit status 127 and an
    empty log (a venv in a clone under a lab share named "MRE data").

    - ``PYTHONPATH`` begins with ``package_dir`` (the checkout's ``workflow`` folder, once):
      Snakemake appends a script's folder to ``sys.path``, behind PYTHONPATH and
      site-packages, so another brainage (a stale ``pip install .``, a colleague's editable
      checkout in a shared venv, an old PYTHONPATH in ~/.bashrc) ran the jobs this checkout
      planned, unnoticed;
    - ``PYTHONUTF8=1`` unless set: text is UTF-8 whatever a node's locale (under a latin-1
      one, make_tables failed on its notes' dashes);
    - a writable matplotlib cache (:func:`use_a_writable_matplotlib_cache`);
    - ``BRAINAGE_PACKAGE_DIR`` and ``BRAINAGE_TRAINING_PYTHON``, read by rule
      pretrain_encoder's command (environment, not params: neither changes a result).

    In a conda job Snakemake removes PYTHONPATH; the script then finds the package behind
    the site-packages of the Python that runs Snakemake, and a copy installed there stops
    the job (``brainage/__init__.py``).
    """
    if SHELL_SPECIAL.search(training_python):
        environment = Path(training_python).parent.parent
        raise ValueError(
            f"the Python that runs Snakemake, {training_python}, lies under a path with a "
            f"space or a shell character, and Snakemake writes it into every job's command "
            f"unquoted: each job would fail with exit status 127 and an empty log. Create the "
            f"environment under a path without them, or start Snakemake through a link to "
            f"it, as a module (its snakemake script names the path itself): ln -s "
            f"{shlex.quote(str(environment))} ~/brainage-venv, then ~/brainage-venv/bin/python "
            f"-m snakemake ...")
    package_dir = str(package_dir)
    os.environ.update(BRAINAGE_PACKAGE_DIR=package_dir,
                      BRAINAGE_TRAINING_PYTHON=training_python)
    path = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if path[:1] != [package_dir]:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_dir, *path])
    os.environ.setdefault("PYTHONUTF8", "1")
    use_a_writable_matplotlib_cache()


def headless_pyplot():
    """matplotlib's pyplot for writing figure files: the Agg backend (cluster nodes have no
    display), and ``$`` read as text, not mathtext: labels and titles are data (a study,
    group or bundle name such as "income $50k^$" stopped the figure with a parse error)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt
