"""Rules simulate_cohort and simulate_predict_cohort: a simulated cohort into its root."""

from brainage.logs import log_to_file
from brainage.simulate import replace_simulation

log_to_file(snakemake.log[0])
replace_simulation(snakemake.params.root, **snakemake.params.options)
