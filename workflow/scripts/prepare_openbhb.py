"""Rule prepare_openbhb: the OpenBHB release as a normalised pretraining split
(brainage.openbhb.write_pretraining_split)."""

from brainage.logs import log_to_file
from brainage.openbhb import read_release, write_pretraining_split

log_to_file(snakemake.log[0])
release = read_release(snakemake.params.root, validation=snakemake.params.validation)
write_pretraining_split(release, snakemake.input.template_mask, snakemake.output.images,
                        snakemake.output.participants, snakemake.output.stats,
                        resolution_mm=snakemake.params.normalise["resolution_mm"],
                        dtype=snakemake.params.normalise["dtype"],
                        scope=snakemake.params.normalise["scope"])
