"""brainage.launch: the command that starts a pretraining run's processes, from the job's
GPU and node counts (resources, so that changing them does not rerun the job; the
workflow side is tested in test_grid.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brainage.launch import rendezvous_port, training_command

REPO = Path(__file__).resolve().parents[1]


def test_one_process_on_the_cpu_or_one_gpu_and_torchrun_for_several():
    assert training_command(0, 1, python="py") == ["py", "-m", "brainage.train"]
    assert training_command(1, 1, python="py") == ["py", "-m", "brainage.train"]
    assert training_command(4, 1, python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone", "-m",
        "brainage.train"]


def test_several_nodes_meet_on_the_first_node_of_the_slurm_job(tmp_path, monkeypatch):
    """One torchrun per node of the run, on the first of the run's nodes: --nodes and
    --ntasks keep srun to the run's nodes in a larger allocation, whose other nodes'
    agents could not join the rendezvous and failed the step."""
    # a test double of SLURM's scontrol: the job's node list expanded to host names
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && '
                        'printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    command = training_command(2, 2, python="py", environ={"SLURM_JOB_ID": "4242",
                                                           "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert command == [
        "srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1",
        "--kill-on-bad-exit=1", "py", "-m",
        "torch.distributed.run",
        "--nproc_per_node", "2", "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_id",
        "4242", "--rdzv_endpoint", "gpu07:29742", "-m", "brainage.train"]
    with pytest.raises(SystemExit, match="inside a SLURM job"):
        training_command(2, 2, python="py", environ={})


def test_two_multi_node_runs_of_one_allocation_meet_apart(monkeypatch):
    """Snakemake inside one salloc allocation may start two pretraining runs of several
    nodes at once: with the job id alone as their rendezvous id and port, the second run's
    head joined the first's rendezvous, and the two formed one process group (a review
    reproduced it with torchrun). Each run's training arguments now set its own."""
    monkeypatch.setattr("brainage.launch.first_node", lambda environ: "gpu07")
    environ = {"SLURM_JOB_ID": "4242"}
    first, second = (training_command(2, 2, python="py", environ=environ,
                                      run=f"--checkpoint results/pretrain/{run}/checkpoint.pt")
                     for run in ("openbhb", "t1w"))

    def option(command, name):
        return command[command.index(name) + 1]

    assert option(first, "--rdzv_id") != option(second, "--rdzv_id")
    assert option(first, "--rdzv_id").startswith("4242-")
    assert option(first, "--rdzv_endpoint") != option(second, "--rdzv_endpoint")
    again = training_command(2, 2, python="py", environ=environ,
                             run="--checkpoint results/pretrain/openbhb/checkpoint.pt")
    assert again == first  # a resubmitted run meets where its nodes look for it


def test_two_multi_node_jobs_on_one_first_node_meet_on_different_ports():
    """Every multi-node job met on port 29500 of its first node: two of them sharing that
    node (SLURM's node sharing) joined each other's rendezvous or failed to bind."""
    assert rendezvous_port("4242") != rendezvous_port("4243")
    assert {rendezvous_port(str(job)) for job in range(10_000)} == set(range(29500, 31500))
    assert rendezvous_port(None) == rendezvous_port("brainage") == 29500


@pytest.mark.parametrize("gpus, nodes", [(2, 1), (4, 2)])
def test_torchrun_passes_every_training_argument_of_the_rule_on(gpus, nodes, monkeypatch):
    """torchrun's parser reads abbreviations across the whole line: the rule's --log is a
    prefix of torchrun's --log-dir and --logs-specs, and every pretraining run on several
    GPUs stopped with "ambiguous option: --log" before it trained. Every flag the rule
    passes (read from the rule) reaches brainage.train as it is, or as its --log-file."""
    from torch.distributed.run import get_args_parser

    from brainage.launch import torchrun_safe
    from brainage.train import _parse_arguments

    rule = (REPO / "workflow" / "rules" / "pretrain.smk").read_text()
    shell = rule[rule.index("-m brainage.launch"):].split("\n\n")[0]
    flags = [flag for flag in re.findall(r" (--[a-z-]+) \{", shell)
             if flag not in ("--gpus", "--nodes")]  # the launcher's own
    assert "--log" in flags and "--checkpoint" in flags
    train_arguments = [word for flag in flags for word in (flag, f"value{flag}")]
    monkeypatch.setattr("brainage.launch.first_node", lambda environ: "gpu07")
    command = training_command(gpus, nodes, python="py", environ={"SLURM_JOB_ID": "1"})
    passed = torchrun_safe(train_arguments)
    parsed = get_args_parser().parse_args(command[command.index("py") + 3:] + passed)
    assert parsed.module and parsed.training_script == "brainage.train"
    assert parsed.training_script_args == passed
    assert vars(_parse_arguments(passed)) == vars(_parse_arguments(train_arguments))
    assert _parse_arguments(passed).log == "value--log"


@pytest.mark.slow
def test_the_launcher_becomes_the_training_with_its_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "brainage.launch", "--gpus", "0", "--nodes", "1", "--", "--help"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "workflow")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m brainage.train")


def test_a_process_failing_on_one_node_ends_every_node(monkeypatch):
    """srun with --kill-on-bad-exit, as the launch line of brainage.distributed says: a
    node whose torchrun fails ends the others' at once instead of leaving their processes
    in a collective until COLLECTIVE_TIMEOUT (half an hour of every GPU of the job)."""
    monkeypatch.setattr("brainage.launch.first_node", lambda environ: "gpu07")
    command = training_command(4, 2, python="py", environ={"SLURM_JOB_ID": "1"})
    assert command[0] == "srun" and "--kill-on-bad-exit=1" in command[:command.index("py")]


def test_each_node_runs_its_processes_on_the_cpus_the_job_asked_for(monkeypatch):
    """srun of Slurm 22.05 to 23.02 does not inherit the job's --cpus-per-task: where SLURM
    binds tasks to CPUs, each node's torchrun (and its data-loading workers) ran on one
    CPU of the many the job held. Without a CPU request the job's default stays."""
    monkeypatch.setattr("brainage.launch.first_node", lambda environ: "gpu07")
    command = training_command(4, 2, python="py", environ={"SLURM_JOB_ID": "1",
                                                           "SLURM_CPUS_PER_TASK": "32"})
    srun_options = command[:command.index("py")]
    assert srun_options[srun_options.index("--cpus-per-task") + 1] == "32"
    command = training_command(4, 2, python="py", environ={"SLURM_JOB_ID": "1"})
    assert "--cpus-per-task" not in command


def test_a_misspelt_launcher_option_is_named_not_passed_to_training():
    """`--ndoes 2 -- <training arguments>` went to brainage.train, whose error listed its
    own arguments as missing and never the misspelt one."""
    result = subprocess.run(
        [sys.executable, "-m", "brainage.launch", "--gpus", "0", "--ndoes", "2", "--",
         "--help"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "workflow")})
    assert result.returncode == 2
    assert "python -m brainage.launch: error: unrecognized arguments: --ndoes 2" in result.stderr
    assert "brainage.train" not in result.stdout


@pytest.mark.parametrize("flags", [["--gpus", "-1"], ["--gpus", "two"], ["--gpus", "1", "--nodes",
                                                                        "0"]])
def test_a_negative_or_non_numeric_count_is_a_usage_error_naming_the_flag(flags, capsys):
    from brainage.launch import main

    with pytest.raises(SystemExit) as stopped:
        main([*flags, "--", "--split-dir", "x"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flags[-2]}: expected a whole number of at least" in error, error


def test_a_launch_that_fails_before_training_says_why_in_the_job_log(tmp_path, monkeypatch):
    """The rule's log is written by brainage.train, which never started: a run on several
    nodes outside SLURM (or without srun) told only the terminal, and Snakemake pointed
    at a log that did not exist."""
    from brainage.launch import main

    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    log = tmp_path / "pretrain_encoder.log"
    with pytest.raises(SystemExit, match="must start inside a SLURM job"):
        main(["--gpus", "1", "--nodes", "2", "--", "--split-dir", "x", "--log", str(log)])
    assert re.search(r"ERROR brainage\.launch: a run on several nodes must start inside a "
                     r"SLURM job", log.read_text())
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    monkeypatch.setattr("brainage.launch.first_node", lambda environ: "gpu07")
    with pytest.raises(SystemExit, match="cannot start srun"):
        main(["--gpus", "1", "--nodes", "2", "--", f"--log-file={log}"])
    assert "ERROR brainage.launch: cannot start srun: " in log.read_text()
