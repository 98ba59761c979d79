"""The conda environments for cluster users agree with the package's own requirements."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
#: The workflow engine runs the jobs (and writes the report); it is not installed inside
#: the job environments.
DRIVER_ONLY = {"snakemake", "snakemake-executor-plugin-slurm", "pygments"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_normalise(Requirement(r).name): Requirement(r) for r in project["dependencies"]}


def _env_pins(path: Path) -> dict[str, Version]:
    env = yaml.safe_load(path.read_text())
    pins = {}
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            for line in entry.get("pip", []):
                if line.startswith("-e"):
                    continue
                requirement = Requirement(line)
                (spec,) = requirement.specifier
                assert spec.operator == "==", f"{path.name}: {line} is not pinned with =="
                pins[_normalise(requirement.name)] = Version(spec.version)
    return pins


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_parses_and_pins_satisfy_the_package(path):
    env = yaml.safe_load(path.read_text())
    assert env["name"].startswith("brainage-")
    assert any(str(d).startswith("python=") for d in env["dependencies"])
    requirements = _package_requirements()
    pins = _env_pins(path)
    assert pins, f"{path.name} pins nothing"
    for name, version in pins.items():
        if name in requirements:
            assert version in requirements[name].specifier, (
                f"{path.name}: {name}=={version} violates pyproject's {requirements[name]}")


def test_every_requirement_is_in_some_env():
    covered = set().union(*(_env_pins(p) for p in ENV_FILES))
    missing = set(_package_requirements()) - covered - DRIVER_ONLY
    assert missing == set()


def test_the_lower_bounds_file_pins_every_declared_bound():
    """tests/lower-bounds.txt installs the oldest releases pyproject admits; a bound raised
    or added without it goes untried (five bounds were false: nipype 1.8.0 with traits 7,
    jinja2 3.1.0 under pandas' to_latex, ...)."""
    pins = {}
    for line in (REPO / "tests" / "lower-bounds.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            pins[_normalise(requirement.name)] = (spec.operator, Version(spec.version))
    bounds = {}
    for name, requirement in _package_requirements().items():
        lower = [spec for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"pyproject's {requirement} has no single lower bound"
        bounds[name] = ("==", Version(lower[0].version))
    bounds.pop("torch")  # the README installs its own build first
    assert pins == bounds


def test_every_scripted_rule_names_an_existing_env():
    """--software-deployment-method conda needs a `conda:` env for every script rule.

    The envs do not install brainage: Snakemake puts workflow/scripts on sys.path, where
    the `brainage` link points at the package.
    """
    import re

    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        # named rules, and rules generated in a loop (`rule:` with a `name:` line)
        for block in re.split(r"\n(?=\s*(?:rule|checkpoint)(?: \w+)?:)", rules.read_text()):
            if "script:" not in block or "use rule" in block.split("\n")[0]:
                continue
            named = re.search(r"(?:rule|checkpoint) (\w+):|name:\s*\n\s*(.+)", block)
            assert named, f"{rules.name}: a rule without a name:\n{block[:300]}"
            name = named.group(1) or named.group(2)
            env = re.search(r'conda:\s*"([^"]+)"', block)
            assert env, f"{rules.name}: rule {name} has no conda: env"
            assert (rules.parent / env.group(1)).resolve().is_file(), env.group(1)
    assert (REPO / "workflow" / "scripts" / "brainage" / "__init__.py").is_file()


def test_the_report_needs_no_test_extra():
    """`snakemake --report` imports pygments, which snakemake does not install; the main
    command installs the package without its test extra (where pytest brings pygments)."""
    assert "pygments" in _package_requirements()


def test_a_wheel_carries_the_schemas_the_package_reads(tmp_path):
    """`brainage-predict` validates bundles and cohorts with the config and participants
    schemas. They lay outside the package (workflow/schemas/), so a wheel, or `pip install
    .` on another machine, had none: `python -m brainage.predict run` stopped with a
    FileNotFoundError. Built without network (the venv's setuptools) and imported from the
    wheel's files alone, not this checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # pip builds in the source tree (build/, egg-info)
    shutil.copytree(REPO / "workflow" / "brainage", source / "workflow" / "brainage",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "--no-index", "-q", "-w",
                            str(tmp_path / "wheel"), str(source)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("brainage-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"brainage/schemas/config.schema.yaml",
                "brainage/schemas/participants.schema.yaml"} <= names
        archive.extractall(tmp_path / "installed")
    probe = ("import brainage.config as c, brainage.inputs; "
             "assert c.CONFIG_SCHEMA.is_file() and c.PARTICIPANTS_SCHEMA.is_file(); "
             "c.validate_config({}); print(c.SCHEMA_DIR)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "installed"),
                                            "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(tmp_path / "installed"))



def test_the_version_is_the_date_of_the_newest_upgrade_note():
    """Every version said 0.1.0, so a bundle's manifest could not tell whether it was made
    before or after a fix the README's upgrade notes date; a new dated note needs a new
    version (pyproject.toml)."""
    version = Version(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])
    readme = (REPO / "README.md").read_text()
    dates = {Version(".".join(str(int(part)) for part in match))
             for match in re.findall(r"\b(20\d\d)-(\d\d)-(\d\d)\b", readme)}
    assert dates, "the README's upgrade notes name no date"
    assert version == max(dates), (
        f"pyproject.toml's version {version} is not the newest date of the README's notes "
        f"({max(dates)}): set it to that date")
    assert f"brainage {version} is the release of" in readme


def test_a_checkout_reports_its_own_version_not_the_installed_one(monkeypatch):
    """After `git pull`, an editable install's metadata keeps the version it was installed
    with; the bundles and descriptions made from the checkout name the checkout's."""
    import importlib.metadata

    from brainage import brainage_version

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0")
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert brainage_version() == expected != "0.1.0"


#: Test double of the conda binary: answers the three questions Snakemake asks before it
#: plans a run with --software-deployment-method conda (it builds no environment).
CONDA_TEST_DOUBLE = """#!/bin/sh
case "$*" in
  "--version") echo "conda 24.7.1";;
  "info --json") echo '{"conda_prefix": "/nonexistent", "envs_dirs": [],'\\
      '"platform": "linux-64", "root_prefix": "/nonexistent", "conda_version": "24.7.1"}';;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}';;
  *) echo "conda test double: $*" >&2; exit 1;;
esac
"""


@pytest.mark.workflow
def test_turning_conda_on_reruns_no_finished_job(tmp_path):
    """Snakemake's `software-env` trigger hashes a job's conda environment with the conda
    folder's absolute path: a lab that ran with the venv and then added
    --software-deployment-method conda (or a new --conda-prefix, a moved folder) reran every
    job, the whole training grid (found by a review). The workflow profile leaves it out."""
    import subprocess
    import sys

    from conftest import local_snakemake_environment

    (tmp_path / "bin").mkdir()
    conda = tmp_path / "bin" / "conda"
    conda.write_text(CONDA_TEST_DOUBLE)
    conda.chmod(0o755)
    (tmp_path / "env.yaml").write_text("channels: [conda-forge]\ndependencies: [python=3.11]\n")
    (tmp_path / "Snakefile").write_text(
        'rule train_encoder:\n    output: "encoder.txt"\n    conda: "env.yaml"\n'
        '    shell: "echo trained > {output}"\n')
    run = [sys.executable, "-m", "snakemake", "--directory", str(tmp_path), "--cores", "1",
           "-s", str(tmp_path / "Snakefile"), "--workflow-profile",
           str(REPO / "workflow" / "profiles" / "default")]
    environment = local_snakemake_environment(
        PATH=f"{tmp_path / 'bin'}:{local_snakemake_environment()['PATH']}")
    first = subprocess.run(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=120, env=environment)
    assert first.returncode == 0, first.stdout
    for deployment in (["--software-deployment-method", "conda"],
                       ["--software-deployment-method", "conda", "--conda-prefix",
                        str(tmp_path / "shared-envs")]):
        planned = subprocess.run([*run, "-n", *deployment], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=120,
                                 env=environment)
        assert planned.returncode == 0, planned.stdout
        assert "Nothing to be done" in planned.stdout, planned.stdout


def test_a_job_that_imports_another_copy_of_the_package_stops_and_says_which(tmp_path):
    """In a conda job Snakemake took PYTHONPATH away and the site-packages of the Python
    running Snakemake came before the checkout: a stale `pip install .` there ran the job
    this checkout planned (found by a review). A job of this workflow (BRAINAGE_PACKAGE_DIR
    set) that imports brainage from elsewhere stops, and its log says why."""
    import os
    import subprocess
    import sys

    log = tmp_path / "logs" / "job.log"
    log.parent.mkdir()
    job = ("import sys\n"
           "class Snakemake:\n"
           "    pass\n"
           "Snakemake.__module__ = 'snakemake.script'\n"
           "snakemake = Snakemake()\n"
           f"snakemake.log = [{str(log)!r}]\n"
           "import brainage\n"
           "print('imported', brainage.__file__)\n")

    def run(package_dir):
        environment = {**os.environ, "PYTHONPATH": str(REPO / "workflow"),
                       "BRAINAGE_PACKAGE_DIR": str(package_dir)}
        return subprocess.run([sys.executable, "-c", job], capture_output=True, text=True,
                              env=environment, timeout=60)

    other = tmp_path / "another checkout" / "workflow"
    stopped = run(other)
    assert stopped.returncode != 0 and "imported" not in stopped.stdout
    message = (f"this job of the workflow in {other.parent} imported brainage from "
               f"{REPO / 'workflow'}, another copy of the package")
    assert message in stopped.stderr and "pip uninstall brainage" in stopped.stderr
    assert log.read_text().startswith(f"ERROR brainage: {message}")
    log.unlink()
    ours = run(REPO / "workflow")
    assert ours.returncode == 0 and "imported" in ours.stdout, ours.stderr
    assert "===== attempt 1" in log.read_text()


@pytest.mark.workflow
def test_a_python_under_a_path_with_a_space_is_refused_before_any_job(tmp_path):
    """Snakemake writes the Python that runs it into every job's command unquoted: a venv in
    a clone under "Müller lab/" failed every job with exit status 127 and an empty log (found
    by a review). Planning stops and says what to do; the link it suggests works."""
    import subprocess
    import sys
    import sysconfig

    from conftest import local_snakemake_environment

    def venv(folder):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)],
                       check=True, timeout=120)
        (site_packages,) = folder.glob("lib/python3*/site-packages")
        # this environment's packages (brainage, Snakemake) seen from the new one
        (site_packages / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        return folder / "bin" / "python"

    python = venv(tmp_path / "Müller lab" / ".venv")
    plan = ["-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory",
            str(tmp_path / "work"), "--cores", "1"]
    refused = subprocess.run([str(python), *plan], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300,
                             env=local_snakemake_environment())
    assert refused.returncode != 0
    assert (f"the Python that runs Snakemake, {python}, lies under a path with a space"
            in refused.stdout), refused.stdout[-3000:]
    # the venv's own snakemake script names its path: only `python -m snakemake` works
    assert (f"ln -s '{python.parent.parent}' ~/brainage-venv, then ~/brainage-venv/bin/python "
            f"-m snakemake") in refused.stdout
    link = tmp_path / "brainage-venv"
    link.symlink_to(python.parent.parent)
    planned = subprocess.run([str(link / "bin" / "python"), *plan], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300,
                             env=local_snakemake_environment())
    assert planned.returncode == 0, planned.stdout[-3000:]
    assert "lies under a path" not in planned.stdout


def test_only_characters_a_shell_splits_or_expands_refuse_the_python(monkeypatch):
    """The planning check refuses a Python whose path a shell would split or expand, and
    no other: '#' or '!' inside a word, '+', '@' and '~' are literal to bash."""
    import os

    from brainage.io import prepare_job_environment

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the function sets variables
    for fine in ("/opt/python3.11+gcc@12/bin/python", "/home/me/conda#2/envs/x!/bin/python",
                 "/home/me/.pyenv/versions/3.11.7/bin/python", "/p/~user/bin/python"):
        prepare_job_environment("/checkout/workflow", training_python=fine)
    for refused in ("/data/MRE data/.venv/bin/python", "/data/$HOME/bin/python",
                    "/data/a(b)/bin/python", "/data/it's/bin/python"):
        with pytest.raises(ValueError, match="lies under a path with a space or a shell "
                                             "character"):
            prepare_job_environment("/checkout/workflow", training_python=refused)


def test_ci_fails_when_the_install_fails(tmp_path):
    """set -e does not stop at a failed command inside an && list: with a failing install
    .ci/run printed "CI finished" and exited 0, no test run (found by a review)."""
    import os
    import shutil
    import subprocess

    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "bin").mkdir()
    failing = tmp_path / "bin" / "python3"  # a test double: an install that fails
    failing.write_text("#!/bin/sh\necho 'no venv here' >&2\nexit 3\n")
    failing.chmod(0o755)
    run = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert run.returncode == 3, run.stdout + run.stderr
    assert "CI finished" not in run.stdout
