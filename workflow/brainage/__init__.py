"""brainage: brain age from MR-elastography stiffness maps with contrastive learning.

The method as implemented: docs/method.md; modules and data flow: docs/architecture.md.
"""

from pathlib import Path


def brainage_version() -> str:
    """Installed brainage version (from package metadata, else pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("brainage")
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        with open(pyproject, "rb") as handle:
            return tomllib.load(handle)["project"]["version"]
    return "unknown"
