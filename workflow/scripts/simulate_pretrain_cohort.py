"""Rule simulate_pretrain_cohort_<name>: the simulated T1w pretraining cohort
(brainage.simulate.t1w_cohort)."""

from brainage.logs import log_to_file
from brainage.simulate.t1w_cohort import simulate_t1w_cohort

log_to_file(snakemake.log[0])
# overwrite: Snakemake removed the declared files; the rest of an earlier simulation
# (derivatives/simulation) is replaced with them
simulate_t1w_cohort(snakemake.params.root, n_subjects=snakemake.params.n_subjects,
                    seed=snakemake.params.seed, overwrite=True)
