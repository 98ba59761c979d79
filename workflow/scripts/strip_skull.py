"""Rule strip_skull: brain mask on the stiffness grid and the registration reference."""

from brainage.logs import log_to_file
from brainage.preprocess import strip_skull

log_to_file(snakemake.log[0])
strip_skull(snakemake.input.stiffness, snakemake.output.mask, snakemake.output.reference,
            snakemake.output.info, anat=snakemake.input.get("anat"),
            method=snakemake.params.skullstrip, freesurfer_tool=snakemake.params.freesurfer_tool,
            threads=snakemake.threads, subject=snakemake.wildcards.subject)
