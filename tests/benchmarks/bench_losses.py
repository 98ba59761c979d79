"""Forward + backward time and peak memory of every loss in ``brainage.losses``.

Run:  python tests/benchmarks/bench_losses.py [--device cpu|cuda] [--sizes 64 512 2048] [--threads 1]

Not collected by pytest (the file name does not start with ``test_``). Prints a table.

Each (loss, N) case runs in fresh subprocesses, one for the timing and one for the
memory, so that one case's allocations cannot hide in another's high-water mark.
N = B·V rows with V = 2 views and D = 128 (the projection width). Reported:

* time: median and minimum wall time of one forward + backward over several repeats,
  after one warm-up call (the minimum is the least disturbed on a shared machine).
* peak memory, CPU: increase of the process's peak resident set size (VmHWM, reset
  through /proc/self/clear_refs just before the call) over the resident size before
  it, during one forward + backward. That process runs with glibc's mmap threshold at
  4 KiB, so every allocation of a page or more is mapped when made and unmapped when
  freed, and the resident size follows the live tensors, saved-for-backward ones
  included (granularity: 4 KiB pages). Falls back to a ru_maxrss difference, a lower
  bound, if clear_refs is not writable.
* peak memory, CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before
  the call (tensor memory as PyTorch's caching allocator counts it).

Next to the library losses it times ``naive threshold``: the Threshold loss computed
the way public code does it, through an [N, N, N] comparison tensor. It exists here
only, as the baseline the O(N²) implementation is measured against; at N = 64 the
benchmark checks that both give the same value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import brainage.losses  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "workflow"))

from brainage.losses import CONTRASTIVE_LOSSES, DISPLAY_NAMES, LOSS_NAMES, make_loss

VIEWS = 2
DIM = 128
NAIVE_LIMIT_BYTES = 8 * 2**30
NAIVE = "naive threshold"
ADAPTIVE_LAMBDA = "adaptive λ=1"
CASES = (*LOSS_NAMES, ADAPTIVE_LAMBDA, NAIVE)


# --------------------------------------------------------------------------- the baseline


def naive_threshold_loss(features, ages, temperature=0.1, base_temperature=0.07, sigma=2.0):
    """docs/method.md §5 Threshold loss (anchor reduction) through [N, N, N] tensors, in the
    style of the public reference code: repeat the kernel, compare, mask, sum."""
    batch, views, dim = features.shape
    n_rows = batch * views
    rows = features.float().transpose(0, 1).reshape(n_rows, dim)
    row_ages = ages.float().repeat(views)
    kernel = torch.exp(-(row_ages[:, None] - row_ages[None, :]).square() / (2 * sigma**2))
    logits = rows @ rows.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(n_rows, device=rows.device)
    exp_logits = torch.exp(logits) * not_self

    repeated = kernel.unsqueeze(-1).repeat(1, 1, n_rows)  # [a, k, t] = w_ak
    delta = (kernel.unsqueeze(1) < repeated).float()  # [a, k, t] = w_at < w_ak (never t = a)
    repulsion = (exp_logits.unsqueeze(1).repeat(1, n_rows, 1) * delta).sum(-1)  # [a, k]
    used = (delta.sum(-1) > 0) & (not_self > 0)

    log_repulsion = torch.log(torch.where(used, repulsion, 1.0))
    pair_loss = torch.where(used, log_repulsion - logits, 0.0)
    weight = torch.where(used, kernel, 0.0)
    weight_sum = weight.sum(1)
    has_weight = weight_sum > 0
    per_anchor = (weight * pair_loss).sum(1) / torch.where(has_weight, weight_sum, 1.0)
    per_anchor = torch.where(has_weight, per_anchor, 0.0)
    loss = per_anchor.sum() / has_weight.sum().clamp_min(1)
    return loss * temperature / base_temperature


def naive_bytes(n_rows: int) -> int:
    """About four float32 [N, N, N] tensors are alive at once in the naive version."""
    return 4 * 4 * n_rows**3


# --------------------------------------------------------------------------- one case


def build_case(case: str, n_rows: int, device: str):
    batch = n_rows // VIEWS
    generator = torch.Generator().manual_seed(0)
    if case in CONTRASTIVE_LOSSES or case in (NAIVE, ADAPTIVE_LAMBDA):
        features = F.normalize(torch.randn(batch, VIEWS, DIM, generator=generator), dim=-1)
    else:  # the supervised baseline: the regression head's one standardised age per view
        features = torch.randn(batch, VIEWS, 1, generator=generator)
    features = features.to(device).requires_grad_()
    # bimodal ages, years
    young = 20 + 8 * torch.rand(batch, generator=generator)
    old = 60 + 15 * torch.rand(batch, generator=generator)
    ages = torch.where(torch.rand(batch, generator=generator) < 0.5, young, old).to(device)
    if case == NAIVE:
        return (lambda features, ages, epoch: naive_threshold_loss(features, ages)), features, ages
    name, lam = ("adaptive", 1.0) if case == ADAPTIVE_LAMBDA else (case, None)
    loss = make_loss(name, batch_size=batch, nn_final=min(14, batch), max_epochs=50, lam=lam).to(device)
    if name == "nnclr":  # steady state: a full support set
        loss.support_set.push(F.normalize(torch.randn(256, DIM, generator=generator), dim=-1).to(device))
    return loss, features, ages


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_case(case: str, n_rows: int, device: str, measure: str, repeats: int) -> dict:
    """Worker: time (``measure="time"``) or peak memory (``"memory"``) of one (case, N)."""
    loss, features, ages = build_case(case, n_rows, device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        value = loss(features, ages, 1)
        value.backward()
        features.grad = None
        return value

    value = float(step().detach())  # warm-up: lazy initialisation, allocator growth
    synchronize()
    result = {"case": case, "n_rows": n_rows, "value": value}

    if measure == "time":
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times.append(time.perf_counter() - start)
        return {**result, "time_ms": 1000 * statistics.median(times), "min_time_ms": 1000 * min(times)}

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize()
        peak_bytes = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated minus allocation before the call"
    elif _reset_peak_rss():
        before = _status_kib("VmRSS")
        step()
        peak_bytes = (_status_kib("VmHWM") - before) * 1024
        method = "peak RSS (VmHWM, reset via clear_refs) minus RSS before; glibc mmap threshold 4 KiB"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        method = "ru_maxrss difference (a lower bound: clear_refs not writable)"
    return {**result, "peak_mib": peak_bytes / 2**20, "memory_method": method}


# --------------------------------------------------------------------------- driver


def run_in_subprocess(
    case: str, n_rows: int, device: str, measure: str, repeats: int, threads: int
) -> dict:
    command = [
        sys.executable, __file__, "--worker", case, str(n_rows), "--measure", measure,
        "--device", device, "--repeats", str(repeats), "--threads", str(threads),
    ]
    python_path = [str(Path(__file__).resolve().parents[2] / "workflow"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))}
    if measure == "memory":
        # glibc serves every allocation of 4 KiB or more with mmap and unmaps it on free,
        # so the resident size follows the live tensors instead of recycled heap pages.
        # (Slows allocation down, hence a separate process from the timing.)
        env |= {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        return {"case": case, "n_rows": n_rows, "error": completed.stderr.strip().splitlines()[-1:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 2048], help="N = B·V rows")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: by size)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads per case (default 1: at these sizes threads gain little, and on a "
        "shared machine multi-threaded timings are erratic)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        case, n_rows = args.worker
        print(json.dumps(run_case(case, int(n_rows), args.device, args.measure, args.repeats or 5)))
        return

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"brainage.losses benchmark: torch {torch.__version__}, {device_name}, V = {VIEWS}, D = {DIM}")
    print(
        "time = one forward+backward (median and min over repeats); "
        "peak = extra peak memory during one forward+backward"
    )
    header = f"{'loss':<26}{'N':>6}{'median ms':>12}{'min ms':>10}{'peak MiB':>12}"
    print(header)
    print("-" * len(header))
    results = {}
    method = None
    for n_rows in args.sizes:
        repeats = args.repeats or (20 if n_rows <= 64 else 5 if n_rows <= 512 else 3)
        for case in CASES:
            label = DISPLAY_NAMES.get(case, case)
            if case == NAIVE and naive_bytes(n_rows) > NAIVE_LIMIT_BYTES:
                needed = naive_bytes(n_rows) / 2**30
                print(f"{label:<26}{n_rows:>6}   skipped: needs ~{needed:.0f} GiB (> 8 GiB)")
                continue
            timing = run_in_subprocess(case, n_rows, args.device, "time", repeats, args.threads)
            memory = run_in_subprocess(case, n_rows, args.device, "memory", 1, args.threads)
            if "error" in timing or "error" in memory:
                print(f"{label:<26}{n_rows:>6}   failed: {timing.get('error') or memory.get('error')}")
                continue
            result = results[case, n_rows] = {**timing, **memory}
            method = result["memory_method"]
            print(
                f"{label:<26}{n_rows:>6}{result['time_ms']:>12.2f}{result['min_time_ms']:>10.2f}"
                f"{result['peak_mib']:>12.2f}"
            )
    print(f"memory measured as: {method}")

    for n_rows in args.sizes:
        ours, naive = results.get(("threshold", n_rows)), results.get((NAIVE, n_rows))
        if ours and naive and "error" not in ours and "error" not in naive:
            agree = math.isclose(ours["value"], naive["value"], rel_tol=1e-4)
            memory_ratio = naive["peak_mib"] / max(ours["peak_mib"], 1e-3)
            speed_ratio = naive["time_ms"] / ours["time_ms"]
            print(
                f"threshold vs naive at N = {n_rows}: {memory_ratio:.0f}x less memory, "
                f"{speed_ratio:.1f}x faster (median); same value: {agree} "
                f"({ours['value']:.6f} vs {naive['value']:.6f})"
            )


if __name__ == "__main__":
    main()
