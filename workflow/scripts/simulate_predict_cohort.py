"""Rule simulate_predict_cohort: the demo's new cohort (brainage.predict.simulate_new_cohort)."""

from brainage.logs import log_to_file
from brainage.predict import simulate_new_cohort

log_to_file(snakemake.log[0])
simulate_new_cohort(snakemake.params.root, **snakemake.params.options)
