"""The tiny grid on a real single-node SLURM cluster, through the shipped profiles.

``tests/slurm/start_slurm.sh`` installs (Debian slurm-wlm, munge, slurmdbd + MariaDB, so
``sacct`` works) and starts the cluster, with two fake GPUs so that train_encoder's
``gpu: 1`` request is scheduled as on a real GPU node (the job itself runs on the CPU).
The test starts the cluster itself (idempotent: fast when CI started it already).

Then ``snakemake --profile workflow/profiles/slurm --workflow-profile
workflow/profiles/default --configfile config/test.yaml`` runs the whole pipeline (10
simulated subjects, 8 mm, 2 losses x 2 seeds x 2 epochs) in a temporary working
directory, every job a SLURM job, and the test checks that every job is COMPLETED in
``sacct`` and that the tables and figures came out. The simulated maps are already
brain-only, so the run skips skull stripping and N4 (``preprocess.skullstrip: none``,
``n4: false``) to save ~40 s per subject; registration, QC and everything after run for
real. A second, deliberately failing run checks that a failed job is reported with its
log paths and FAILED in ``sacct``.

Skips (with the reason) when not root or when apt cannot install the packages, except
in CI (environment CI=true), where it must run and fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from brainage.interrupted import last_slurm_run_id
from conftest import REPO

pytestmark = pytest.mark.workflow

START_SLURM = REPO / "tests" / "slurm" / "start_slurm.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"
#: Account and partition of the test cluster (start_slurm.sh), given to the shipped
#: profile through its environment variables.
SLURM_ENVIRONMENT = {"BRAINAGE_SLURM_ACCOUNT": "root", "BRAINAGE_SLURM_PARTITION": "debug"}
RUN_TIMEOUT_S = 1500
#: Merged onto config/test.yaml (see the module docstring).
FAST_PREPROCESSING = "preprocess:\n  skullstrip: none\n  n4: false\n"


def skip_or_fail(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the SLURM test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node cluster: accounting on, two fake GPUs, >= 4 CPU slots (the
    jobs are mostly Snakemake start-up, so oversubscribing 2 cores pays off)."""
    if os.geteuid() != 0:
        skip_or_fail("the SLURM test installs and starts slurm-wlm: needs root")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        skip_or_fail("no apt-get to install slurm-wlm (Debian/Ubuntu only)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        skip_or_fail("snakemake-executor-plugin-slurm is not installed")
    running_before = subprocess.run([str(START_SLURM), "status"],
                                    capture_output=True).returncode == 0
    environment = {**os.environ, "SLURM_ACCOUNTING": "1", "SLURM_FAKE_GPUS": "2",
                   "SLURM_CPUS": str(max(4, os.cpu_count() or 1))}
    result = subprocess.run([str(START_SLURM)], env=environment, capture_output=True,
                            text=True, timeout=900)
    if result.returncode == 3:
        skip_or_fail(f"could not install the SLURM packages: {result.stdout[-1500:]}")
    if result.returncode != 0:
        pytest.fail(f"{START_SLURM} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}")
    yield
    if not running_before:  # leave a cluster that CI started for later tests
        subprocess.run([str(START_SLURM), "stop"], capture_output=True, timeout=120)


def snakemake_on_slurm(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the workflow through the shipped profiles; returns (process, combined output)."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir),
               "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
               "--workflow-profile", str(REPO / "workflow" / "profiles" / "default"),
               "--configfile", str(REPO / "config" / "test.yaml"),
               str(workdir / "fast_preprocessing.yaml"),
               # test-cluster speed-ups (a real cluster keeps the profile's 40 s)
               "--slurm-init-seconds-before-status-checks", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                            env={**os.environ, **SLURM_ENVIRONMENT}, cwd=workdir)
    output = result.stdout + result.stderr
    (workdir / f"snakemake-{int(time.time())}.out").write_text(output)
    return result, output


def submitted_jobs(output: str) -> dict[str, str]:
    """SLURM job id -> Snakemake's SLURM log path, from 'submitted with SLURM jobid' lines."""
    return dict(re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)", output))


SACCT_COLUMNS = ["JobID", "State", "ExitCode", "JobName", "ReqMem", "Timelimit", "Comment"]


def sacct_states(job_ids) -> pd.DataFrame:
    """sacct rows (job allocations only) for the ids, SACCT_COLUMNS (the comment last: it
    may hold the separator)."""
    result = subprocess.run(
        ["sacct", "-n", "-P", "-X", f"--format={','.join(SACCT_COLUMNS)}",
         "-j", ",".join(job_ids)], capture_output=True, text=True, check=True)
    rows = [line.split("|", len(SACCT_COLUMNS) - 1) for line in result.stdout.splitlines()
            if line.strip()]
    return pd.DataFrame(rows, columns=SACCT_COLUMNS)


def failed_job_report(output: str, workdir: Path) -> str:
    """Each 'Error in rule' block of Snakemake's output with the tail of its log files."""
    blocks = re.findall(r"(Error in (?:rule|group job) .*?)(?=\n\[|\nError in |\Z)", output,
                        flags=re.S)
    report = []
    for block in blocks:
        report.append(block.strip())
        for log in re.findall(r"log: ([^\n]+?)(?: \(check log file|\n)", block):
            for path in log.split(", "):
                path = Path(path.strip())
                path = path if path.is_absolute() else workdir / path
                if path.is_file():
                    report.append(f"--- {path} (last 40 lines)\n"
                                  + "\n".join(path.read_text().splitlines()[-40:]))
    return "\n".join(report) or output[-6000:]


def wait_for_accounting(job_ids, timeout_s: float = 30) -> pd.DataFrame:
    """sacct lags slurmctld by a moment: poll until every job has a final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = sacct_states(job_ids)
        done = states["State"].str.match(r"^(COMPLETED|FAILED|CANCELLED|TIMEOUT|OUT_OF_ME)")
        if (len(states) == len(job_ids) and done.all()) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def profile(name: str, **environment: str) -> dict:
    """A shipped profile as Snakemake reads it (YTE-evaluated under ``environment``)."""
    import yte

    saved = dict(os.environ)
    os.environ.update(environment)
    for key in [k for k in os.environ if k.startswith("BRAINAGE_SLURM_") and k not in environment]:
        del os.environ[key]
    try:
        with open(REPO / "workflow" / "profiles" / name / "config.yaml") as handle:
            return yte.process_yaml(handle, require_use_yte=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_slurm_profile_takes_account_and_partition_from_the_environment():
    plain = profile("slurm")
    assert plain["executor"] == "slurm"
    assert plain["retries"] >= 1 and plain["slurm-requeue"] is True
    assert plain["rerun-incomplete"] is True
    # unset: no placeholder reaches sbatch, SLURM's defaults apply
    assert "slurm_account" not in plain["default-resources"]
    assert "slurm_partition" not in plain["default-resources"]
    site = profile("slurm", BRAINAGE_SLURM_ACCOUNT="lab42", BRAINAGE_SLURM_PARTITION="short")
    assert site["default-resources"]["slurm_account"] == "lab42"
    assert site["default-resources"]["slurm_partition"] == "short"


def test_slurm_profile_rate_limit_parses_and_keeps_scheduling_passes_rare():
    """The scheduler adds one re-evaluation pass per timespan for every finished job (README,
    "--max-jobs-per-timespan"): the profile's value must be one Snakemake accepts, with a
    timespan of seconds, not the default 1 s, and still let the queue fill (jobs: 100)."""
    from snakemake.settings.types import MaxJobsPerTimespan

    plain = profile("slurm")
    limit = MaxJobsPerTimespan.parse_choice(plain["max-jobs-per-timespan"])
    assert 5 <= limit.timespan <= 60
    assert limit.max_jobs >= plain["jobs"]


def test_slurm_profile_schedules_greedily():
    """The ILP scheduler plans temporary files (this pipeline writes none) on the login node
    at every pass and calls PuLP functions that PuLP 4.0 removes; the profile's value must
    be one of the scheduler plugins that this Snakemake has."""
    from snakemake_interface_scheduler_plugins.registry import SchedulerPluginRegistry

    scheduler = profile("slurm")["scheduler"]
    assert scheduler == "greedy"
    assert scheduler in SchedulerPluginRegistry().plugins


def test_workflow_profile_never_requests_gpus_through_slurm_extra():
    for environment in ({}, {"BRAINAGE_SLURM_GPU_PARTITION": "gpu"}):
        for name in ("default", "slurm"):
            text = json.dumps(profile(name, **environment))
            assert "--gres" not in text and "slurm_extra" not in text
    gpu = profile("default", BRAINAGE_SLURM_GPU_PARTITION="gpu")["set-resources"]
    assert gpu["train_encoder"] == {"slurm_partition": "gpu"}
    # pretraining asks for pretrain.<run>.resources.gpus: it must reach the GPUs too
    assert gpu["pretrain_encoder"] == gpu["search_hyperparameters"] == {"slurm_partition": "gpu"}
    assert "evaluate_encoder" not in gpu  # a read-out on saved features: a CPU job
    assert profile("default")["set-resources"]["train_encoder"] == {}


def test_tiny_grid_runs_on_slurm(slurm_cluster, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "fast_preprocessing.yaml").write_text(FAST_PREPROCESSING)
    started = time.monotonic()
    # the report rules need every cell: the whole pipeline, whatever `all` also holds
    result, output = snakemake_on_slurm(workdir, "make_tables", "make_figures",
                                        "plot_embeddings",
                                        "results/figures/pretraining_umap_t1w.png")
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"the tiny grid failed on SLURM after {elapsed:.0f} s; failed jobs:\n"
                    f"{failed_job_report(output, workdir)}")

    jobs = submitted_jobs(output)
    states = wait_for_accounting(jobs)
    assert len(states) == len(jobs), (states, jobs)
    not_completed = states[states["State"] != "COMPLETED"]
    assert not_completed.empty, (
        f"jobs not COMPLETED in sacct:\n{not_completed.to_string()}\nlogs: "
        + ", ".join(jobs[j] for j in not_completed["JobID"]))
    rules = states["Comment"].str.extract(r"^rule_(\w+?)(?:_wildcards_|$)")[0]
    # the run ID that a restart after a kill names for scancel --name is these jobs' name
    assert set(states["JobName"]) == {last_slurm_run_id(workdir)}, states.to_string()
    # every job's attempts name this run, inherited through sbatch --export=ALL: the
    # warnings listed at the run's end are told by it, not by the nodes' clocks
    named = {run for log in (workdir / "logs").rglob("*.log") for run in re.findall(
        r"^===== attempt \d+ \(.*, SLURM job \d+, run ([0-9a-f]{16})\) =====$",
        log.read_text(errors="replace"), re.M)}
    assert len(named) == 1, named
    # the plugin took the profile's slurm-delete-logfiles-older-than: 0 (failed jobs' SLURM
    # logs, the record of a memory or time kill, outlive its 10-day default; and no clean-up
    # removes the log folders of jobs waiting in the queue, which SLURM then fails)
    assert "Cleaning up SLURM log files" not in output
    table3 = pd.read_csv(workdir / "results" / "tables" / "table3_losses.csv")
    assert list(table3.columns[:4]) == ["loss", "n_seeds", "mae_mean", "mae_std"]
    assert {"adaptive", "yaware"} <= set(table3["loss"])
    # the fine-tuned variant starts from the encoder that the pretraining job wrote
    tuned = table3.set_index("variant").loc["adaptive_pretrained"]
    assert tuned["init"] == "pretrained:t1w" and tuned["loss"] == "adaptive:adaptive_pretrained"
    assert (rules == "pretrain_encoder").sum() == 1, states.to_string()
    pretraining = pd.read_csv(workdir / "results" / "tables" / "pretraining.csv")
    assert pretraining["validation_mae"].notna().all() and list(pretraining["run"]) == ["t1w"]
    gain = pd.read_csv(workdir / "results" / "tables" / "pretraining_gain.csv")
    assert list(gain["pretrained_variant"]) == ["adaptive_pretrained"] and (gain["n_pairs"] == 2).all()
    assert (table3["n_seeds"] == 2).all() and table3["mae_mean"].notna().all()
    # every cell (3 variants x 2 seeds in config/test.yaml, and the three-channel cell of
    # experiment modality) its own GPU job and evaluation
    n_cells = int(table3["n_seeds"].sum()) + 1
    modality = pd.read_csv(workdir / "results" / "tables" / "ablation_modality.csv")
    assert modality["mae_mean"].notna().all()
    assert (rules == "train_encoder").sum() == n_cells >= 4, states.to_string()
    assert (rules == "evaluate_encoder").sum() == n_cells, states.to_string()
    assert {"make_tables", "make_figures", "plot_embeddings",
            "plot_pretraining_embeddings"} <= set(rules.dropna()), states.to_string()
    for name in ("fig2_modalities", "fig3_age_distribution", "fig5_umap", "fig7_coverage",
                 "predicted_vs_true", "pretraining", "pretraining_umap_t1w"):
        assert (workdir / "results" / "figures" / f"{name}.png").stat().st_size > 0
    print(f"tiny grid on SLURM: {len(jobs)} jobs in {elapsed:.0f} s")

    # The HTML report embeds every table and figure with its caption (runs locally).
    report = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(workdir), "--configfile", str(REPO / "config" / "test.yaml"),
         str(workdir / "fast_preprocessing.yaml"), "--report", "results/report.html"],
        capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    html = (workdir / "results" / "report.html").read_text()
    for name in ("table3_losses.csv", "fig5_umap.png", "fig8_coverage_examples.png"):
        assert name in html
    assert "Adaptive Neighborhoods" in html  # from the captions
    # the workflow description states the run's normalisation and read-out, not fixed ones
    assert "statistics of the training subjects" in html and "ridge unless a variant" in html
    # a report is shared: it names no training subject (make_figures took their registered
    # maps as params, which the report shows for every figure)
    training = pd.read_csv(workdir / "results" / "dataset" / "holdout" / "participants.tsv",
                           sep="\t")["participant_id"]
    assert not [participant for participant in training if participant in html]

    # A job that fails is reported with its log paths, and is FAILED in sacct.
    metrics = workdir / "results" / "train" / "holdout" / "table3" / "yaware" / "seed-0" \
        / "metrics.json"
    broken = json.loads(metrics.read_text())
    del broken["mae"]
    metrics.write_text(json.dumps(broken))
    result, output = snakemake_on_slurm(workdir, "--forcerun", "make_tables", "--retries", "1",
                                        "results/tables/table3_losses.csv")
    assert result.returncode != 0
    assert "Error in rule make_tables" in output
    failed = submitted_jobs(output)
    assert len(failed) == 2  # the job and its one retry
    (first_id, _), (job_id, slurm_log) = sorted(failed.items(), key=lambda job: int(job[0]))
    # the retry asks for 1.5 times the memory (a memory kill would otherwise repeat), and for
    # the same wall time (one above the partition's limit would wait for ever): make_tables'
    # 2,000 MB and 15 min
    requests = wait_for_accounting([first_id, job_id]).set_index("JobID")
    assert requests.loc[first_id, "ReqMem"] == "2000M" and requests.loc[job_id, "ReqMem"] == "3000M"
    assert (requests["Timelimit"] == "00:15:00").all(), requests.to_string()
    assert slurm_log in output and Path(slurm_log).is_file()  # SLURM's log, kept on failure
    assert "logs/aggregate/make_tables.log" in output
    rule_log = (workdir / "logs" / "aggregate" / "make_tables.log").read_text()
    assert "metrics lack mae" in rule_log and str(metrics.relative_to(workdir)) in rule_log
    assert wait_for_accounting([job_id])["State"].iloc[0] == "FAILED"
