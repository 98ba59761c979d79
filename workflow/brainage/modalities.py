"""The images a subject can provide, and what the pipeline does with each (docs/method.md,
"Modalities").

An MRE inversion yields several maps on one grid (``sub-<label>/mre/``): the shear
stiffness (kPa), the damping ratio (dimensionless), or the storage and loss moduli (kPa).
The session's T1w (``sub-<label>/anat/``) is a modality too. Config key
``dataset.modalities`` lists the ones the subjects provide; each grid cell's
``model.modalities`` chooses the network's input channels among them, in that order.

One subject, one brain mask and one transform: the mask lives on the grid of the subject's
*grid map* (its first MRE map in ``dataset.modalities`` order, or the T1w of a cohort
without MRE maps), the registration aligns one reference (the skull-stripped T1w when
there is one), and every map is carried to the template by that same transform
(:mod:`brainage.preprocess.register`). The T1w channel is the registered, bias-corrected
registration reference inside the warped brain mask.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Modality:
    """One kind of image.

    Attributes
    ----------
    name
        BIDS suffix and the name in config (``stiffness``, ``damping_ratio``, ...).
    folder
        BIDS datatype folder of the input: ``mre`` or ``anat``.
    unit
        Of the values: ``kPa``, ``1`` (dimensionless) or ``a.u.`` (arbitrary).
    description
        What messages call one subject's image ("damping-ratio map").
    valid_range
        Closed interval every brain voxel with data must lie in (after NaN handling); a
        voxel outside stops preprocessing with the subject and the file named. ``None``:
        no bound beyond ``positive``.
    median_range
        Interval the median of the brain voxels with data must lie in, in ``unit``: catches a
        map in the wrong unit (a brain's shear moduli are a few kPa, so a map in Pa has a
        median in the thousands, an unscaled 8-bit export one near 100). ``None``: no check.
    positive
        Non-positive voxels mean "no data" (background): the moduli of an inversion are
        positive where it succeeded.
    n4
        Bias-corrected with N4 when ``preprocess.n4`` is on. Not the damping ratio: a
        ratio of two moduli has no multiplicative intensity bias, and a correction could
        push it out of [0, 1].
    scale_by_brain_median
        Divided by its median brain value before the dataset-wide z-normalisation: T1w
        intensities are in scanner units that differ between sites by factors, MRE maps
        are physical quantities and keep their scale (the age signal is in it).
    white_matter_higher
        Higher in white than in grey matter, as a T1w is: QC's correlation with the
        template T1 measures a registration on such a map (the moduli, the T1w), not on
        the damping ratio, whose contrast is another (:func:`brainage.qc.compute_qc`).
    """

    name: str
    folder: str
    unit: str
    description: str
    _: KW_ONLY
    # no default: each map states them (a default of True bias-corrected a new map and
    # judged its registration by a contrast it may not have)
    n4: bool
    white_matter_higher: bool
    valid_range: tuple[float, float] | None = None
    median_range: tuple[float, float] | None = None
    positive: bool = True
    scale_by_brain_median: bool = False

    @property
    def is_mre(self) -> bool:
        return self.folder == "mre"

    def unit_mix_up(self, *, too_high: bool = True) -> str:
        """The likely mix-up, for a message, when a map's values are far above (or, with
        ``too_high`` False, below) the plausible ones: Pa (MPa) for a map in kPa, percent
        for a ratio; values too high may also be an unscaled integer export."""
        if not too_high:
            return {"kPa": "in MPa (multiply by 1000)"}.get(
                self.unit, f"in another unit than {self.unit}")
        if self.unit == "1":
            return "in percent (divide by 100)"
        unit = "in Pa (divide by 1000)" if self.unit == "kPa" else (
            f"in another unit than {self.unit}")
        return f"{unit} or an unscaled integer export"


#: Plausible median of a brain's shear modulus maps (kPa): published brain MRE medians are
#: about 0.5-4 kPa (loss modulus lower), so the interval leaves a factor of 10 either side.
MODULUS_MEDIAN_KPA = (0.05, 50.0)

MODALITIES = {
    "stiffness": Modality("stiffness", "mre", "kPa", "stiffness map", n4=True,
                          white_matter_higher=True, median_range=MODULUS_MEDIAN_KPA),
    "damping_ratio": Modality("damping_ratio", "mre", "1", "damping-ratio map", n4=False,
                              white_matter_higher=False, valid_range=(0.0, 1.0)),
    "storage_modulus": Modality("storage_modulus", "mre", "kPa", "storage-modulus map",
                                n4=True, white_matter_higher=True,
                                median_range=MODULUS_MEDIAN_KPA),
    "loss_modulus": Modality("loss_modulus", "mre", "kPa", "loss-modulus map", n4=True,
                             white_matter_higher=True, median_range=MODULUS_MEDIAN_KPA),
    "T1w": Modality("T1w", "anat", "a.u.", "T1w image", n4=True, white_matter_higher=True,
                    scale_by_brain_median=True),
}
DEFAULT_MODALITIES = ("stiffness",)


def modality(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; the modalities are "
                         f"{', '.join(MODALITIES)}.") from None


def input_path(root: str | Path, label: str, name: str) -> Path:
    """``<root>/sub-<label>/<folder>/sub-<label>_<name>.nii.gz``."""
    kind = modality(name)
    return Path(root) / f"sub-{label}" / kind.folder / f"sub-{label}_{name}.nii.gz"


def mre_maps(names: Sequence[str]) -> tuple[str, ...]:
    """The MRE maps among ``names``, in order (the maps that are cleaned, corrected and
    warped as maps; the T1w is the registration reference)."""
    return tuple(name for name in names if modality(name).is_mre)


def grid_modality(names: Sequence[str]) -> str:
    """The image whose grid the subject's brain mask lives on: the first MRE map, or the
    T1w of a cohort without MRE maps."""
    maps = mre_maps(names)
    if maps:
        return maps[0]
    if "T1w" in names:
        return "T1w"
    raise ValueError(f"modalities {list(names)} name no image; give at least one of "
                     f"{', '.join(MODALITIES)}.")


def modalities_to_predict(channels: Sequence[str], training_grid: str) -> tuple[str, ...]:
    """The modalities a cohort is preprocessed for to apply a model that reads ``channels``
    (its cell's model.modalities): those maps, led by ``training_grid``, the
    :func:`grid_modality` of the training cohort.

    The grid map is the one a subject's brain mask lies on, that registers a subject
    without a T1w and that QC measures (against thresholds chosen on the training cohort).
    A model that reads only, e.g., the damping ratio of a cohort trained on ``[stiffness,
    damping_ratio]`` thus still needs each subject's stiffness map, or its subjects would be
    preprocessed around another image than the training subjects were.
    """
    chosen = (training_grid, *(name for name in channels if name != training_grid))
    if grid_modality(chosen) != training_grid:
        raise ValueError(f"a model reading {', '.join(channels)} cannot come from a cohort "
                         f"preprocessed around {training_grid}.")
    return chosen


def tag(names: Sequence[str]) -> str:
    """A name part for a set of modalities (``stiffness_damping_ratio``)."""
    return "_".join(names)
