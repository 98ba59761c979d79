"""Per-subject preprocessing (paper section 4.1, docs/method.md §1).

One function per step, each callable without Snakemake; Snakemake runs ``strip_skull``
as rule ``strip_skull`` and the next three as one job, rule ``correct_and_register``
(:data:`brainage.preprocess.chain.JOBS`):

- :func:`prepare_template` (rule ``prepare_template``): MNI152 T1 and brain mask, 2 mm;
- :func:`strip_skull`: brain mask on the stiffness grid, via a nipype interface
  (FreeSurfer SynthStrip/watershed, deepbet, or the map's support);
- :func:`correct_bias`: NaN cleaning and N4 inside the brain;
- :func:`register_to_template`: ANTs affine to MNI152 2 mm;
- ``compute_qc`` (:mod:`brainage.qc`): the subject's QC record.

QC of the result is in :mod:`brainage.qc`; the dataset-wide normalisation in
:mod:`brainage.normalise`.
"""

from brainage.preprocess.bias import correct_bias, n4_inside_mask
from brainage.preprocess.images import PreprocessError
from brainage.preprocess.register import (
                                          RegistrationError,
                                          register_to_template,
                                          template_to_native_matrix,
)
from brainage.preprocess.skullstrip import resolve_method, strip_skull
from brainage.preprocess.template import prepare_template

__all__ = ["prepare_template", "strip_skull", "correct_bias", "register_to_template",
           "n4_inside_mask", "resolve_method", "template_to_native_matrix", "PreprocessError",
           "RegistrationError"]
