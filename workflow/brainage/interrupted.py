"""What a killed Snakemake run leaves in ``.snakemake/``, and the sentence that says what to
run about it.

A Snakemake run that is killed (a closed terminal, a reboot of the login node) leaves
lock files in ``.snakemake/locks/`` and marks the outputs of the jobs it was running in
``.snakemake/incomplete/``. The next run then stops with ``IncompleteFilesException`` and
``LockException`` in turn. The workflow prints :func:`interrupted_run_notice` when it
starts, before Snakemake reads these folders: Snakemake parses the Snakefile before it
takes its own lock, so whatever lock is found then belongs to another process.

Snakemake 9's file persistence (the default) stores a lock as ``<n>.input.lock`` /
``<n>.output.lock`` and an incomplete marker as the url-safe base64 of the output's path,
cut into pieces of at most NAME_MAX - 1 characters that are nested as folders, all but the
last prefixed with ``@``.
"""

from __future__ import annotations

import binascii
import os
from base64 import urlsafe_b64decode
from pathlib import Path

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
    if locks:
        what_to_run = ("if none is running, run the same command once with --unlock added, "
                       "then again with --rerun-incomplete added")
    else:
        what_to_run = ("if none is running, run the same command again with "
                       "--rerun-incomplete added")
    return (f"brainage: a previous Snakemake run in {Path(workdir).resolve()} was killed or is "
            f"still running ({'; '.join(found)}): {what_to_run}.")
