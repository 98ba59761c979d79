"""Nipype interfaces of the skull-stripping tools.

Every skull-stripping route runs through a nipype interface with explicit input and
output specs, so a nipype workflow (or a lab's own) can reuse them unchanged:

- :class:`SynthStrip` — FreeSurfer's ``mri_synthstrip`` (nipype has no interface for it);
- :class:`WatershedSkullStrip` — FreeSurfer's ``mri_watershed`` (nipype's interface);
- :class:`DeepBet` — the deepbet network (PyPI package with bundled weights);
- :class:`SupportMask` — no stripping: the mask is the image's own positive support.

The Python interfaces' ``_run_interface`` hands off to a plain function in
:mod:`brainage.preprocess.masks`, which is where the logic and its tests live.
"""

from __future__ import annotations

import os

# nipype asks a web service for its latest version when an interface is created; there is
# no network on compute nodes, so switch that off before nipype is imported.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from nipype.interfaces.base import (  # noqa: E402
    BaseInterface,
    BaseInterfaceInputSpec,
    CommandLine,
    CommandLineInputSpec,
    File,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.interfaces.freesurfer import WatershedSkullStrip as _NipypeWatershed  # noqa: E402

from brainage.preprocess.masks import deepbet_brain_mask, support_brain_mask  # noqa: E402

__all__ = ["SynthStrip", "WatershedSkullStrip", "DeepBet", "SupportMask", "ToolExitError"]


class _ExitChecked:
    """A command-line interface that fails when its program exits non-zero.

    nipype (>= 1.8) records a non-zero exit code without raising; the run then stopped on
    the missing output file, whose path (in a temporary folder) was all the message said.
    This raises ``RuntimeError`` naming the program, its exit code and the last line it
    wrote to stderr (else stdout), e.g. FreeSurfer's missing licence or model file.
    """

    def _run_interface(self, runtime, correct_return_codes=(0,)):
        runtime = super()._run_interface(runtime, correct_return_codes)
        if runtime.returncode not in correct_return_codes:
            said = [[line.strip() for line in (stream or "").splitlines() if line.strip()]
                    for stream in (getattr(runtime, "stderr", ""), getattr(runtime, "stdout", ""))]
            last = said[0][-1] if said[0] else said[1][-1] if said[1] else "no output"
            raise ToolExitError(self.cmd, runtime.returncode, last)
        return runtime


class ToolExitError(RuntimeError):
    """A command-line tool exited non-zero: ``program``, its ``returncode`` and the last
    line it wrote (``said``), so that a caller can tell a usage error (2) or a kill (137,
    e.g. the memory limit) from a tool that failed on its image."""

    def __init__(self, program: str, returncode: int, said: str):
        super().__init__(f"{program} exited with code {returncode}: {said}")
        self.program, self.returncode, self.said = program, returncode, said


class SynthStripInputSpec(CommandLineInputSpec):
    in_file = File(exists=True, mandatory=True, argstr="-i %s", position=0,
                   desc="head image to strip (any contrast, NIfTI or MGZ)")
    mask_file = File(mandatory=True, argstr="-m %s", position=1,
                     desc="brain mask to write (NIfTI)")
    # no argstr: FreeSurfer 7's mri_synthstrip has no -t and exits 2 on it (FreeSurfer 8
    # added one); every version's PyTorch takes its thread count from OMP_NUM_THREADS
    num_threads = traits.Int(desc="CPU threads of the network, passed as OMP_NUM_THREADS")


class SynthStripOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="brain mask")


class SynthStrip(_ExitChecked, CommandLine):
    """FreeSurfer's SynthStrip (``mri_synthstrip``, FreeSurfer >= 7.3).

    Examples
    --------
    >>> strip = SynthStrip(in_file="T1w.nii.gz", mask_file="mask.nii.gz", num_threads=1)
    >>> strip.cmdline  # doctest: +SKIP
    'mri_synthstrip -i T1w.nii.gz -m mask.nii.gz'
    >>> strip.inputs.environ["OMP_NUM_THREADS"]  # doctest: +SKIP
    '1'
    """

    _cmd = "mri_synthstrip"
    input_spec = SynthStripInputSpec
    output_spec = SynthStripOutputSpec

    def __init__(self, **inputs):
        super().__init__(**inputs)
        self.inputs.on_trait_change(self._num_threads_update, "num_threads")
        self._num_threads_update()

    def _num_threads_update(self):
        if isdefined(self.inputs.num_threads):
            threads = str(self.inputs.num_threads)
            self.inputs.environ.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})

    def _list_outputs(self):
        outputs = self.output_spec().get()
        outputs["mask_file"] = os.path.abspath(self.inputs.mask_file)
        return outputs


class WatershedSkullStrip(_ExitChecked, _NipypeWatershed):
    """FreeSurfer's ``mri_watershed`` (nipype's interface), failing on a non-zero exit.

    A ``subjects_dir`` given here is used as is. nipype otherwise reads ``$SUBJECTS_DIR``
    wherever FreeSurfer is installed, and fails before running anything when it is unset
    (``KeyError``) or names a folder the node lacks (``TraitError``); this call of
    mri_watershed does not use it, so the pipeline passes its own work folder.
    """

    def __init__(self, **inputs):
        if inputs.get("subjects_dir"):
            self._subjects_dir = inputs["subjects_dir"]  # nipype then skips $SUBJECTS_DIR
        super().__init__(**inputs)


class DeepBetInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w head image (NIfTI)")
    mask_file = File(mandatory=True, desc="brain mask to write (NIfTI, uint8)")
    threshold = traits.Float(0.5, usedefault=True, desc="brain probability threshold")
    n_dilate = traits.Int(0, usedefault=True,
                          desc="voxel layers added to (> 0) or removed from (< 0) the mask")
    num_threads = traits.Int(1, usedefault=True, desc="PyTorch CPU threads")
    use_gpu = traits.Bool(False, usedefault=True, desc="run the network on a GPU if present")


class DeepBetOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="brain mask")


class DeepBet(BaseInterface):
    """deepbet brain extraction (Fisch et al. 2024), weights shipped with the package."""

    input_spec = DeepBetInputSpec
    output_spec = DeepBetOutputSpec

    def _run_interface(self, runtime):
        deepbet_brain_mask(self.inputs.in_file, self.inputs.mask_file,
                           threshold=self.inputs.threshold, n_dilate=self.inputs.n_dilate,
                           threads=self.inputs.num_threads, use_gpu=self.inputs.use_gpu)
        return runtime

    def _list_outputs(self):
        return {"mask_file": os.path.abspath(self.inputs.mask_file)}


class SupportMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="already-masked image (zero outside the brain)")
    mask_file = File(mandatory=True, desc="brain mask to write (NIfTI, uint8)")


class SupportMaskOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="brain mask: largest positive component, holes filled")


class SupportMask(BaseInterface):
    """The brain mask of an image that is already masked: its positive support."""

    input_spec = SupportMaskInputSpec
    output_spec = SupportMaskOutputSpec

    def _run_interface(self, runtime):
        support_brain_mask(self.inputs.in_file, self.inputs.mask_file)
        return runtime

    def _list_outputs(self):
        return {"mask_file": os.path.abspath(self.inputs.mask_file)}
