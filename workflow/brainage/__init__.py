"""brainage: brain age from MR-elastography stiffness maps with contrastive learning.

The method as implemented: docs/method.md; modules and data flow: docs/architecture.md.
"""

from pathlib import Path


def brainage_version() -> str:
    """brainage's version: the checkout's pyproject.toml when the package runs from one
    (an editable install keeps the version it was installed with until it is installed
    again, and `git pull` alone does not), else the installed package's metadata."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        with open(pyproject, "rb") as handle:
            project = tomllib.load(handle).get("project", {})
        if project.get("name") == "brainage":
            return project["version"]
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("brainage")
    except PackageNotFoundError:
        return "unknown"


def _open_the_job_log_first() -> None:
    """Inside a job of this workflow's rules with ``script:`` (Snakemake's preamble puts its
    ``snakemake`` object into the script's module), open the job's log at the package's
    first import.

    Every script imports PyTorch, ANTsPy or nibabel before its own ``log_to_file`` call; a
    failure there (a CUDA library missing on a node, a broken environment) left the log
    Snakemake points to empty and the attempt out of its history. The script's own call is
    then a no-op (:func:`brainage.logs.log_to_file`); ``brainage.logs`` imports only the
    standard library. A job of this workflow runs with ``BRAINAGE_PACKAGE_DIR`` naming the
    folder that holds this package (``workflow/``,
    :func:`brainage.io.prepare_job_environment`): another lab's workflow that imports the
    package in a script of its own keeps its logging, hooks and signals. A job of this
    workflow that imports another copy of the package stops, saying so in its log.
    """
    import os
    import sys

    job = getattr(sys.modules.get("__main__"), "snakemake", None)
    if type(job).__module__.split(".")[0] != "snakemake" or not getattr(job, "log", None):
        return
    ours = os.environ.get("BRAINAGE_PACKAGE_DIR")
    if not ours:
        return
    here = Path(__file__).resolve().parent.parent
    if Path(ours).resolve() != here:
        # Snakemake takes PYTHONPATH away from a job in a conda environment, where the
        # checkout's package then came after the site-packages of the Python running
        # Snakemake: a stale `pip install .` there ran the job, unnoticed (found by a review)
        message = (f"this job of the workflow in {Path(ours).parent} imported brainage from "
                   f"{here}, another copy of the package, which may be another version. "
                   f"Uninstall it from the Python that runs Snakemake (pip uninstall "
                   f"brainage; then pip install -e . in the checkout) or take it off "
                   f"PYTHONPATH.")
        try:
            with open(job.log[0], "a", encoding="utf-8") as log:
                log.write(f"ERROR brainage: {message}\n")
        except OSError:
            pass  # the error below still reaches the job's own output
        raise ImportError(message)
    from brainage.logs import log_to_file

    log_to_file(job.log[0])


_open_the_job_log_first()
