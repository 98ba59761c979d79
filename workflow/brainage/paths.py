"""Every output path of the pipeline, built in one place.

Rules, scripts and tests ask :class:`Layout` for paths instead of writing path strings,
so the layout in DESIGN.md lives here and nowhere else. Per-subject outputs follow
BIDS-derivatives naming (``sub-<label>_space-MNI152_res-2_desc-preproc_stiffness.nii.gz``).
Any argument may be a Snakemake wildcard placeholder such as ``"{subject}"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Output folders: ``results``, ``logs`` and ``benchmarks`` mirror each other."""

    results: str = "results"
    logs: str = "logs"
    benchmarks: str = "benchmarks"
    resources: str = "resources"

    @classmethod
    def from_config(cls, config: dict) -> "Layout":
        output = config.get("output", {})
        return cls(output.get("results", "results"), output.get("logs", "logs"),
                   output.get("benchmarks", "benchmarks"))

    # -- generic ------------------------------------------------------------------------
    def result(self, *parts: str) -> str:
        return str(Path(self.results, *parts))

    def log(self, stage: str, name: str) -> str:
        return str(Path(self.logs, stage, f"{name}.log"))

    def benchmark(self, stage: str, name: str) -> str:
        return str(Path(self.benchmarks, stage, f"{name}.tsv"))

    # -- template -----------------------------------------------------------------------
    def template(self, kind: str) -> str:
        """kind: ``T1w`` or ``brain_mask`` (MNI152 at 2 mm), prepared into resources/."""
        suffix = {"T1w": "T1w", "brain_mask": "desc-brain_mask"}[kind]
        return str(Path(self.resources, "template", f"tpl-MNI152_res-2_{suffix}.nii.gz"))

    # -- per subject ----------------------------------------------------------------------
    def subject_native(self, subject: str, desc: str, suffix: str, ext: str = ".nii.gz") -> str:
        """Native-space intermediate, e.g. desc='brain', suffix='mask'."""
        return self.result("preproc", f"sub-{subject}", "native",
                           f"sub-{subject}_desc-{desc}_{suffix}{ext}")

    def subject_mni(self, subject: str, desc: str, suffix: str, ext: str = ".nii.gz") -> str:
        """Template-space output, e.g. desc='preproc', suffix='stiffness'."""
        return self.result("preproc", f"sub-{subject}",
                           f"sub-{subject}_space-MNI152_res-2_desc-{desc}_{suffix}{ext}")

    def subject_transform(self, subject: str) -> str:
        return self.result("preproc", f"sub-{subject}",
                           f"sub-{subject}_from-native_to-MNI152_mode-image_xfm.mat")

    def subject_qc(self, subject: str, ext: str) -> str:
        """ext: ``.json`` (metrics) or ``.png`` (three orthogonal views)."""
        return self.result("preproc", f"sub-{subject}", f"sub-{subject}_qc{ext}")

    # -- dataset-wide ---------------------------------------------------------------------
    def qc_table(self) -> str:
        return self.result("qc", "qc.tsv")

    def qc_figure(self) -> str:
        return self.result("qc", "qc_overview.png")

    def split_dir(self, split: str) -> str:
        return self.result("dataset", split)

    def split_file(self, split: str, name: str) -> str:
        """name: ``images.npy``, ``participants.tsv`` or ``stats.json``."""
        return self.result("dataset", split, name)

    # -- grid cells -----------------------------------------------------------------------
    # The split is a folder level of its own (DESIGN.md had none) because k-fold and
    # leave-one-study-out schemes train every cell once per split.
    def cell_dir(self, split: str, experiment: str, variant: str, seed: str | int) -> str:
        return self.result("train", split, experiment, variant, f"seed-{seed}")

    def cell_file(self, split: str, experiment: str, variant: str, seed: str | int,
                  name: str) -> str:
        """name: ``encoder.pt``, ``history.tsv``, ``metrics.json``, ``predictions.tsv``,
        ``embeddings`` (folder), ``checkpoint.pt``."""
        return str(Path(self.cell_dir(split, experiment, variant, seed), name))

    # -- reports --------------------------------------------------------------------------
    def table(self, name: str, ext: str) -> str:
        return self.result("tables", f"{name}{ext}")

    def figure(self, name: str) -> str:
        return self.result("figures", f"{name}.png")

    def model_bundle(self, name: str) -> str:
        return self.result("models", name)

    def prediction(self, cohort: str, name: str = "predictions.tsv") -> str:
        return self.result("predict", cohort, name)

    # -- predict: model bundles and new cohorts (brainage.predict) -------------------------
    def model_bundle_file(self, name: str, file: str) -> str:
        """file: ``manifest.json``, ``encoder.pt``, ``readout.pt``, ``README.md``."""
        return str(Path(self.model_bundle(name), file))

    def cohort_layout(self, cohort: str) -> "Layout":
        """Paths of a predict cohort: its per-subject preprocessing goes to
        ``results/predict/<cohort>/preproc/sub-<label>/...`` (the same names as the
        training cohort's, via the same methods), its logs and benchmarks to
        ``logs/predict/<cohort>/...`` and ``benchmarks/predict/<cohort>/...``."""
        return Layout(self.result("predict", cohort), str(Path(self.logs, "predict", cohort)),
                      str(Path(self.benchmarks, "predict", cohort)), self.resources)

    # -- train: hyperparameter search (brainage.search) ---------------------------------------
    def search_dir(self, split: str) -> str:
        """Random search of one split: ``results/search/<split>/`` (trial-<NN>/ folders)."""
        return self.result("search", split)

    def search_file(self, split: str, name: str) -> str:
        """name: ``trials.tsv`` (one row per trial) or ``best.json`` (the chosen setting)."""
        return str(Path(self.search_dir(split), name))
