"""What a killed Snakemake run leaves in ``.snakemake/``, and the sentence that says what to
run about it.

A Snakemake run that is killed (a closed terminal, a reboot of the login node) leaves
lock files in ``.snakemake/locks/`` and marks the outputs of the jobs it was running in
``.snakemake/incomplete/``. The next run then stops with ``LockException``, and with
``IncompleteFilesException`` where a killed job's output exists (a training's
``history.tsv`` and ``embeddings/``, which grow as it runs, or the files a job with
several outputs finished before the kill; each file is written under a temporary name and
renamed). The workflow prints :func:`interrupted_run_notice` when it
starts, before Snakemake reads these folders: Snakemake parses the Snakefile before it
takes its own lock, so whatever lock is found then belongs to another process. On SLURM
the killed run's jobs live on (queued or running) and a rerun would start each again beside
them, so the notice names the run's ID for ``scancel --name`` (:func:`last_slurm_run_id`).

Snakemake 9's file persistence (the default) stores a lock as ``<n>.input.lock`` /
``<n>.output.lock`` and an incomplete marker as the url-safe base64 of the output's path,
cut into pieces of at most NAME_MAX - 1 characters that are nested as folders, all but the
last prefixed with ``@``.
"""

from __future__ import annotations

import binascii
import os
import re
from base64 import urlsafe_b64decode
from pathlib import Path

from brainage.logs import user_name

#: What a training writes as it goes (brainage.train), so a killed one leaves them.
TRAINING_PROGRESS = ("history.tsv", "embeddings")

#: Marker files of Snakemake's own bookkeeping, not outputs.
_NOT_MARKERS = {"migration_underway"}


def lock_files(workdir: str | Path = ".") -> list[Path]:
    """Snakemake's lock files in ``workdir``."""
    folder = Path(workdir, ".snakemake", "locks")
    return sorted(folder.glob("*.lock")) if folder.is_dir() else []


def incomplete_outputs(workdir: str | Path = ".") -> list[Path]:
    """Outputs marked incomplete that exist: those a new run refuses to use (Snakemake
    ignores a marker whose file is absent). Paths relative to ``workdir`` as Snakemake
    records them."""
    folder = Path(workdir, ".snakemake", "incomplete")
    if not folder.is_dir():
        return []
    outputs = []
    for directory, _, names in os.walk(folder):
        for name in names:
            if name in _NOT_MARKERS:
                continue
            parts = Path(directory, name).relative_to(folder).parts
            encoded = "".join(part.removeprefix("@") for part in parts)
            try:
                output = Path(urlsafe_b64decode(encoded).decode())
            except (binascii.Error, UnicodeDecodeError, ValueError):
                continue
            if (output if output.is_absolute() else Path(workdir, output)).exists():
                outputs.append(output)
    return sorted(outputs)


#: The line snakemake-executor-plugin-slurm writes into a run's log (.snakemake/log/) as it
#: starts; every SLURM job of that run carries the ID as its job name.
_SLURM_RUN_ID = re.compile(r"^SLURM run ID: (\S+)$", re.MULTILINE)
#: What the log of a run that planned and started jobs holds (a dry run writes no log).
_PLANNED_JOBS = re.compile(r"^(?:Job stats:|(?:local)?rule \S+:)$", re.MULTILINE)
#: How much of a log to read for it: the plugin says it before the first job is submitted.
_LOG_HEAD_BYTES = 64 * 1024


def last_slurm_run_id(workdir: str | Path = ".", *, logs_read: int = 50) -> str | None:
    """The SLURM run ID of the newest Snakemake run in ``workdir`` that planned jobs, among
    its last ``logs_read`` logs, or None when that run was local. Logs of runs that planned
    nothing are passed over: this run's own (opened before the plan, and without an ID
    until the executor starts), and those a kill leaves behind it, of a run stopped by
    ``LockException`` and of an ``--unlock`` (with only the newest two logs read, the ID
    was gone after one of them, and with it the advice to cancel the killed run's jobs)."""
    folder = Path(workdir, ".snakemake", "log")
    logs = []
    for log in folder.glob("*.snakemake.log") if folder.is_dir() else []:
        try:
            logs.append((log.stat().st_mtime, log))
        except OSError:  # removed since the glob: a dry run deletes its own log
            continue
    for _, log in sorted(logs, reverse=True)[:logs_read]:
        try:
            with open(log, "rb") as handle:
                head = handle.read(_LOG_HEAD_BYTES).decode(errors="replace")
        except OSError:  # a colleague's log under umask 077: this advice must never
            continue     # stop the run (or the --unlock) it is printed for
        if match := _SLURM_RUN_ID.search(head):
            return match.group(1)
        if _PLANNED_JOBS.search(head):  # a local run
            return None
    return None


def _ancestors() -> set[int]:
    """This process and the processes that started it (Linux /proc)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):
            break
    return found


def _is_snakemake(arguments: list[str]) -> bool:
    """Whether a command line runs Snakemake (``snakemake ...``, ``python .../snakemake
    ...``, ``python -m snakemake ...``), not merely names it (``tail -f
    .snakemake/log/x.snakemake.log``, ``tee snakemake.log``)."""
    if not arguments or not arguments[0]:
        return False
    program = Path(arguments[0]).name
    if program == "snakemake":
        return True
    if not program.startswith("python"):
        return False
    rest = iter(argument for argument in arguments[1:] if argument)
    for argument in rest:  # the interpreter's options first (-u, -X utf8, -sP of a shebang)
        if argument == "-m":
            return next(rest, "") == "snakemake"
        if argument.startswith("-m"):
            return argument[2:] == "snakemake"
        if argument in ("-X", "-W", "--check-hash-based-pycs"):  # options taking a value
            next(rest, None)
        elif argument.startswith("-c") or argument == "-":
            return False
        elif not argument.startswith("-"):
            return Path(argument).name == "snakemake"
    return False


def snakemakes_running_in(workdir: str | Path = ".") -> list[int]:
    """The process ids of the Snakemake runs on this machine whose working folder is
    ``workdir``, other than this process and those that started it: a second terminal's
    run, which a notice must not advise to --unlock. Runs on other machines, and other
    users' processes (/proc hides their working folders), are not seen: their lock files
    are named by owner instead (:func:`interrupted_run_notice`)."""
    folder = Path(workdir).resolve()
    own = _ancestors()
    running = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(entry.name)
            if pid in own:
                continue
            arguments = [argument.decode(errors="replace") for argument in
                         (entry / "cmdline").read_bytes().split(b"\0")]
            if not _is_snakemake(arguments):
                continue
            if Path(os.readlink(entry / "cwd")).resolve() == folder:
                running.append(pid)
        except (OSError, ValueError):
            continue
    return sorted(running)


def _other_owners(paths: list[Path]) -> list[str]:
    """The users other than this one who own ``paths`` (by name where known)."""
    owners = set()
    for path in paths:
        try:
            uid = path.stat().st_uid
        except OSError:
            continue
        if uid != os.getuid():
            owners.add(user_name(uid))
    return sorted(owners)


def interrupted_run_notice(workdir: str | Path = ".", *, shown: int = 3) -> str | None:
    """One sentence saying that a run was killed (or still runs) and what to run, or None
    when ``.snakemake/`` holds no lock and no incomplete output.

    ``shown``: how many incomplete outputs to name.
    """
    locks, outputs = lock_files(workdir), incomplete_outputs(workdir)
    if not locks and not outputs:
        return None
    found = []
    if locks:
        found.append(f"{len(locks)} lock file(s) in .snakemake/locks")
    if outputs:
        names = ", ".join(map(str, outputs[:shown])) + (", ..." if len(outputs) > shown else "")
        found.append(f"{len(outputs)} unfinished output(s): {names}")
    running = snakemakes_running_in(workdir)
    if running:  # its locks and outputs are not a killed run's: nothing to unlock
        return (f"brainage: another Snakemake run is working in {Path(workdir).resolve()} on "
                f"this machine (process {', '.join(map(str, running))}; "
                f"{'; '.join(found)}): let it finish, or stop it with Ctrl-C in its terminal, "
                f"before running here; do not add --unlock.")
    owners = _other_owners(locks)
    if owners:  # a colleague's run: /proc hides their processes' folders from us
        found.append(f"the locks are {' and '.join(owners)}'s: ask whether their run still "
                     f"works before you --unlock")
    if locks:
        what_to_run = ("if none is running, run the same command once with --unlock added, "
                       "then again with --rerun-incomplete added")
    else:
        what_to_run = ("if none is running, run the same command again with "
                       "--rerun-incomplete added")
    run_id = last_slurm_run_id(workdir)
    if run_id:
        # The cluster keeps running and starting the killed run's jobs; a rerun would start
        # each a second time, and two copies of one training write the same files.
        what_to_run = (f"if it was killed, first cancel its SLURM jobs still queued or "
                       f"running (run ID {run_id}: `squeue --name {run_id}` lists them, "
                       f"`scancel --name {run_id}` cancels them); then, {what_to_run}")
    if outputs:
        # A job started with --forcerun and killed, what it feeds up to date, is not
        # planned again by --rerun-incomplete (the notice then came back run after run);
        # nor is a training killed behind a checkpoint (the demo's simulated cohort), which
        # Snakemake checks for unfinished files before it plans. A training is forced by
        # its encoder.pt: it writes history.tsv and embeddings/ as it goes.
        forced = dict.fromkeys(str(output.with_name("encoder.pt"))
                               if output.name in TRAINING_PROGRESS else str(output)
                               for output in outputs)
        what_to_run += (f" (if that run plans nothing for them, as after a --forcerun of "
                        f"the killed job, add --forcerun {' '.join(forced)})")
    return (f"brainage: a previous Snakemake run in {Path(workdir).resolve()} was killed or is "
            f"still running ({'; '.join(found)}): {what_to_run}.")
