"""Shared fixtures. Each block is owned by the stage whose tests use it."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def local_snakemake_environment(**extra: str) -> dict[str, str]:
    """The environment of a Snakemake that a test runs with the local executor.

    Snakemake imports every installed executor plugin when it starts, and the SLURM
    plugin then asks ``scontrol show config`` (at import, whatever the executor). Where
    slurm-client is installed but no controller answers (a CI machine once
    tests/test_slurm.py has installed SLURM and stopped its cluster), scontrol waits about
    9 s before giving up, at every start. With ``SLURM_CONF=/dev/null`` it fails at once;
    the SLURM test runs Snakemake with its cluster's own environment.
    """
    return {**os.environ, "SLURM_CONF": "/dev/null", **extra}


def modules_after(code: str) -> set[str]:
    """The modules a fresh Python holds after running ``code`` with the checkout's package:
    what a job that runs it pays to import."""
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "workflow")})
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())

#: Fixtures that take 10 s or more to build on 2 cores (real deepbet and ANTs runs,
#: training, several processes, a full simulated cohort): every test that uses one is in
#: the slow tier, so the fast tier (`-m "not workflow and not slow"`) never builds them.
SLOW_FIXTURES = frozenset({
    "processed", "derivatives",                          # preprocessing, derivatives
    "reference_run",                                     # train
    "cohort", "cohort40", "simulated_cohort",            # simulate
    "two_process_steps", "two_process_run", "killed_run",  # distributed
})


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads_after_each_file():
    """A module-scoped fixture (test_predict's ``world``) sets torch's threads before the
    per-test fixture below saves them: every later file in that worker ran on 1 thread.
    An autouse fixture is set up before the others of its scope, so this saves first."""
    import sys

    torch = sys.modules.get("torch")  # imported at collection by a file that needs it
    saved = torch.get_num_threads() if torch else None
    yield
    if saved is not None:
        torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def restore_torch_backends():
    """Undo what a test's brainage.runtime.runtime_setup sets process-wide. A CPU bf16 run
    switches oneDNN off; a later test in the same worker that embeds without
    runtime_setup (e.g. writing features.npz for a bundle) then ran on the reference
    kernels, and its float32 features differed from the bundle's by 1e-5 relative."""
    import sys

    torch = sys.modules.get("torch")  # a test that never imported torch changed nothing
    saved = (torch.backends.mkldnn.enabled, torch.get_num_threads()) if torch else None
    yield
    if saved is not None:
        torch.backends.mkldnn.enabled, threads = saved
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_logging_and_exit_hooks():
    """Undo what a command's entry point (brainage.predict.main: log_to_file) sets
    process-wide: the root logger's handlers, one of them on this test's captured stderr,
    and the sys.exit and sys.excepthook that note a failure. A later test in the same
    worker whose code called sys.exit logged through them into a closed stream, and the
    "--- Logging error ---" report it printed (quoting the calling source) failed
    test_simulate's checks of stderr, whenever the two files shared a worker."""
    import logging
    import sys

    saved = (sys.exit, sys.excepthook)
    level = logging.getLogger().level
    yield
    root = logging.getLogger()
    root.setLevel(level)  # log_to_file's basicConfig(force=True) left it at INFO
    # log_to_file's own handlers, exactly these classes: pytest's capture handlers are
    # subclasses, added and removed by pytest around each phase
    for handler in [handler for handler in root.handlers
                    if type(handler) in (logging.StreamHandler, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    sys.exit, sys.excepthook = saved


# ---- foundation: tiny BIDS-like datasets ------------------------------------------------
def write_tiny_dataset(root: Path, rows: list[dict], *, shape=(12, 12, 12),
                       voxel_mm: float = 4.0, with_anat: bool = False,
                       maps=("stiffness",)) -> Path:
    """A valid BIDS-like dataset with small synthetic stiffness maps (kPa).

    ``rows`` are participants.tsv rows (participant_id, age, sex, study, ...); ``maps``:
    the MRE maps written (a damping ratio of about 0.25 inside the brain). Each subject's
    noise is drawn from its participant_id: two datasets' subjects of one id have the same
    maps, of other ids other maps (a copied scan is found by its bytes).
    """
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    inside = (((grid - centre[:, None, None, None]) / (np.array(shape)[:, None, None, None] / 3)) ** 2
              ).sum(axis=0) < 1
    for row in rows:
        label = row["participant_id"][len("sub-"):]
        rng = np.random.default_rng(zlib.crc32(label.encode()))
        data = np.where(inside, 2.8 + 0.1 * rng.standard_normal(shape), 0).astype(np.float32)
        folder = root / f"sub-{label}" / "mre"
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), folder / f"sub-{label}_stiffness.nii.gz")
        if "damping_ratio" in maps:
            ratio = np.where(inside, 0.25 + 0.01 * rng.standard_normal(shape), 0)
            nib.save(nib.Nifti1Image(ratio.astype(np.float32), affine),
                     folder / f"sub-{label}_damping_ratio.nii.gz")
        if with_anat:
            anat = root / f"sub-{label}" / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(inside.astype(np.float32) * 100, affine),
                     anat / f"sub-{label}_T1w.nii.gz")
    return root


def default_rows(n: int = 4) -> list[dict]:
    return [{"participant_id": f"sub-{i:02d}a", "age": 20.0 + 10 * i,
             "sex": "F" if i % 2 else "M", "study": f"study{i % 2 + 1}"} for i in range(n)]


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "dataset", default_rows())


# ---- preprocessing (issue 3): simulated subjects with known pose, the template ---------
# ITK reads its thread count once per process, at the first ANTs call: one thread for the
# whole session makes registrations bit-identical between runs and keeps to one core.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")


@pytest.fixture(scope="session")
def simulated_cohort(tmp_path_factory):
    """10 simulated subjects (2 per study, T1w included, no NaN voxels) and their truth.

    Returns ``(root, truth)``: the BIDS-like dataset folder and the ground-truth table
    (pose ``native_to_mni_affine``, ``coverage_fraction``, ...; see brainage.simulate).
    """
    from brainage.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("simulated") / "dataset"
    truth = simulate_cohort(root, n_subjects=10, seed=0, nan_probability=0.0)
    return root, truth


@pytest.fixture(scope="session")
def template_files(tmp_path_factory):
    """The MNI152 2 mm template written by prepare_template: {"t1": path, "mask": path}."""
    from brainage.preprocess import prepare_template

    folder = tmp_path_factory.mktemp("template")
    files = {"t1": str(folder / "tpl-MNI152_res-2_T1w.nii.gz"),
             "mask": str(folder / "tpl-MNI152_res-2_desc-brain_mask.nii.gz")}
    prepare_template(files["t1"], files["mask"])
    return files
# ---- end preprocessing block --------------------------------------------------------------


# ---- write failures (issue 15): a nearly full filesystem ----------------------------------
import shutil  # noqa: E402
import subprocess  # noqa: E402
import warnings  # noqa: E402
from types import SimpleNamespace  # noqa: E402

SMALL_DISK_BYTES = 1 << 20


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a 1 MiB filesystem: a tmpfs mounted there (needs root), else a plain
    folder for which brainage.io reports 1 MiB free, with a warning. ``real`` says which:
    without the tmpfs a test must fail the write itself where it needs a full disk."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mount = shutil.which("mount")
    mounted = mount is not None and subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    if not mounted:
        warnings.warn("cannot mount a tmpfs (not root?): the full disk is simulated",
                      stacklevel=2)
        monkeypatch.setattr("brainage.io.free_bytes", lambda _folder: SMALL_DISK_BYTES)
    yield SimpleNamespace(folder=folder, real=mounted)
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
# ---- end write failures block ---------------------------------------------------------------
