"""Start the processes of a training job (rule ``pretrain_encoder``).

``python -m brainage.launch --gpus N --nodes M -- <brainage.train arguments>`` replaces
itself (``exec``) with one ``python -m brainage.train`` for one GPU or the CPU, with
``torchrun --standalone`` and one process per GPU for several GPUs of one node, and with
``srun`` + ``torchrun`` on every node for several nodes (:mod:`brainage.distributed`).

The counts come from the job's resources, not from its params: Snakemake reruns a job
whose params change, and a run resumes from its checkpoint with any number of processes,
so moving a run to more GPUs (or the checkout to another folder) must not retrain it and
every cell fine-tuned from it. The Python that runs this module is the one that starts
training (the virtual environment's, or the conda environment's).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Mapping, Sequence

#: Lowest port of the first node on which torchrun's processes meet (c10d rendezvous);
#: :func:`rendezvous_port` adds the SLURM job id modulo :data:`RENDEZVOUS_PORTS`.
RENDEZVOUS_PORT = 29500
RENDEZVOUS_PORTS = 2000


def rendezvous_port(job_id: str | None, run: str = "") -> int:
    """The rendezvous port of a multi-node run: two such jobs whose first node is the same
    machine (possible under SLURM's node sharing) meet on different ports unless their job
    ids differ by a multiple of :data:`RENDEZVOUS_PORTS`, and so do two runs of one
    allocation (``run``: what tells them apart, e.g. their training arguments) unless their
    digests collide (1 in 2,000); below the usual ephemeral range."""
    offset = int(job_id) if job_id and job_id.isdigit() else 0
    if run:
        offset += int(run_digest(run), 16)
    return RENDEZVOUS_PORT + offset % RENDEZVOUS_PORTS


def run_digest(run: str) -> str:
    """Eight hex digits of ``run``'s sha256: its part of the rendezvous id and port."""
    import hashlib

    return hashlib.sha256(run.encode()).hexdigest()[:8]


def first_node(environ: Mapping[str, str]) -> str:
    """The first host of the SLURM job's node list (``scontrol show hostnames``)."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
    except (KeyError, OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"brainage.launch: a run on several nodes must start inside a SLURM "
                         f"job (SLURM_JOB_NODELIST and scontrol are needed): {error}") from None
    return hosts[0]


def training_command(gpus: int, nodes: int, *, python: str = sys.executable,
                     environ: Mapping[str, str] | None = None, run: str = "") -> list[str]:
    """The command that starts ``brainage.train`` on ``gpus`` GPUs of each of ``nodes``
    nodes (``gpus`` 0: the CPU). ``run`` tells a multi-node run from another of the same
    SLURM allocation (Snakemake inside one ``salloc`` may start two at once): with the job
    id alone, their torchruns met on one rendezvous and formed one process group."""
    if nodes < 1 or gpus < 0:
        raise SystemExit(f"brainage.launch: --gpus {gpus} --nodes {nodes}: expected at least "
                         f"one node and no negative GPU count.")
    if gpus <= 1 and nodes == 1:
        return [python, "-m", "brainage.train"]
    torchrun = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(max(gpus, 1))]
    if nodes == 1:
        return [*torchrun, "--standalone", "-m", "brainage.train"]
    environ = os.environ if environ is None else environ
    # --kill-on-bad-exit: a node whose torchrun fails ends the others' at once, instead
    # of their processes waiting in a collective for COLLECTIVE_TIMEOUT (brainage.distributed).
    # --cpus-per-task: srun of Slurm 22.05 to 23.02 does not inherit the job's
    # --cpus-per-task (SLURM_CPUS_PER_TASK), so where tasks are bound to CPUs
    # (task/affinity, task/cgroup) each node's torchrun and all its processes got one CPU.
    cpus = environ.get("SLURM_CPUS_PER_TASK", "")
    # --nodes/--ntasks: one torchrun on each of the run's nodes only; in a larger allocation
    # srun alone started one on every node, and the agents beyond the rendezvous's
    # --nnodes failed the step (--kill-on-bad-exit) once it closed
    return ["srun", "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1",
            "--kill-on-bad-exit=1",
            *(["--cpus-per-task", cpus] if cpus.isdigit() else []), *torchrun,
            "--nnodes", str(nodes),
            "--rdzv_backend", "c10d", "--rdzv_id",
            environ.get("SLURM_JOB_ID", "brainage") + (f"-{run_digest(run)}" if run else ""),
            "--rdzv_endpoint",
            f"{first_node(environ)}:{rendezvous_port(environ.get('SLURM_JOB_ID'), run)}", "-m",
            "brainage.train"]


def torchrun_safe(train_arguments: Sequence[str]) -> list[str]:
    """``brainage.train``'s arguments with ``--log`` spelt ``--log-file``: torchrun's parser
    reads abbreviations across the whole command line, the training's arguments too, and
    ``--log`` (what rule ``pretrain_encoder`` passes) is a prefix of its ``--log-dir`` and
    ``--logs-specs``, so a run on several GPUs stopped with "ambiguous option: --log"
    before any training. The rule's command stays as it is: a changed command would
    retrain finished runs and every cell fine-tuned from them."""
    return [re.sub(r"^--log(?==|$)", "--log-file", argument) for argument in train_arguments]


def _count(minimum: int):
    """An argparse type: a whole number of at least ``minimum`` (a wrong one is a usage
    error, exit status 2, naming the flag)."""
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, "
                                             f"not {text!r}")
        return int(text)
    return parse


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m brainage.launch",
        description="Start brainage.train on the job's GPUs and nodes; the arguments after "
                    "'--' go to brainage.train.")
    parser.add_argument("--gpus", type=_count(0), required=True,
                        help="GPUs per node (0: the CPU)")
    parser.add_argument("--nodes", type=_count(1), default=1)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:  # the launcher's own before it: a misspelt one is named here, not
        # passed on to brainage.train (which then complained about its own arguments)
        split = argv.index("--")
        arguments, train_arguments = parser.parse_args(argv[:split]), argv[split + 1:]
    else:
        arguments, train_arguments = parser.parse_known_args(argv)
    try:
        command = [*training_command(arguments.gpus, arguments.nodes,
                                     run=" ".join(train_arguments)),
                   *torchrun_safe(train_arguments)]
    except SystemExit as stop:
        _say_in_job_log(train_arguments, str(stop.code))
        raise
    sys.stdout.flush()
    try:
        os.execvp(command[0], command)
    except OSError as error:  # no srun on the node
        message = f"brainage.launch: cannot start {command[0]}: {error}"
        _say_in_job_log(train_arguments, message)
        raise SystemExit(message) from None


def _say_in_job_log(train_arguments: Sequence[str], message: str) -> None:
    """Append why the launch failed to the job's log (brainage.train's ``--log``), which
    the training opens only once it runs: Snakemake sends a user there when the job
    fails, and on SLURM the terminal's text goes to another file."""
    for index, argument in enumerate(train_arguments):
        if argument.startswith(("--log=", "--log-file=")):
            path = argument.split("=", 1)[1]
        elif argument in ("--log", "--log-file") and index + 1 < len(train_arguments):
            path = train_arguments[index + 1]
        else:
            continue
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(path, "a") as log:
                log.write(f"{stamp} ERROR brainage.launch: "
                          f"{message.removeprefix('brainage.launch: ')}\n")
        except OSError:
            pass  # the message still reaches stderr
        return


if __name__ == "__main__":
    main()
