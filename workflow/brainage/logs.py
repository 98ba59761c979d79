"""Logging for pipeline jobs: the package logs, the rule's ``log:`` file receives it.

A job's log keeps every attempt since the job last succeeded, each after a separator line
``===== attempt <n> (<start time>, <host>, pid <pid>[, SLURM job <id>][, run <id>]) =====``, so a
cluster user sees why a job was retried: a traceback, an exit status, "stopped by SIGTERM"
(a time limit, scancel, preemption; the stacks of that moment come first, written by
faulthandler), a native crash's "Fatal Python error" and stacks, or, for an attempt whose
log just stopped (SIGKILL: the out-of-memory killer), a warning of the next attempt. The
log is opened at the package's first import inside a job of this workflow
(brainage/__init__.py), so a failing import of PyTorch or ANTsPy is in it too.

Snakemake deletes a job's log before every attempt, so the log has a second name, a hidden
companion (``.<log name>.attempts``, a hard link; a copy where the file system has none)
that Snakemake does not know about; a new attempt gives it its log name back first. The
companion is deleted when the attempt succeeds: it ends without an uncaught exception and
without ``sys.exit`` of a failure status (an argparse error, ``sys.exit(1)``,
``sys.exit("message")``). A ``raise SystemExit(1)`` written out passes neither hook: code
that runs after :func:`log_to_file` ends a job with ``sys.exit``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import faulthandler
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Opens every attempt in a log; counted to number the next attempt.
ATTEMPT_MARK = "===== attempt "
#: The environment variable that names the Snakemake run a job belongs to (set by the
#: workflow's main process, inherited by its jobs), written into each attempt's header.
RUN_ID_VARIABLE = "BRAINAGE_RUN_ID"
#: The interpreter's own sys.exit, taken at import: what :func:`log_to_file`'s
#: replacement calls, so calling log_to_file again does not stack replacements.
_SYS_EXIT = sys.exit
#: The job log :func:`log_to_file` opened in this process: the package opens it at its first
#: import inside a Snakemake job (brainage/__init__.py), before the script's own call.
_OPENED: list[Path] = []
#: The job log's file objects that faulthandler writes into (kept open: it holds the fd).
_FAULT_LOGS: list = []
#: An ERROR line of the package: an attempt that logged one ended with a message (a
#: companion of a failed attempt keeps these; see :func:`_how_it_ended`).
_PACKAGE_ERROR = re.compile(r"^\S+ \S+ ERROR brainage[\w.]*: ")


def attempts_file(path: str | Path) -> Path:
    """The companion of the log ``path`` that keeps the unfinished attempts."""
    path = Path(path)
    return path.with_name(f".{path.name}.attempts")


def _one_file_two_names(path: Path, history: Path) -> bool:
    """Make the log and its companion one file under two names (a hard link), so that what
    is written into the log by any means (faulthandler's stacks, written from C, too) is in
    the companion that survives Snakemake's deletion of the log before a retry. The earlier
    attempts come back into a log Snakemake deleted as the companion's second name. Returns
    False where the file system has no hard links: two files, the log's lines copied."""
    try:
        if not history.is_file():
            with open(path, "a", encoding="utf-8"):
                pass
            os.link(path, history)
            _group_writable(path)  # attempts of a colleague's rerun append to it
        elif not (path.is_file() and os.path.samefile(path, history)):
            # a log recreated meanwhile (by whatever starts the job), or two files of an
            # older version: the one holding more stands under both names
            more, other = ((path, history) if path.is_file()
                           and path.stat().st_size >= history.stat().st_size
                           else (history, path))
            linked = other.with_name(f".{other.name}.linking-{os.getpid()}")
            os.link(more, linked)
            os.replace(linked, other)
        return True
    except OSError:
        if history.is_file() and (not path.is_file()
                                  or path.stat().st_size < history.stat().st_size):
            shutil.copyfile(history, path)
        return False


def _take_over_a_colleagues_history(history: Path) -> Path | None:
    """Make the companion ``history`` this process's to append to where a colleague left it
    unwritable (under umask 022: every later attempt of the job failed at import). A copy
    of our own, the group's to write, replaces it (the folder is writable: Snakemake
    deleted the log). One this process cannot even read (0600, an older version's under
    umask 077) is set aside, and its name returned for the new attempt to name."""
    if not history.is_file() or os.access(history, os.W_OK):
        return None
    own = history.with_name(f"{history.name}.own-{os.getpid()}")
    try:
        shutil.copyfile(history, own)
        _group_writable(own)
        os.replace(own, history)
        return None
    except OSError:
        with contextlib.suppress(OSError):
            own.unlink()
    aside = history.with_name(f"{history.name}.unreadable-{os.getpid()}")
    try:
        os.replace(history, aside)
    except OSError as error:
        raise PermissionError(
            f"{history} keeps the earlier attempts of the job log {history.parent}/"
            f"{history.name[1:].removesuffix('.attempts')}; it belongs to {_owner(history)} "
            f"and this job can neither write nor replace it ({error.strerror}): ask them to "
            f"delete it (or delete it yourself if you may) and run the job again") from None
    return aside


def _group_writable(path: Path) -> None:
    """Let the group write ``path`` whatever the umask (not ours to change: left as is)."""
    with contextlib.suppress(OSError):
        os.chmod(path, path.stat().st_mode & 0o777 | 0o660)


def user_name(uid: int) -> str:
    """The login name of user ``uid`` where this machine knows it, else ``uid <n>``."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _owner(path: Path) -> str:
    """The user who owns ``path``, for a message."""
    return f"user {user_name(path.stat().st_uid)}"


def _how_it_ended(attempt: Sequence[str], number: int, *, linked: bool = True) -> str | None:
    """The warning a new attempt gives about the last one (its ``attempt`` lines) when that
    ended without an error line of the package's own: from the stacks faulthandler left, a
    native crash or a SIGTERM that Python could not answer before SIGKILL; without any, a
    process killed outright."""
    if any(_PACKAGE_ERROR.match(line) for line in attempt):
        return None
    if any(line.startswith("Fatal Python error") for line in attempt):
        return (f"attempt {number} crashed in native code (its 'Fatal Python error' and stacks "
                f"are above)")
    if any("(most recent call first)" in line for line in attempt):
        return (f"attempt {number} got SIGTERM (a time limit, scancel or preemption) and was "
                f"killed before it could stop (its stacks at the signal are above)")
    # without hard links faulthandler's stacks went to the deleted log: a crash looks so too
    crashed = "" if linked else " or crashed in native code"
    slurm_job = _ATTEMPT_SLURM_JOB.search(attempt[0]) if attempt else None
    which = (f"`sacct -j {slurm_job[1]} -X -o JobID,State,MaxRSS,Elapsed` says which "
             f"(OUT_OF_MEMORY, TIMEOUT, NODE_FAIL)" if slurm_job
             else "on SLURM `sacct -j <job id>` of that attempt says which")
    return (f"attempt {number} ended without a message: its process was killed outright "
            f"(SIGKILL: the out-of-memory killer, a time limit's final kill, or a lost node)"
            f"{crashed}; Snakemake's error for it names the signal, and {which}")


def _start_attempt(path: Path) -> bool:
    """Restore the earlier attempts into ``path`` and open a new one, in the log and its
    companion (one file under two names where it can: :func:`_one_file_two_names`, whose
    result this returns).

    An earlier attempt that ended without an error line of its own was killed or crashed:
    its log just stopped (or ends in stacks), so the new attempt says so, first
    (:func:`_how_it_ended`), as a warning of this run.
    """
    history = attempts_file(path)
    set_aside = _take_over_a_colleagues_history(history)
    restored = history.is_file()
    linked = _one_file_two_names(path, history)
    lines: list[str] = []
    if path.is_file():
        with open(path, encoding="utf-8", errors="replace") as log:
            lines = log.read().splitlines()
    previous = sum(line.startswith(ATTEMPT_MARK) for line in lines)
    now = datetime.datetime.now().astimezone()
    slurm_job = os.environ.get("SLURM_JOB_ID")
    run = os.environ.get(RUN_ID_VARIABLE, "")
    text = (f"{ATTEMPT_MARK}{previous + 1} ({now.isoformat(timespec='seconds')}, "
            f"{socket.gethostname()}, pid {os.getpid()}"
            f"{f', SLURM job {slurm_job}' if slurm_job else ''}"
            f"{f', run {run}' if run.isalnum() else ''}) =====\n")
    # in this attempt, in the log's own format: they are this run's warnings (job_warnings)
    warning = f"{now:%Y-%m-%d %H:%M:%S},{now.microsecond // 1000:03d} WARNING brainage.logs: "
    if set_aside:
        text += (f"{warning}the earlier attempts of this job are in {set_aside}, left by "
                 f"{_owner(set_aside)} and not readable here: this log starts a new history\n")
    if restored and previous:
        last = lines[max(i for i, line in enumerate(lines) if line.startswith(ATTEMPT_MARK)):]
        ending = _how_it_ended(last, previous, linked=linked)
        if ending:
            text += f"{warning}{ending}\n"
    for file in (path,) if linked else (path, history):
        with open(file, "a", encoding="utf-8") as log:
            log.write(text)
    return linked


def _log_not_started(path: Path, error: OSError) -> Exception:
    """The error for a job whose log ``path`` could not be written: Python's own (``OSError:
    [Errno 28]`` at ``import brainage``) named no file, and the log Snakemake points to
    stayed empty."""
    from brainage.io import WriteError, write_failure  # numpy and pandas: not at import

    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return WriteError(f"{write_failure(path, error)}: the job's log could not be started, "
                      f"so the job did nothing. "
                      + ("The disk or quota of the log folder is full: free space there "
                         "(README, 'Freeing disk space') and run again."
                         if full else "Make the log folder writable, or set output.logs "
                         "to one that is, and run again."))


def log_to_file(path: str | Path | None, level: int = logging.INFO) -> None:
    """Send the root logger to ``path`` (if any) and to stderr.

    Called first thing by every script in workflow/scripts/, so each job's log holds what
    the package reported, including a traceback when the job fails, below the lines of
    the attempts that were killed or failed before (module docstring). With a ``path``
    (a job's log) it also takes over ``sys.excepthook``, ``sys.exit`` and SIGTERM, to
    record how the attempt ended; without one (a command's console) it leaves them be.
    """
    if path and Path(path).resolve() in _OPENED:
        return  # opened at the package's first import in this job: one attempt, not two
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    failed = []
    if path:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            linked = _start_attempt(path)
        except OSError as error:  # the first write of every job: a full disk shows here
            raise _log_not_started(path, error) from error
        _OPENED.append(path.resolve())
        # UTF-8 whatever the node's locale: under a latin-1 one a study named Łódź lost
        # its log lines ("--- Logging error ---")
        handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
        if not linked:
            handlers.append(logging.FileHandler(attempts_file(path), mode="a",
                                                encoding="utf-8"))

        def forget_attempts_after_success() -> None:
            if not failed:
                attempts_file(path).unlink(missing_ok=True)

        atexit.register(forget_attempts_after_success)
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)

    def log_uncaught(kind, value, traceback):
        failed.append(kind)
        logging.getLogger("brainage").error("job failed", exc_info=(kind, value, traceback))

    def exit_noting_failure(status=None):
        # sys.exit raises SystemExit, which the interpreter handles without calling
        # sys.excepthook: a job that ended with sys.exit(1) or an argparse error counted as
        # a success, its companion was deleted and the next attempt's log lost the history.
        # The status is noted here, where it is known; the message of sys.exit("...")
        # goes to stderr, which is not the job's log. A SystemExit that the code catches
        # and survives keeps the history too: a log with earlier attempts, none lost.
        if status is not None and status != 0:
            failed.append(SystemExit)
            code, reason = (status, "") if isinstance(status, int) else (1, f": {status}")
            logging.getLogger("brainage").error("job ended with exit status %d%s", code,
                                                reason)
        _SYS_EXIT(status)

    def stop_on_sigterm(number, frame):
        # SLURM's time limit, scancel and preemption send SIGTERM, then SIGKILL: by
        # default the log just stopped, like that of an out-of-memory kill. As an exception
        # the clean-ups run too (temporary files of atomic writes are removed).
        failed.append(SystemExit)
        slurm_job = os.environ.get("SLURM_JOB_ID")
        # which of them it was decides the remedy (a time limit wants a longer wall time, a
        # preemption nothing), and only SLURM knows it. Only the heavy rules have a config
        # key for it (resources.<section>.runtime_min); the others' is fixed in the rule.
        which = (f"; `sacct -j {slurm_job} -X -o JobID,State,Timelimit,Elapsed` says which "
                 f"(TIMEOUT: raise the job's wall time: resources.<section>.runtime_min where "
                 f"the config has one for it, else --set-resources <rule>:runtime=<minutes>, as the "
                 f"README's SLURM section says)"
                 if slurm_job else "")
        logging.getLogger("brainage").error(
            "job stopped by SIGTERM (a SLURM time limit, scancel or preemption, or Snakemake "
            "stopping the run)%s; a training resumes from its last checkpoint at the next "
            "attempt, other jobs start again", which)
        raise SystemExit(128 + signal.SIGTERM)

    if not path:  # a command's console, or brainage.predict.main called from Python: the
        return    # hooks keep a job's history only, and must not outlive the call
    sys.excepthook = log_uncaught
    sys.exit = exit_noting_failure
    # Python's handler runs only between bytecodes: inside ITK, N4 or a collective it
    # waited for the call to return, often past SLURM's SIGKILL 30 s later. faulthandler
    # writes the stacks into the log at once, from C (and a crash's, SIGSEGV or SIGABRT in
    # ITK, PyTorch or NCCL, which the next attempt took for an out-of-memory kill).
    # The log's companion is the same file where hard links work, so the stacks survive a
    # retry. A second call (another log) moves both to its file.
    faulthandler.disable()
    while _FAULT_LOGS:
        _FAULT_LOGS.pop().close()
    _FAULT_LOGS.append(open(path, "a", encoding="utf-8"))  # open while the process lives
    faulthandler.enable(file=_FAULT_LOGS[-1], all_threads=True)
    if threading.current_thread() is threading.main_thread():
        faulthandler.unregister(signal.SIGTERM)  # else the handler below replaced it
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        faulthandler.register(signal.SIGTERM, file=_FAULT_LOGS[-1], all_threads=True,
                              chain=True)


@contextlib.contextmanager
def also_logging_to(path: str | Path, heading: str,
                    earlier: Sequence[logging.LogRecord] = ()):
    """While inside, the root logger's records also go to ``path``, appended below a line
    ``===== <heading> (<start time>, <host>, pid <pid>) =====`` and the ``earlier`` records
    (logged before the file could be opened, e.g. :class:`EarlyRecords`): a command's log
    kept with its outputs (``predict run``'s ``<output>/logs/predict_run.log``), each run
    below the one before, so a warning outlives the console it was printed to. Processes
    started meanwhile by :func:`brainage.preprocess.chain.run_subjects` write to it too."""
    from brainage.io import write_failure

    path = Path(path)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:  # a full disk or a read-only folder: named, not a traceback
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"===== {heading} ({started}, {socket.gethostname()}, pid "
                      f"{os.getpid()}) =====\n")
    except OSError as error:
        raise write_failure(path, error) from error
    handler = _appending_handler(path)
    for record in earlier:
        handler.emit(record)
    logging.getLogger().addHandler(handler)
    try:
        yield path
    except BaseException as error:  # the console shows it; the log keeps why the run ended
        handler.emit(logging.LogRecord("brainage", logging.ERROR, __file__, 0, "stopped: %s",
                                       (str(error) or type(error).__name__,), None))
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        try:
            handler.close()
        except OSError:  # its last flush on a full disk: the error that ended the run wins
            pass


#: A warning's first line in a job log (:data:`FORMAT`): its logger and message.
_WARNING_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING ([\w.]+): (.*)$")
#: The start time in an attempt's separator line (:func:`_start_attempt`).
_ATTEMPT_START = re.compile(re.escape(ATTEMPT_MARK) + r"\d+ \(([^,]+),")
#: The run an attempt belongs to, at the end of its header (:data:`RUN_ID_VARIABLE`).
_ATTEMPT_RUN = re.compile(r", run ([A-Za-z0-9]+)\) =====$")
#: The SLURM job of an attempt, wherever it stands among the header's optional parts.
_ATTEMPT_SLURM_JOB = re.compile(r", SLURM job (\d+)[,)]")


def job_warnings(log_root: str | Path, since: datetime.datetime, *,
                 written_since_ns: int | None = None,
                 run_id: str | None = None) -> list[tuple[Path, str]]:
    """The warnings of this run's job attempts under ``log_root`` (the ``logs`` folder):
    ``(log file, the warning's first line)``, by file.

    Snakemake shows a job's log only when the job fails, so a warning of a job that
    succeeded (a subject that failed QC, a further map with holes, a read-out at its
    grid's end) was seen only by whoever read every log. An attempt is this run's when its
    header names ``run_id`` (:data:`RUN_ID_VARIABLE`); one that names no run is judged by
    its start time, at ``since`` or later, which the node that ran it wrote by its own
    clock (a node a minute slow hid its warnings). Only the logs written since the run
    started are read: since ``written_since_ns`` by the clock that stamps them
    (:func:`brainage.io.file_system_clock_ns`; a file server minutes slow hid them all by
    this host's), else since ``since``.
    """
    since = since.replace(microsecond=0)  # attempts record whole seconds
    found: list[tuple[Path, str]] = []
    root = Path(log_root)
    if not root.is_dir():
        return found
    for path in sorted(root.rglob("*.log")):
        try:
            written = path.stat().st_mtime_ns
            if (written < written_since_ns if written_since_ns is not None
                    else written / 1e9 < since.timestamp()):
                continue  # nothing written since: no attempt of this run
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        current = False
        for line in lines:
            started = _ATTEMPT_START.match(line)
            if started:
                named = _ATTEMPT_RUN.search(line)
                if run_id is not None and named:
                    current = named.group(1) == run_id
                    continue
                try:
                    current = datetime.datetime.fromisoformat(started.group(1)) >= since
                except ValueError:
                    current = False
                continue
            warning = _WARNING_LINE.match(line) if current else None
            if warning:
                found.append((path, warning.group(2)))
    return found


def say_job_warnings(log_root: str | Path, since: datetime.datetime, *, shown: int = 20,
                     stream=None, emit: Callable[[str], object] | None = None,
                     written_since_ns: int | None = None,
                     run_id: str | None = None) -> int:
    """Print the warnings of this run's jobs (:func:`job_warnings`) after Snakemake's
    own summary (the Snakefile's ``onsuccess`` and ``onerror``), one line per message
    (the first of its logs, and how many more), at most ``shown`` lines; returns the
    number of warnings. ``written_since_ns``, ``run_id``: as for :func:`job_warnings`.

    ``emit`` takes the whole text instead of ``stream`` (default stderr): the Snakefile
    passes Snakemake's logger, which also writes it into the run's ``.snakemake/log`` file,
    where a cluster user finds it after the terminal's scrollback is gone."""
    found = job_warnings(log_root, since, written_since_ns=written_since_ns, run_id=run_id)
    # one line per message: the same warning of every subject must not hide the others
    logs_of: dict[str, list[Path]] = {}
    for path, message in found:
        logs_of.setdefault(message, []).append(path)
    if not found:
        return 0
    lines = [f"brainage: the jobs of this run logged {len(found)} warning(s); read them "
             f"before the results (paths relative to the run's folder):"]
    for message, paths in list(logs_of.items())[:shown]:
        # the project's messages end in what to do: cut the middle (a list of subjects), not
        # the end
        short = message if len(message) <= 600 else message[:400] + " ... " + message[-195:]
        more = f" and {len(paths) - 1} more log(s)" if len(paths) > 1 else ""
        lines.append(f"  {paths[0]}{more}: {short}")
    if len(logs_of) > shown:
        lines.append(f"  ... and {len(logs_of) - shown} other warning(s): grep -r WARNING "
                     f"{log_root}")
    if emit is not None:
        emit("\n".join(lines))
    else:
        stream = stream if stream is not None else sys.stderr
        print("\n".join(lines), file=stream)
        stream.flush()
    return len(found)


def log_files() -> list[str]:
    """The files the root logger writes to (a worker process started fresh is given them)."""
    return [handler.baseFilename for handler in logging.getLogger().handlers
            if isinstance(handler, logging.FileHandler)]


def log_to_files(files: Sequence[str], level: int = logging.INFO) -> None:
    """A worker process's logging: stderr, as :func:`log_to_file` without a file, and
    ``files`` (:func:`log_files` of the parent), appended to."""
    log_to_file(None, level)
    for file in files:
        logging.getLogger().addHandler(_appending_handler(file))


def _appending_handler(path: str | Path) -> logging.FileHandler:
    """A handler that appends the job log's format to ``path``."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


class EarlyRecords(logging.Handler):
    """Keeps the root logger's records from its start until :meth:`stop`: what a command
    logs before it may write its log file (``predict run`` checks its output folder and
    its cohort first), for :func:`also_logging_to` to write after its heading."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        logging.getLogger().addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def stop(self) -> list[logging.LogRecord]:
        """Stop keeping records; returns those kept."""
        logging.getLogger().removeHandler(self)
        return self.records

