"""Logging for pipeline jobs: the package logs, the rule's ``log:`` file receives it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_file(path: str | Path | None, level: int = logging.INFO) -> None:
    """Send the root logger (and uncaught exceptions) to ``path`` and to stderr.

    Called first thing by every script in workflow/scripts/, so each job's log holds what
    the package reported, including a traceback when the job fails.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)

    def log_uncaught(kind, value, traceback):
        logging.getLogger("brainage").error("job failed", exc_info=(kind, value, traceback))

    sys.excepthook = log_uncaught
