"""Every output path of the pipeline, built in one place.

Rules, scripts and tests ask :class:`Layout` for paths instead of writing path strings, so
the layout described in docs/architecture.md lives here and nowhere else. Any argument may
be a Snakemake wildcard placeholder such as ``"{subject}"``.

Per-subject preprocessing outputs form a BIDS-Derivatives dataset per cohort (its *preproc
folder*, relative to ``results``): ``preproc`` for the training cohort,
``predict/<cohort>/preproc`` for a cohort a trained model is applied to. Files are named by
the BIDS entities of the template space (``space-<TemplateFlow id>_res-2``)::

    <preproc>/dataset_description.json, README.md, .bidsignore, top-level sidecars
    <preproc>/tpl-<space>/tpl-<space>_res-2_T1w.nii.gz, ..._desc-brain_mask.nii.gz
    <preproc>/sub-<label>/anat/sub-<label>_desc-brain_mask.nii.gz          native space
    <preproc>/sub-<label>/anat/sub-<label>_space-<space>_res-2_desc-preproc_stiffness.nii.gz
    <preproc>/sub-<label>/anat/sub-<label>_from-native_to-<space>_mode-image_xfm.mat
    <preproc>/sub-<label>/figures/sub-<label>_qc.json, sub-<label>_qc.png

Logs and benchmarks mirror results: ``logs/<preproc>/sub-<label>/<rule>.log``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

#: The training cohort's preprocessing folder (relative to ``results``).
TRAINING_PREPROC = "preproc"
#: TemplateFlow identifier of nilearn's bundled MNI152: ICBM 2009a nonlinear *symmetric*.
#: nilearn's docstring says "asymmetrical", but its files are McGill's
#: ``mni_icbm152_*_tal_nlin_sym_09a`` and the image equals its own mirror image about
#: x = 0 voxel for voxel (tests/test_derivatives.py checks it), which no asymmetric template
#: does. docs/method.md ("Template") tells the story.
DEFAULT_SPACE = "MNI152NLin2009aSym"
TEMPLATE_RESOLUTION = "res-2"


def names_sharing_a_folder(names: Iterable[str], folder: Callable[[str], str] = str
                           ) -> list[list[str]]:
    """The groups (two or more, in the order given) of ``names`` whose folders
    ``folder(name)`` differ only in case: one folder on a case-insensitive file system
    (macOS, Windows shares), where one name's results would overwrite the other's."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(folder(name).lower(), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


@dataclass(frozen=True)
class Layout:
    """Output folders (``results``, ``logs`` and ``benchmarks`` mirror each other) and
    the template space that names the registered files."""

    results: str = "results"
    logs: str = "logs"
    benchmarks: str = "benchmarks"
    space: str = DEFAULT_SPACE

    @classmethod
    def from_config(cls, config: dict) -> "Layout":
        output = config.get("output", {})
        return cls(output.get("results", "results"), output.get("logs", "logs"),
                   output.get("benchmarks", "benchmarks"),
                   config.get("template", {}).get("space", DEFAULT_SPACE))

    # -- generic ------------------------------------------------------------------------
    def result(self, *parts: str) -> str:
        return str(Path(self.results, *parts))

    def log(self, stage: str, name: str) -> str:
        return str(Path(self.logs, stage, f"{name}.log"))

    def benchmark(self, stage: str, name: str) -> str:
        return str(Path(self.benchmarks, stage, f"{name}.tsv"))

    # -- a cohort's BIDS-Derivatives preprocessing folder ----------------------------------
    def preproc_dir(self, preproc: str = TRAINING_PREPROC) -> str:
        return self.result(preproc)

    @staticmethod
    def cohort_preproc(cohort: str) -> str:
        """The preproc folder (relative to results) of a cohort a model is applied to."""
        return f"predict/{cohort}/preproc"

    def template(self, kind: str) -> str:
        """kind: ``T1w`` or ``brain_mask`` (the template at 2 mm), in the training cohort's
        derivative dataset, where every cohort's registration reads it."""
        suffix = {"T1w": "T1w", "brain_mask": "desc-brain_mask"}[kind]
        name = f"tpl-{self.space}"
        return self.result(TRAINING_PREPROC, name,
                           f"{name}_{TEMPLATE_RESOLUTION}_{suffix}.nii.gz")

    def _subject(self, subject: str, preproc: str, folder: str, name: str) -> str:
        return self.result(preproc, f"sub-{subject}", folder, f"sub-{subject}_{name}")

    def subject_native(self, subject: str, desc: str, suffix: str, ext: str = ".nii.gz", *,
                       preproc: str = TRAINING_PREPROC) -> str:
        """Native-space output, e.g. desc='brain', suffix='mask' (the map's own grid)."""
        return self._subject(subject, preproc, "anat", f"desc-{desc}_{suffix}{ext}")

    def subject_mni(self, subject: str, desc: str, suffix: str, ext: str = ".nii.gz", *,
                    preproc: str = TRAINING_PREPROC) -> str:
        """Template-space output, e.g. desc='preproc', suffix='stiffness'."""
        return self._subject(subject, preproc, "anat",
                             f"space-{self.space}_{TEMPLATE_RESOLUTION}_desc-{desc}_{suffix}{ext}")

    def subject_transform(self, subject: str, *, preproc: str = TRAINING_PREPROC) -> str:
        """The ANTs affine (template -> native, applied to native images)."""
        return self._subject(subject, preproc, "anat",
                             f"from-native_to-{self.space}_mode-image_xfm.mat")

    def subject_qc(self, subject: str, ext: str, *, preproc: str = TRAINING_PREPROC) -> str:
        """ext: ``.json`` (metrics) or ``.png`` (three orthogonal views)."""
        return self._subject(subject, preproc, "figures", f"qc{ext}")

    def preproc_description(self, preproc: str = TRAINING_PREPROC) -> str:
        """The derivative dataset's ``dataset_description.json``."""
        return self.result(preproc, "dataset_description.json")

    def preproc_log(self, preproc: str, subject: str, rule: str) -> str:
        return str(Path(self.logs, preproc, f"sub-{subject}", f"{rule}.log"))

    def preproc_benchmark(self, preproc: str, subject: str, rule: str) -> str:
        return str(Path(self.benchmarks, preproc, f"sub-{subject}", f"{rule}.tsv"))

    # -- dataset-wide ---------------------------------------------------------------------
    def qc_table(self) -> str:
        return self.result("qc", "qc.tsv")

    def split_dir(self, split: str) -> str:
        return self.result("dataset", split)

    def split_file(self, split: str, name: str) -> str:
        """name: ``images.npy``, ``participants.tsv`` or ``stats.json``."""
        return self.result("dataset", split, name)

    # -- grid cells -----------------------------------------------------------------------
    # The split is a folder level of its own because k-fold and leave-one-study-out
    # schemes train every cell once per split.
    def cell_dir(self, split: str, experiment: str, variant: str, seed: str | int) -> str:
        return self.result("train", split, experiment, variant, f"seed-{seed}")

    def cell_file(self, split: str, experiment: str, variant: str, seed: str | int,
                  name: str) -> str:
        """name: ``encoder.pt``, ``history.tsv``, ``embeddings`` (folder), ``checkpoint.pt``
        (training); ``metrics.json``, ``predictions.tsv``, ``readout.npz``, ``readout.json``
        (evaluation)."""
        return str(Path(self.cell_dir(split, experiment, variant, seed), name))

    # -- reports --------------------------------------------------------------------------
    def table(self, name: str, ext: str) -> str:
        return self.result("tables", f"{name}{ext}")

    def figure(self, name: str) -> str:
        return self.result("figures", f"{name}.png")

    # -- predict: model bundles and new cohorts -------------------------------------------
    def model_bundle(self, name: str) -> str:
        return self.result("models", name)

    def model_bundle_file(self, name: str, file: str) -> str:
        """file: ``manifest.json``, ``encoder.pt``, ``readout.pt``, ``README.md``."""
        return str(Path(self.model_bundle(name), file))

    def prediction(self, cohort: str, name: str = "predictions.tsv") -> str:
        return self.result("predict", cohort, name)

    # -- pretraining runs (config pretrain) -----------------------------------------------
    # results/pretrain/<name>/: sourcedata/ (a simulated cohort), preproc/ (its derivative
    # dataset), qc.tsv, split/ (images.npy, participants.tsv, stats.json), then the encoder
    # and its validation read-out (the files of a grid cell).
    def pretrain_dir(self, name: str) -> str:
        return self.result("pretrain", name)

    def pretrain_file(self, name: str, file: str) -> str:
        """file: ``settings.json``, ``qc.tsv``, ``encoder.pt``, ``history.tsv``,
        ``embeddings``, ``features.npz``, ``checkpoint.pt``, ``metrics.json``,
        ``predictions.tsv``, ``readout.npz``, ``readout.json``."""
        return str(Path(self.pretrain_dir(name), file))

    def pretrain_split_dir(self, name: str) -> str:
        return self.result("pretrain", name, "split")

    def pretrain_split_file(self, name: str, file: str) -> str:
        return str(Path(self.pretrain_split_dir(name), file))

    def pretrain_source(self, name: str) -> str:
        """Where a simulated pretraining cohort is written (a BIDS-like raw dataset)."""
        return self.result("pretrain", name, "sourcedata")

    @staticmethod
    def pretrain_preproc(name: str) -> str:
        """The preproc folder (relative to results) of a pretraining cohort."""
        return f"pretrain/{name}/preproc"

    # -- train: hyperparameter search (brainage.search) -----------------------------------
    def search_dir(self, split: str) -> str:
        """Random search of one split: ``results/search/<split>/`` (trial-<NN>/ folders)."""
        return self.result("search", split)

    def search_file(self, split: str, name: str) -> str:
        """name: ``trials.tsv`` (one row per trial) or ``best.json`` (the chosen setting)."""
        return str(Path(self.search_dir(split), name))
