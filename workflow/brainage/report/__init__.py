"""The paper's tables and figures from the grid's outputs (rules make_tables, make_figures).

- :mod:`brainage.report.targets`: which tables and figures a configuration produces (the
  workflow's targets), decided from the config alone;
- :mod:`brainage.report.results`: reading the cells' results, pooling splits and seeds,
  the paper's reference numbers;
- :mod:`brainage.report.tables`: ``results/tables/<name>.{csv,md,tex}``;
- :mod:`brainage.report.figures`: ``results/figures/<name>.png``.

With several splits (k-fold, leave-one-study-out) a seed's MAE is the MAE pooled over the
splits' test subjects (the ``n_test``-weighted mean of the split MAEs), so every subject is
tested once; with the holdout scheme it is the one split's MAE. Means and sds are then
taken over seeds (sd with ``ddof=1``, as "mean ± sd over 5 seeds" in the paper).

Every public function takes DataFrames / arrays or paths and is usable without Snakemake.
"""
