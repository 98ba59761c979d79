"""Where a finished run's time went, from the benchmark table Snakemake writes per job.

Every rule has a ``benchmark:`` file (``benchmarks/<stage>/...tsv``: wall seconds ``s``,
``cpu_time``, ``max_rss``). This prints, per rule and per stage, the number of jobs and
the summed wall and CPU seconds, the share of the summed wall time and the largest peak
memory of a job (MB; Snakemake samples it every 0.5 s at first, then every 30 s, so a short
peak in a long job can be missed: a lower bound); with N local cores the elapsed time is
roughly the summed wall time / N plus the scheduling gaps.

Two limits: Snakemake writes a job's table for its successful attempt only, so the time of
failed attempts (retries for memory on SLURM) and of failed jobs is not in it (``sacct``
has it); and every table under the folder counts, also those of earlier invocations (a
cell of an experiment since dropped): summarise a fresh run's folder.

Usage::

    python tests/benchmarks/summarise_run.py [benchmarks folder]   # default: benchmarks

To tell the instruction set from the rest of a machine, run the pipeline once as usual and
once under ``tests/benchmarks/avx2_only.sh`` (AVX2 code paths on an AVX-512 CPU), and
compare the two summaries.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

#: Rule -> stage of the pipeline, for the per-stage lines.
STAGES = {
    "simulate_cohort": "data", "simulate_predict_cohort": "data",
    "simulate_pretrain_cohort": "data", "prepare_template": "data", "prepare_openbhb": "data",
    "strip_skull": "preprocessing", "correct_and_register": "preprocessing",
    "describe_preprocessing": "preprocessing", "tabulate_qc": "preprocessing",
    "tabulate_pretrain_qc": "preprocessing", "normalise_dataset": "preprocessing",
    "normalise_pretrain_cohort": "preprocessing",
    "pretrain_encoder": "training", "train_encoder": "training",
    "search_hyperparameters": "training",
    "evaluate_encoder": "evaluation", "evaluate_pretrained_encoder": "evaluation",
    "export_model": "evaluation",
    "make_tables": "tables and figures", "make_figures": "tables and figures",
    "plot_embeddings": "tables and figures", "plot_pretraining_embeddings": "tables and figures",
    "predict_cohort": "prediction",
}


#: Rules whose benchmark table adds a wildcard value to the rule name.
NAMED_BY_WILDCARD = ("export_model", "plot_pretraining_embeddings")


def main(folder: str = "benchmarks") -> None:
    rows = []
    for path in sorted(Path(folder).rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        # export_model_<bundle>.tsv names its bundle, plot_pretraining_embeddings_<run>.tsv
        # its run; preprocessing tables their subject
        rule = path.stem if path.stem in STAGES else path.stem.split("_sub-")[0]
        rule = next((name for name in NAMED_BY_WILDCARD if rule.startswith(f"{name}_")), rule)
        rows.append({"rule": rule, "wall_s": float(table["s"].iloc[0]),
                     "cpu_s": float(table["cpu_time"].iloc[0]),
                     "max_rss_mb": float(table["max_rss"].iloc[0])})
    if not rows:
        raise SystemExit(f"no benchmark tables under {folder}")
    jobs = pd.DataFrame(rows)
    jobs["stage"] = jobs["rule"].map(STAGES).fillna("other")
    total = jobs["wall_s"].sum()
    print(f"{'rule':<28}{'jobs':>6}{'wall s':>10}{'CPU s':>10}{'wall/job':>10}{'share':>8}"
          f"{'peak MB':>9}")
    by_rule = jobs.groupby(["stage", "rule"], sort=False).agg(
        jobs=("wall_s", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"),
        max_rss_mb=("max_rss_mb", "max"))
    stage_totals = defaultdict(float)
    for (stage, rule), row in by_rule.iterrows():
        stage_totals[stage] += row["wall_s"]
        print(f"{rule:<28}{int(row['jobs']):>6}{row['wall_s']:>10.1f}{row['cpu_s']:>10.1f}"
              f"{row['wall_s'] / row['jobs']:>10.1f}{row['wall_s'] / total:>8.1%}"
              f"{row['max_rss_mb']:>9.0f}")
    print()
    for stage, wall in stage_totals.items():
        print(f"{stage:<28}{'':>6}{wall:>10.1f}{'':>20}{wall / total:>8.1%}")
    print(f"{'all jobs':<28}{len(jobs):>6}{total:>10.1f}{jobs['cpu_s'].sum():>10.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
