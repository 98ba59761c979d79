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
