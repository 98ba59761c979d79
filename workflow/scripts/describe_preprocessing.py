"""Rule describe_preprocessing: a cohort's preprocessing folder as a BIDS-Derivatives
dataset (brainage.preprocess.derivatives)."""

import nibabel as nib

from brainage.logs import log_to_file
from brainage.preprocess.derivatives import describe_preprocessing

log_to_file(snakemake.log[0])
describe_preprocessing(snakemake.params.folder, space=snakemake.params.space,
                       template_shape=nib.load(snakemake.input.template_mask).shape,
                       source=snakemake.params.source, version=snakemake.params.version,
                       template=snakemake.params.template,
                       modalities=snakemake.params.modalities, n4=snakemake.params.n4)
