"""Rule predict_cohort: brain age of a preprocessed new cohort (brainage.apply.predict_cohort)."""

from brainage.apply import predict_cohort
from brainage.logs import log_to_file

log_to_file(snakemake.log[0])
predict_cohort(snakemake.params.bundle_dir, snakemake.params.dataset_root,
               maps=snakemake.params.maps,
               qc=dict(zip(snakemake.params.labels, snakemake.input.qc)),
               predictions_path=snakemake.output.predictions,
               summary_path=snakemake.output.summary, figure_path=snakemake.output.figure,
               provenance_path=snakemake.output.provenance,
               cohort=snakemake.wildcards.cohort,
               qc_thresholds=snakemake.params.qc_thresholds,
               bias_reference_group=snakemake.params.bias_reference_group,
               seen_in_training=snakemake.params.seen_in_training,
               # the rule asks for no GPU: a bundle's train.device cuda would stop the job
               # on a CPU node (features are float32 on any device, brainage.models.embed_all)
               device="auto")
