"""Per-subject preprocessing on simulated subjects with a known pose and brain.

The simulator (brainage.simulate) gives each subject's true native -> MNI affine, brain
mask and slab coverage, so skull stripping (deepbet, for real), N4 and the ANTs affine are
checked against the truth, not just for running.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from brainage.inputs import InputError
from brainage.paths import Layout
from brainage.preprocess import (
    PreprocessError,
    RegistrationError,
    correct_bias,
    n4_inside_mask,
    prepare_template,
    register_to_template,
    strip_skull,
    template_to_native_matrix,
)
from brainage.preprocess.chain import run_subject
from brainage.preprocess.register import check_transform
from conftest import modules_after

# -- helpers ----------------------------------------------------------------------------------

def _subject_files(root: Path, participant_id: str) -> dict:
    return {"stiffness": root / participant_id / "mre" / f"{participant_id}_stiffness.nii.gz",
            "anat": root / participant_id / "anat" / f"{participant_id}_T1w.nii.gz",
            "truth_mask": root / "derivatives" / "simulation" / participant_id
            / f"{participant_id}_desc-truth_mask.nii.gz"}


def run_pipeline(out: Path, template: dict, stiffness, *, anat=None, method="deepbet", n4=True,
                 label="x", modalities=("stiffness",)) -> dict:
    """The subject's whole chain (brainage.preprocess.chain.run_subject, as the rules and
    the bundle's run command use it); returns its files and the QC metrics."""
    preprocess = {"skullstrip": method, "freesurfer_tool": "synthstrip", "n4": n4,
                  "deterministic": True, "threads": 1, "max_nan_fraction": 0.01}
    inputs = {"stiffness": str(stiffness), **({"anat": str(anat)} if anat else {})}
    files = run_subject(inputs, Layout(results=str(out)), label, preproc="preproc",
                        preprocess=preprocess, template_t1=template["t1"],
                        template_mask=template["mask"], modalities=list(modalities))
    return {**files, "qc": json.loads(Path(files["qc_json"]).read_text())}


def mean_displacement_mm(transform: str, truth_row, template_mask: str) -> float:
    """Mean distance (mm) between where the estimated and the true transforms send each
    template brain voxel in native space."""
    image = nib.load(template_mask)
    points = np.argwhere(np.asarray(image.dataobj) > 0).T
    world = image.affine[:3, :3] @ points + image.affine[:3, 3:]
    estimated = template_to_native_matrix(transform)
    true = np.linalg.inv(np.array(json.loads(truth_row["native_to_mni_affine"])))
    difference = (estimated[:3, :3] - true[:3, :3]) @ world + (estimated[:3, 3:] - true[:3, 3:])
    return float(np.linalg.norm(difference, axis=0).mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())


# -- processed subjects, shared by the tests of this file --------------------------------------

@pytest.fixture(scope="module")
def chosen(simulated_cohort):
    """A young subject with a short slab (no atrophy) and the oldest subject."""
    root, truth = simulated_cohort
    young = truth[truth["cortical_shrink_mm"] == 0].sort_values("coverage_fraction").iloc[0]
    old = truth.sort_values("age").iloc[-1]
    return root, young, old


@pytest.fixture(scope="module")
def processed(chosen, template_files, tmp_path_factory):
    """The young and the old subject through the T1w route (deepbet); the young one also
    without its T1w (stiffness-only route) and with skull stripping "none" (T1w head)."""
    root, young, old = chosen
    out = tmp_path_factory.mktemp("preprocessed")
    results = {}
    for key, row, with_anat, method in (("young", young, True, "deepbet"),
                                        ("old", old, True, "deepbet"),
                                        ("young_no_anat", young, False, "deepbet"),
                                        ("young_none", young, True, "none")):
        files = _subject_files(root, row["participant_id"])
        results[key] = run_pipeline(out / key, template_files, files["stiffness"],
                                    anat=files["anat"] if with_anat else None, method=method,
                                    label=row["participant_id"][len("sub-"):])
        results[key]["truth"] = row
        results[key]["files"] = files
    return results


def test_a_skull_stripping_job_does_not_import_scipy_ndimage():
    # what rule strip_skull's script imports before it runs a route: scipy.ndimage cost 0.25 s
    # of each such job, and deepbet or FreeSurfer on a T1w on the map's grid never calls it
    modules = modules_after(
        "import brainage.logs, brainage.modalities, brainage.preprocess.chain, "
        "brainage.preprocess.skullstrip, brainage.preprocess.interfaces, "
        "brainage.preprocess.masks")
    assert "brainage.preprocess.images" in modules and "scipy.ndimage" not in modules


def test_a_preprocessing_job_asks_for_the_memory_of_its_registration_reference(tmp_path):
    from brainage.preprocess.chain import JOB_BASE_MB, JOB_MB_PER_MILLION_VOXELS, job_memory_mb

    small, large = tmp_path / "map.nii.gz", tmp_path / "T1w.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), small)
    # a header that claims 448 x 448 x 320 voxels (0.5 mm): only the header is read
    header = nib.Nifti1Header()
    header.set_data_shape((448, 448, 320))
    header.set_data_dtype(np.uint8)
    large.write_bytes(header.binaryblock + b"\0" * 4)
    needed = JOB_BASE_MB + JOB_MB_PER_MILLION_VOXELS * 448 * 448 * 320 / 1e6  # 5,417 MB
    assert job_memory_mb(large, 2000) == 5500 > needed
    assert job_memory_mb(large, 8000) == 8000  # a larger request stands (SynthStrip's)
    assert job_memory_mb(small, 2000) == 2000
    # not written yet (a simulated cohort before its simulation) or not an image: the
    # request stands, and the job itself names the file
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    assert job_memory_mb(tmp_path / "missing.nii.gz", 2000) == 2000
    assert job_memory_mb(broken, 2000) == 2000
    assert job_memory_mb(None, 2000) == 2000


# -- template ----------------------------------------------------------------------------------


def test_nilearn_template_is_mni152_2mm(template_files):
    t1, mask = nib.load(template_files["t1"]), nib.load(template_files["mask"])
    assert t1.shape == mask.shape == (99, 117, 95)
    assert np.allclose(np.abs(np.diag(t1.affine)[:3]), 2.0)
    values = np.unique(np.asarray(mask.dataobj))
    assert set(values.tolist()) == {0, 1} and np.asarray(mask.dataobj).sum() > 200_000
    # NIfTI xform code 4 (MNI152): viewers know the coordinates (FSLeyes' atlases need it).
    for image in (t1, mask):
        assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 4


def test_user_template_file_is_used_and_checked(template_files, tmp_path):
    # An FSL-like 91 x 109 x 91 grid cut out of the nilearn template.
    t1, mask = nib.load(template_files["t1"]), nib.load(template_files["mask"])
    window = (slice(4, 95), slice(4, 113), slice(2, 93))
    affine = t1.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([4, 4, 2])
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj)[window], affine), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj)[window], affine), tmp_path / "m.nii.gz")
    info = prepare_template(tmp_path / "out_t1.nii.gz", tmp_path / "out_m.nii.gz", source="file",
                            t1=tmp_path / "t1.nii.gz", mask=tmp_path / "m.nii.gz")
    assert info["shape"] == [91, 109, 91]
    assert np.allclose(nib.load(tmp_path / "out_t1.nii.gz").affine, affine)
    # The same files given by another path write the same bytes: they key predict run's
    # step records, and a relative path after an absolute one redid every subject.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("t1.nii.gz", "m.nii.gz"):
        shutil.copy2(tmp_path / name, moved / name)
    prepare_template(tmp_path / "again_t1.nii.gz", tmp_path / "again_m.nii.gz", source="file",
                     t1=moved / "t1.nii.gz", mask=moved / "m.nii.gz")
    for first, again in (("out_t1", "again_t1"), ("out_m", "again_m")):
        assert (tmp_path / f"{first}.nii.gz").read_bytes() == \
            (tmp_path / f"{again}.nii.gz").read_bytes()
    # A user's template keeps its own sform code (FSL's MNI152 files say 4, MNI152), and
    # gets 5 ("another template") when it has none.
    # Without an sform, a qform naming a template space (FSL-made files can have only
    # that) gives the code: (sform code, qform code) -> expected.
    for (code, qform_code), expected in (((4, 4), 4), ((2, 2), 2), ((0, 1), 5), ((0, 4), 4)):
        image = nib.load(tmp_path / "t1.nii.gz")
        image.set_sform(image.affine if code else None, code=code)
        image.set_qform(affine, code=qform_code)  # the grid stays known without an sform
        nib.save(image, tmp_path / "coded.nii.gz")
        prepare_template(tmp_path / "o_t1.nii.gz", tmp_path / "o_m.nii.gz", source="file",
                         t1=tmp_path / "coded.nii.gz", mask=tmp_path / "m.nii.gz")
        for name in ("o_t1.nii.gz", "o_m.nii.gz"):
            header = nib.load(tmp_path / name).header
            assert int(header["sform_code"]) == int(header["qform_code"]) == expected, code

    # non-finite voxels of a user's files are background, not 3.4e38 and not brain
    t1_values = np.asarray(t1.dataobj, dtype=np.float32)[window].copy()
    mask_values = np.asarray(mask.dataobj, dtype=np.float32)[window].copy()
    t1_values[45, 54, 45], mask_values[0, 0, 0] = np.inf, np.inf
    nib.save(nib.Nifti1Image(t1_values, affine), tmp_path / "inf_t1.nii.gz")
    nib.save(nib.Nifti1Image(mask_values, affine), tmp_path / "inf_m.nii.gz")
    prepare_template(tmp_path / "i_t1.nii.gz", tmp_path / "i_m.nii.gz", source="file",
                     t1=tmp_path / "inf_t1.nii.gz", mask=tmp_path / "inf_m.nii.gz")
    assert nib.load(tmp_path / "i_t1.nii.gz").get_fdata()[45, 54, 45] == 0
    assert nib.load(tmp_path / "i_m.nii.gz").get_fdata()[0, 0, 0] == 0

    one_mm = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), one_mm), tmp_path / "t1mm.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), one_mm), tmp_path / "m1mm.nii.gz")
    with pytest.raises(InputError, match=r"template\.t1 .* voxels of \[1\.0, 1\.0, 1\.0\] mm"):
        prepare_template(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", source="file",
                         t1=tmp_path / "t1mm.nii.gz", mask=tmp_path / "m1mm.nii.gz")
    with pytest.raises(InputError, match=r"template\.t1 and/or template\.mask is not set"):
        prepare_template(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", source="file")


def test_template_record_reads_the_voxel_size_of_a_permuted_grid(tmp_path):
    # a 2 mm template stored with its axes permuted (y first): [0, 0] of its affine is 0
    from brainage.preprocess.template import template_record

    permuted = np.array([[0.0, -2.0, 0, 90], [2.0, 0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    for name in ("t1", "mask"):
        nib.save(nib.Nifti1Image(np.ones((6, 7, 8), np.uint8), permuted), tmp_path / f"{name}.nii.gz")
    record = template_record(tmp_path / "t1.nii.gz", tmp_path / "mask.nii.gz", source="file",
                             space="MNI152NLin2009aSym")
    assert record["resolution_mm"] == 2.0 and record["shape"] == [6, 7, 8]


# -- skull stripping ----------------------------------------------------------------------------

def test_deepbet_mask_matches_the_true_brain(processed):
    for key in ("young", "old"):
        subject = processed[key]
        mask = np.asarray(nib.load(subject["mask"]).dataobj) > 0
        truth = np.asarray(nib.load(subject["files"]["truth_mask"]).dataobj) > 0
        assert mask.shape == truth.shape
        assert dice(mask, truth) >= 0.9, key
        info = json.loads(Path(subject["reference_info"]).read_text())
        assert info["route"] == "deepbet" and info["reference_kind"] == "T1w_brain"


def test_without_anatomy_the_mask_is_the_map_support(processed, caplog):
    subject = processed["young_no_anat"]
    info = json.loads(Path(subject["reference_info"]).read_text())
    assert info["mask_source"] == "stiffness_support" and info["reference_kind"] == "stiffness"
    stiffness = nib.load(subject["files"]["stiffness"]).get_fdata()
    mask = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    support = np.isfinite(stiffness) & (stiffness != 0)
    assert mask[support].all()  # holes filled, nothing of the map dropped


def test_skullstrip_none_keeps_the_map_support_and_registers_the_head(processed):
    subject = processed["young_none"]
    info = json.loads(Path(subject["reference_info"]).read_text())
    assert (info["route"], info["reference_kind"]) == ("none", "T1w_head")
    stiffness = nib.load(subject["files"]["stiffness"]).get_fdata()
    mask = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    assert mask[stiffness > 0].all() and not mask[stiffness == 0].all()


def test_no_anatomy_route_is_logged(simulated_cohort, tmp_path, caplog):
    root, truth = simulated_cohort
    files = _subject_files(root, truth["participant_id"].iloc[0])
    with caplog.at_level(logging.INFO):
        strip_skull(files["stiffness"], tmp_path / "m.nii.gz", tmp_path / "r.nii.gz",
                    tmp_path / "i.json", method="deepbet", subject="a")
    assert "no anatomical image; brain mask = the stiffness map's support" in caplog.text


def test_a_t1w_cohort_subject_without_its_t1w_is_refused_not_masked_by_support(tmp_path):
    """Without an MRE map the brain cannot come from a map's support: the T1w grid image
    is a head, and its support would be taken for the brain."""
    head = np.zeros((12, 12, 12), np.float32)
    head[2:10, 2:10, 2:10] = 300.0
    nib.save(nib.Nifti1Image(head, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "sub-h_T1w.nii.gz")
    with pytest.raises(PreprocessError, match=r"subject sub-h: no T1w image given to strip.*"
                                              r"anat/sub-h_T1w\.nii\.gz"):
        strip_skull(tmp_path / "sub-h_T1w.nii.gz", tmp_path / "m.nii.gz", tmp_path / "r.nii.gz",
                    tmp_path / "i.json", method="none", subject="h", grid_modality="T1w")
    assert not (tmp_path / "m.nii.gz").exists()

def test_corrupt_input_names_the_file(tmp_path):
    broken = tmp_path / "sub-x_stiffness.nii.gz"
    broken.write_bytes(gzip.compress(b"not a nifti file at all"))
    with pytest.raises(InputError, match=r"stiffness map .*sub-x_stiffness\.nii\.gz is not a "
                                         r"readable NIfTI"):
        strip_skull(broken, tmp_path / "m.nii.gz", tmp_path / "r.nii.gz", tmp_path / "i.json",
                    method="none", subject="x")


@pytest.mark.slow
def test_deepbet_finding_no_brain_names_the_subject_and_file(tmp_path):
    """Real deepbet on a T1w with nothing in it but one bright voxel: deepbet's own
    error (an empty component list) comes back as ours, naming subject and file."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    stiffness = np.zeros((40, 48, 40), np.float32)
    stiffness[10:30, 12:36, 10:30] = 3.0
    t1 = np.zeros_like(stiffness)
    t1[20, 24, 20] = 1.0
    nib.save(nib.Nifti1Image(stiffness, affine), tmp_path / "sub-a_stiffness.nii.gz")
    nib.save(nib.Nifti1Image(t1, affine), tmp_path / "sub-a_T1w.nii.gz")
    with pytest.raises(PreprocessError, match=r"subject sub-a: skull stripping \(deepbet\) of "
                                              r".*sub-a_T1w\.nii\.gz failed: .*Check the image"):
        strip_skull(tmp_path / "sub-a_stiffness.nii.gz", tmp_path / "m.nii.gz",
                    tmp_path / "r.nii.gz", tmp_path / "i.json", anat=tmp_path / "sub-a_T1w.nii.gz",
                    method="deepbet", subject="a")
    assert not (tmp_path / "m.nii.gz").exists()


def test_t1w_stored_as_one_volume_of_a_4d_file_is_stripped(simulated_cohort, tmp_path,
                                                            monkeypatch):
    """A T1w of shape (X, Y, Z, 1) passes the input check (load_nifti_checked); deepbet
    writes its mask in that shape, which the route refused as a mask of the wrong shape."""
    root, truth = simulated_cohort
    files = _subject_files(root, truth["participant_id"].iloc[0])
    t1 = nib.load(files["anat"])
    # stored as DataLad stores it: the dataset's file a link into the annex
    annexed = tmp_path / ".git" / "annex" / "objects" / "SHA256E-s1--x.nii.gz"
    annexed.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj)[..., None], t1.affine), annexed)
    anat_4d = tmp_path / "sub-a_T1w.nii.gz"
    anat_4d.symlink_to(annexed)
    monkeypatch.chdir(tmp_path)  # the sidecar names the T1w whatever the working folder
    info = strip_skull(files["stiffness"], tmp_path / "m.nii.gz", tmp_path / "r.nii.gz",
                       tmp_path / "i.json", anat=anat_4d.name, method="deepbet", subject="a")
    assert info["route"] == "deepbet" and info["reference_kind"] == "T1w_brain"
    assert json.loads((tmp_path / "i.json").read_text())["anat"] == str(anat_4d)  # the link
    mask = np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj) > 0
    true_mask = np.asarray(nib.load(files["truth_mask"]).dataobj) > 0
    assert mask.shape == true_mask.shape and dice(mask, true_mask) >= 0.9
    assert nib.load(tmp_path / "r.nii.gz").shape == t1.shape


def test_empty_skull_strip_mask_is_an_error(simulated_cohort, tmp_path, monkeypatch):
    root, truth = simulated_cohort
    files = _subject_files(root, truth["participant_id"].iloc[0])
    from brainage.preprocess import skullstrip

    def empty_mask(route, tool, in_file, work, threads):
        image = nib.load(in_file)
        path = work / "mask.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), path)
        return path

    monkeypatch.setattr(skullstrip, "_run_mask_interface", empty_mask)
    with pytest.raises(PreprocessError, match=r"sub-a: skull stripping \(deepbet\) of .*"
                                              r"sub-\w+_T1w\.nii\.gz returned an empty brain mask"):
        strip_skull(files["stiffness"], tmp_path / "m.nii.gz", tmp_path / "r.nii.gz",
                    tmp_path / "i.json", anat=files["anat"], method="deepbet", subject="a")


def test_a_skull_stripping_tool_short_of_memory_is_not_called_a_bad_image(simulated_cohort,
                                                                          tmp_path, monkeypatch):
    """deepbet runs in the job's process: PyTorch's allocation failure was reported as a
    bad image ("Check the image"), and predict run advised dropping the subject."""
    root, truth = simulated_cohort
    files = _subject_files(root, truth["participant_id"].iloc[0])
    from brainage.preprocess import skullstrip

    def short_of_memory(route, tool, in_file, work, threads):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 56623104 bytes.")

    monkeypatch.setattr(skullstrip, "_run_mask_interface", short_of_memory)
    with pytest.raises(PreprocessError, match=r"sub-a: skull stripping \(deepbet\) of .* "
                                              r"failed: .*can't allocate memory.*The job ran out "
                                              r"of memory: the image is not at fault\. Raise "
                                              r"resources\.preprocess\.mem_mb") as raised:
        strip_skull(files["stiffness"], tmp_path / "m.nii.gz", tmp_path / "r.nii.gz",
                    tmp_path / "i.json", anat=files["anat"], method="deepbet", subject="a")
    assert "Check the image" not in str(raised.value)


@pytest.mark.parametrize("kept", ["head", "brain"])
def test_a_brain_mask_of_a_volume_no_brain_has_is_warned_of(simulated_cohort, tmp_path,
                                                            monkeypatch, caplog, kept):
    """A stripping that kept the whole head (38,700 ml in the review) left one INFO line;
    QC flagged it only where its Dice fell below qc.min_dice."""
    root, truth = simulated_cohort
    files = _subject_files(root, truth["participant_id"].iloc[0])
    from brainage.preprocess import skullstrip

    def tool_mask(route, tool, in_file, work, threads):
        image = nib.load(in_file)
        path = work / "mask.nii.gz"
        mask = (np.ones(image.shape) if kept == "head"
                else np.asarray(nib.load(files["truth_mask"]).dataobj) > 0)
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), image.affine), path)
        return path

    monkeypatch.setattr(skullstrip, "_run_mask_interface", tool_mask)
    with caplog.at_level(logging.WARNING):
        strip_skull(files["stiffness"], tmp_path / "m.nii.gz", tmp_path / "r.nii.gz",
                    tmp_path / "i.json", anat=files["anat"], method="deepbet", subject="a")
    warned = re.search(r"sub-a: the brain mask deepbet made of the T1w .*sub-\w+_T1w\.nii\.gz "
                       r"holds \d+ ml, where a brain with its CSF holds 600-3000 ml: it may "
                       r"keep the skull .* Look at .*m\.nii\.gz over the T1w", caplog.text)
    assert bool(warned) == (kept == "head"), caplog.text


@pytest.mark.parametrize("method", ["none", "deepbet"])
def test_infinite_t1w_voxels_are_background_of_the_reference(tmp_path, monkeypatch, method):
    """A NaN or inf T1w voxel is background (0) in the registration reference, as in the
    maps. nan_to_num made an inf 3.4e38: N4 kept it, and one voxel spanned the reference's
    whole intensity range (mutual information then sees one bin)."""
    from brainage.preprocess import skullstrip

    def head_mask(route, tool, in_file, work, threads):  # the deepbet route, without a net
        image = nib.load(in_file)
        path = work / "mask.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8),
                                 image.affine), path)
        return path

    if method == "deepbet":
        monkeypatch.setattr(skullstrip, "_run_mask_interface", head_mask)
    t1 = np.zeros((16, 16, 16), np.float32)
    t1[3:13, 3:13, 3:13] = 300.0
    t1[6:10, 6:10, 6:10] = 900.0
    t1[8, 8, 8], t1[7, 8, 8], t1[3, 3, 3] = np.inf, np.nan, -np.inf
    stiffness = np.where(t1 > 0, 2.5, 0).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(t1, affine), tmp_path / "sub-i_T1w.nii.gz")
    nib.save(nib.Nifti1Image(stiffness, affine), tmp_path / "sub-i_stiffness.nii.gz")
    strip_skull(tmp_path / "sub-i_stiffness.nii.gz", tmp_path / "m.nii.gz", tmp_path / "r.nii.gz",
                tmp_path / "i.json", anat=tmp_path / "sub-i_T1w.nii.gz", method=method,
                subject="i")
    reference = np.asarray(nib.load(tmp_path / "r.nii.gz").dataobj)
    assert np.isfinite(reference).all() and reference.max() == 900.0
    assert reference[8, 8, 8] == reference[7, 8, 8] == reference[3, 3, 3] == 0


# -- bias correction --------------------------------------------------------------------------

def _phantom():
    """Stiffness-like phantom on the 2 mm template grid: GM 2.6, WM 2.9, CSF 1.2 kPa."""
    from nilearn import datasets

    grey = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    white = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    brain_image = datasets.load_mni152_brain_mask(resolution=2)
    brain = brain_image.get_fdata() > 0.5
    tissue = np.clip(grey + white, 0, 1)
    rng = np.random.default_rng(0)
    clean = (2.6 * grey + 2.9 * white + 1.2 * (1 - tissue)) * (
        1 + 0.05 * rng.standard_normal(brain.shape))
    return np.where(brain, clean, 0).astype(np.float32), brain, brain_image.affine


@pytest.mark.slow
def test_n4_reduces_the_bias_spread_inside_the_brain():
    clean, brain, affine = _phantom()
    grid = np.indices(clean.shape).astype(np.float32)
    unit = [(grid[a] - (clean.shape[a] - 1) / 2) / clean.shape[a] for a in range(3)]
    field = np.exp(0.3 * unit[0] - 0.25 * unit[1] + 0.6 * unit[2] ** 2)  # about +-15 %
    biased = clean * field

    def spread(image):
        return np.log(image[brain] / clean[brain]).std()

    corrected = n4_inside_mask(biased, brain, affine)
    assert spread(corrected) < 0.6 * spread(biased)
    assert np.all(corrected[~brain] == 0)
    assert corrected[brain].mean() == pytest.approx(biased[brain].mean(), rel=1e-4)  # kPa kept


def test_n4_false_passes_the_map_through(processed, tmp_path):
    subject = processed["young"]
    out = tmp_path / "s.nii.gz"
    correct_bias({"stiffness": subject["files"]["stiffness"]}, subject["mask"],
                 subject["reference"], subject["reference_info"], {"stiffness": out},
                 tmp_path / "r.nii.gz", n4=False, subject="y")
    raw = nib.load(subject["files"]["stiffness"]).get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    result = nib.load(out).get_fdata(dtype=np.float32)
    expected = np.where(mask & (raw > 0), raw, 0)
    assert np.array_equal(result, expected)
    assert np.array_equal(nib.load(tmp_path / "r.nii.gz").get_fdata(),
                          nib.load(subject["reference"]).get_fdata())


def test_nan_voxels_become_background_with_a_count(processed, tmp_path, caplog):
    subject = processed["young"]
    image = nib.load(subject["files"]["stiffness"])
    data = image.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    inside = np.argwhere(ndimage.binary_erosion((data > 0) & mask, iterations=2))[:7]
    data[tuple(inside.T)] = np.nan  # holes in the map's data
    data[0, 0, 0] = np.inf
    noisy = tmp_path / "sub-y_stiffness.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), noisy)
    with caplog.at_level(logging.INFO):
        correct_bias({"stiffness": noisy}, subject["mask"], subject["reference"],
                     subject["reference_info"], {"stiffness": tmp_path / "s.nii.gz"},
                     tmp_path / "r.nii.gz", n4=False, subject="y")
    assert "8 NaN/inf voxels set to background (7 inside the brain" in caplog.text
    result = nib.load(tmp_path / "s.nii.gz").get_fdata()
    assert np.isfinite(result).all() and np.all(result[tuple(inside.T)] == 0)


def test_nan_heavy_map_fails_with_its_name(processed, tmp_path):
    subject = processed["young"]
    image = nib.load(subject["files"]["stiffness"])
    data = image.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    rows = np.argwhere(ndimage.binary_erosion((data > 0) & mask, iterations=2))
    data[tuple(rows[:: 10].T)] = np.nan  # holes in the map's data
    share = f"{len(rows[:: 10]) / mask.sum():.1%}"
    assert float(share[:-1]) > 1
    noisy = tmp_path / "sub-y_stiffness.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), noisy)
    with pytest.raises(InputError, match=r"sub-y: stiffness map .*sub-y_stiffness\.nii\.gz has "
                                         rf"{len(rows[:: 10])} NaN/inf voxels inside the brain, "
                                         rf"enclosed by the map's data \({share} .*"
                                         r"preprocess\.max_nan_fraction=0\.01"):
        correct_bias({"stiffness": noisy}, subject["mask"], subject["reference"],
                     subject["reference_info"], {"stiffness": tmp_path / "s.nii.gz"},
                     tmp_path / "r.nii.gz", subject="y")


def test_a_nan_background_gives_what_a_zero_background_gives(processed, tmp_path):
    """A map exported with NaN, not 0, around its data: every subject with a T1w failed,
    its brain mask reaching beyond the map's data."""
    subject = processed["young"]
    image = nib.load(subject["files"]["stiffness"])
    data = image.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    assert np.count_nonzero(mask & (data == 0)) > 0.01 * mask.sum()  # the case at hand
    outputs = {}
    for background in (0.0, np.nan):
        path = tmp_path / f"{background}" / "sub-y_stiffness.nii.gz"
        path.parent.mkdir()
        nib.save(nib.Nifti1Image(np.where(data == 0, background, data).astype(np.float32),
                                 image.affine), path)
        outputs[background] = path.parent / "s.nii.gz"
        correct_bias({"stiffness": path}, subject["mask"], subject["reference"],
                     subject["reference_info"], {"stiffness": outputs[background]},
                     path.parent / "r.nii.gz", n4=False, subject="y")
    assert np.array_equal(nib.load(outputs[0.0]).get_fdata(), nib.load(outputs[np.nan]).get_fdata())


def test_a_damaged_reference_is_told_to_be_made_again(processed, tmp_path):
    """The skull-stripped reference is strip_skull's output: cut short (a full disk), it was
    told to be re-exported as .nii.gz, a raw scan's remedy."""
    import gzip

    subject = processed["young"]
    raw = gzip.decompress(Path(subject["reference"]).read_bytes())
    damaged = tmp_path / "sub-y_desc-brain_reference.nii.gz"
    damaged.write_bytes(gzip.compress(raw[:len(raw) // 2]))
    with pytest.raises(InputError, match=r"sub-y: reference image .* not a readable NIfTI file "
                                         r"\(.*\)\. The pipeline made this file: delete it"):
        correct_bias({"stiffness": subject["files"]["stiffness"]}, subject["mask"], damaged,
                     subject["reference_info"], {"stiffness": tmp_path / "s.nii.gz"},
                     tmp_path / "r.nii.gz", subject="y")


def test_mask_that_misses_the_map_is_an_error(processed, tmp_path):
    subject = processed["young"]
    mask_image = nib.load(subject["mask"])
    stiffness = nib.load(subject["files"]["stiffness"]).get_fdata()
    elsewhere = (stiffness == 0).astype(np.uint8)  # only where the map has no data
    nib.save(nib.Nifti1Image(elsewhere, mask_image.affine), tmp_path / "m.nii.gz")
    with pytest.raises(PreprocessError, match=r"sub-y: no positive voxel of .*_stiffness.nii.gz "
                                              r"lies inside the brain mask"):
        correct_bias({"stiffness": subject["files"]["stiffness"]}, tmp_path / "m.nii.gz",
                     subject["reference"], subject["reference_info"],
                     {"stiffness": tmp_path / "s.nii.gz"}, tmp_path / "r.nii.gz", subject="y")


# -- registration --------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["young", "old", "young_no_anat", "young_none"])
def test_registration_recovers_the_pose(processed, template_files, key):
    subject = processed[key]
    displacement = mean_displacement_mm(subject["transform"], subject["truth"],
                                        template_files["mask"])
    assert displacement < 1.0, f"{key}: mean displacement {displacement:.2f} mm"


def test_registered_map_is_zero_outside_mask_and_slab(processed, template_files):
    subject = processed["young"]
    registered = nib.load(subject["registered_stiffness"]).get_fdata()
    warped_mask = np.asarray(nib.load(subject["registered_mask"]).dataobj) > 0
    assert registered.shape == (99, 117, 95)
    assert np.all(registered[~warped_mask] == 0)
    # Template voxels whose native position lies more than half a slice beyond the slab
    # (where linear interpolation of the map's support falls below 0.5): exactly 0.
    truth = subject["truth"]
    native = nib.load(subject["files"]["stiffness"])
    template = nib.load(template_files["mask"])
    index = np.indices(registered.shape).reshape(3, -1)
    world = template.affine[:3, :3] @ index + template.affine[:3, 3:]
    native_matrix = np.linalg.inv(native.affine) @ template_to_native_matrix(subject["transform"])
    k = (native_matrix[2, :3] @ world + native_matrix[2, 3])
    margin = 0.5 + 1e-3  # slices; the thousandth absorbs float32 rounding of the transform
    beyond = (k < truth["slab_first_slice"] - margin) | (k > truth["slab_last_slice"] + margin)
    assert beyond.any()
    assert np.all(registered.reshape(-1)[beyond] == 0)
    # Inside the slab the map keeps its values (kPa), no smearing towards 0 at the edge.
    inside = registered[registered != 0]
    assert inside.min() > 0.2 and 2.0 < inside.mean() < 3.5


def test_a_slab_stored_on_its_own_grid_keeps_the_whole_brain_mask(processed, template_files,
                                                                   tmp_path):
    """MRE maps usually come on the slab's own grid. The registered brain mask was the
    T1w's cut to the map's grid, so QC's Dice measured the slab (0.84 < 0.85 for a slab
    that passes coverage) and `predict run` left the subject out; the same voxels stored
    zero-padded on the T1w's grid passed."""
    subject = processed["young"]
    truth = subject["truth"]
    first, last = int(truth["slab_first_slice"]), int(truth["slab_last_slice"])
    padded = nib.load(subject["files"]["stiffness"])
    data = np.asarray(padded.dataobj)
    assert not data[..., :first].any() and not data[..., last + 1:].any()
    assert last + 1 - first < data.shape[2]  # a real slab, cut to a smaller grid below
    affine = padded.affine.copy()
    affine[:3, 3] += affine[:3, 2] * first
    cropped = tmp_path / "sub-x_stiffness.nii.gz"
    nib.save(nib.Nifti1Image(data[..., first:last + 1], affine), cropped)
    result = run_pipeline(tmp_path / "out", template_files, cropped,
                          anat=subject["files"]["anat"], label="x",
                          modalities=("stiffness", "T1w"))
    assert abs(result["qc"]["dice"] - subject["qc"]["dice"]) < 0.01, result["qc"]
    assert result["qc"]["dice"] > 0.9
    assert result["qc"]["coverage"] == pytest.approx(subject["qc"]["coverage"], abs=0.005)
    # the same voxels in template space (N4 fits its field over the other grid's extent)
    for key in ("registered_mask", "registered_stiffness"):
        ours = np.asarray(nib.load(result[key]).dataobj)
        theirs = np.asarray(nib.load(subject[key]).dataobj)
        assert np.count_nonzero((ours != 0) != (theirs != 0)) <= 0.001 * np.count_nonzero(
            theirs), key
    both = (ours != 0) & (theirs != 0)
    assert np.corrcoef(ours[both], theirs[both])[0, 1] > 0.97
    # the model's inputs keep the map grid's mask: the T1w channel ends with the slab, as
    # for every subject preprocessed before (encoders were trained on such channels)
    t1w = np.asarray(nib.load(result["registered_T1w"]).dataobj)
    mask = np.asarray(nib.load(result["registered_mask"]).dataobj) > 0
    assert np.all(t1w[~mask] == 0)
    assert np.count_nonzero(t1w) < 0.9 * mask.sum()


def test_registered_images_are_labelled_template_space_native_ones_scanner(processed):
    subject = processed["young"]
    for key in ("registered_stiffness", "registered_mask"):
        header = nib.load(subject[key]).header
        assert int(header["sform_code"]) == int(header["qform_code"]) == 4, key
    for path in (subject["mask"], subject["reference"]):
        assert int(nib.load(path).header["sform_code"]) == 1, path


def test_registration_outputs_and_qc(processed):
    subject = processed["young"]
    assert Path(subject["transform"]).stat().st_size > 0
    assert Path(subject["qc_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    qc = json.loads(Path(subject["qc_json"]).read_text())
    assert qc["participant_id"] == subject["truth"]["participant_id"]
    assert qc["dice"] > 0.9 and qc["correlation"] > 0.3 and qc["reference_correlation"] > 0.8


def test_coverage_is_within_two_percent_of_the_truth(processed):
    # Young subject: its brain is the template's, so "share of the template brain covered"
    # is the slab coverage. (Simulated atrophy leaves a zero-stiffness shell around older
    # brains, which the template brain counts as uncovered.)
    subject = processed["young"]
    truth = subject["truth"]["coverage_fraction"]
    assert truth < 0.95  # a real slab, not full coverage
    assert abs(subject["qc"]["coverage"] - truth) < 0.02
    older = processed["old"]
    assert older["qc"]["coverage"] < older["truth"]["coverage_fraction"] + 0.02


def test_deterministic_registration_is_bit_identical(processed, template_files, tmp_path):
    subject = processed["young"]
    outputs = [tmp_path / name for name in ("s.nii.gz", "m.nii.gz", "x.mat", "r.nii.gz")]
    register_to_template({"stiffness": subject["corrected_stiffness"]}, subject["mask"],
                         subject["corrected_reference"], subject["reference_info"],
                         template_files["t1"], template_files["mask"],
                         {"stiffness": outputs[0]}, *outputs[1:], deterministic=True,
                         subject="y")
    assert outputs[2].read_bytes() == Path(subject["transform"]).read_bytes()
    assert np.array_equal(nib.load(outputs[0]).get_fdata(),
                          nib.load(subject["registered_stiffness"]).get_fdata())


@pytest.mark.parametrize("release", ["0.6.1", "0.6.2"])
def test_the_registration_seed_reaches_ants_of_either_release(monkeypatch, release):
    """ANTsPy up to 0.6.1 takes ``random_seed`` and has no ``ants.config``; 0.6.2 reads the
    seed from ``ants.config`` and swallows ``random_seed``. ``import ants.config`` came
    first, so with the older releases every registration died of a missing module.
    A stand-in ``ants`` module: the installed ANTsPy is one release only."""
    import sys
    import types

    from brainage.preprocess.register import ants_random_seed

    ants = types.ModuleType("ants")
    if release == "0.6.1":
        ants.registration = lambda fixed, moving, random_seed=None, **kwargs: None
        monkeypatch.setitem(sys.modules, "ants.config", None)  # import raises, as there
    else:
        ants.registration = lambda fixed, moving, **kwargs: None
        ants.config = types.ModuleType("ants.config")
        ants.config._random_seed = "ANTs' own"
        monkeypatch.setitem(sys.modules, "ants.config", ants.config)
    monkeypatch.setitem(sys.modules, "ants", ants)
    with ants_random_seed(7) as seed_argument:
        if release == "0.6.1":
            assert seed_argument == {"random_seed": 7}
        else:
            assert seed_argument == {} and ants.config._random_seed == 7
    if release == "0.6.2":
        assert ants.config._random_seed == "ANTs' own"


def test_failed_registration_names_the_subject(processed, template_files, tmp_path, monkeypatch):
    import ants

    def failing(*args, random_seed=None, **kwargs):  # as ANTsPy up to 0.6.1 and later
        raise RuntimeError("Registration failed with error code 1")

    monkeypatch.setattr(ants, "registration", failing)
    subject = processed["young"]
    outputs = [tmp_path / name for name in ("s.nii.gz", "m.nii.gz", "x.mat", "r.nii.gz")]
    with pytest.raises(RegistrationError, match=r"sub-y: ANTs registration of .* failed"):
        register_to_template({"stiffness": subject["corrected_stiffness"]}, subject["mask"],
                             subject["corrected_reference"], subject["reference_info"],
                             template_files["t1"], template_files["mask"],
                             {"stiffness": outputs[0]}, *outputs[1:], subject="y")
    assert not any(path.exists() for path in outputs)


def test_implausible_registration_names_the_subject_and_its_files(processed, template_files,
                                                                    tmp_path, monkeypatch):
    """The refusal said "look at the reference image and the brain mask of this subject"
    without naming either file."""
    from brainage.preprocess import register

    monkeypatch.setattr(register, "template_to_native_matrix",
                        lambda transform: np.diag([1.0, 1.0, 0.3, 1.0]))
    subject = processed["young"]
    outputs = [tmp_path / name for name in ("s.nii.gz", "m.nii.gz", "x.mat", "r.nii.gz")]
    with pytest.raises(RegistrationError, match=r"^subject sub-y \(reference .*_reference\.nii\.gz, "
                                                r"brain mask .*_mask\.nii\.gz\): registration "
                                                r"failed: the affine scales"):
        register_to_template({"stiffness": subject["corrected_stiffness"]}, subject["mask"],
                             subject["corrected_reference"], subject["reference_info"],
                             template_files["t1"], template_files["mask"],
                             {"stiffness": outputs[0]}, *outputs[1:], subject="y")
    assert not any(path.exists() for path in outputs)


def test_implausible_transform_is_a_failed_registration():
    squashed = np.diag([1.0, 1.0, 0.3, 1.0])
    with pytest.raises(RegistrationError, match=r"sub-z: registration failed: the affine scales"):
        check_transform(squashed, what="subject sub-z")
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(RegistrationError, match="no reflection"):
        check_transform(mirrored, what="subject sub-z")
    with pytest.raises(RegistrationError, match="non-finite"):
        check_transform(np.full((4, 4), np.nan), what="subject sub-z")
    check_transform(np.diag([1.1, 0.95, 1.0, 1.0]), what="subject sub-z")
    # stretched as well as squashed (only the squash was checked, so a check of the smallest
    # scale alone passed), and by the singular values, not the diagonal: a 60° rotation has
    # diagonal 0.5, 0.5, 1 but scales nothing
    with pytest.raises(RegistrationError, match=r"the affine scales the axes by \[2\.0, 1\.0, 1\.0\]"):
        check_transform(np.diag([1.0, 2.0, 1.0, 1.0]), what="subject sub-z")
    cos, sin = np.cos(np.pi / 3), np.sin(np.pi / 3)
    rotation = np.array([[cos, -sin, 0, 5], [sin, cos, 0, -3], [0, 0, 1, 2], [0, 0, 0, 1]])
    check_transform(rotation, what="subject sub-z")
    sheared = np.eye(4)
    sheared[0, 1] = 1.5  # diagonal all 1, singular values about 2.0 and 0.5
    with pytest.raises(RegistrationError, match="the affine scales"):
        check_transform(sheared, what="subject sub-z")



@pytest.mark.parametrize(("broken_input", "content", "error"), [
    ("damping_ratio", "garbage", r"^subject sub-q1: registered damping_ratio .*"
                                 r"damping_ratio\.nii\.gz is not a readable .* The pipeline "
                                 r"made this file: delete it"),  # not "re-export" a derivative
    # on another grid: an IndexError from NumPy named no file
    ("damping_ratio", "other grid", r"^subject sub-q1: registered damping_ratio .*"
                                    r"damping_ratio\.nii\.gz \(shape \(10, 10, 10\)\) and "
                                    r"template .* are not on the same voxel grid"),
    ("mask", "other grid", r"^subject sub-q1: warped brain mask .*mask\.nii\.gz \(shape "
                           r"\(10, 10, 10\)\) and template .* not on the same voxel grid"),
])
def test_qc_of_a_broken_input_names_the_subject_and_the_file(tmp_path, broken_input, content,
                                                             error):
    """compute_qc reads every registered channel; a broken one is named with its subject
    (the message said "damping_ratio: registered damping_ratio <path>"), and so is an
    input on another grid than the template's."""
    from brainage.qc import compute_qc

    shape, affine = (12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.zeros(shape, dtype=np.uint8)
    brain[3:9, 3:9, 3:9] = 1
    volumes = {"stiffness": brain * 2.5, "mask": brain, "reference": brain * 100.0,
               "t1": np.arange(np.prod(shape), dtype=np.float32).reshape(shape),
               "template_mask": brain}
    for key, data in volumes.items():
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), tmp_path / f"{key}.nii.gz")
    (tmp_path / "info.json").write_text(json.dumps({"reference_kind": "stiffness",
                                                    "route": "none"}))
    nib.save(nib.Nifti1Image(brain * 0.3, affine), tmp_path / "damping_ratio.nii.gz")
    broken = tmp_path / f"{broken_input}.nii.gz"
    if content == "garbage":
        broken.write_bytes(b"not an image")
    else:
        nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), affine), broken)
    with pytest.raises(InputError, match=error):
        compute_qc(tmp_path / "stiffness.nii.gz", tmp_path / "mask.nii.gz",
                   tmp_path / "reference.nii.gz", tmp_path / "info.json", tmp_path / "t1.nii.gz",
                   tmp_path / "template_mask.nii.gz", tmp_path / "qc.json", tmp_path / "qc.png",
                   subject="q1", maps={"stiffness": tmp_path / "stiffness.nii.gz",
                                       "damping_ratio": tmp_path / "damping_ratio.nii.gz"})


def test_qc_correlates_a_map_whose_white_matter_is_higher_not_the_damping_ratio(tmp_path):
    """QC's correlation with the template T1 assumes white matter higher than grey, as in
    a T1w. With the damping ratio as the grid map (first in dataset.modalities), whose
    contrast is another, every well registered subject failed it (r about 0); the
    correlation is measured on the subject's first modulus instead, and the JSON says
    which. A subject with the damping ratio alone records it without being judged on it."""
    from brainage.qc import compute_qc

    shape, affine = (12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    t1 = rng.uniform(50, 150, shape).astype(np.float32)
    brain = np.zeros(shape, np.uint8)
    brain[2:10, 2:10, 2:10] = 1
    stiffness = brain * (t1 / 40)  # follows the T1: a good registration
    damping = brain * (0.5 - t1 / 1000)  # the opposite contrast, as real damping ratios can
    files = {"stiffness": stiffness, "damping_ratio": damping, "mask": brain,
             "reference": brain * t1, "t1": t1, "template_mask": brain}
    for key, data in files.items():
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine),
                 tmp_path / f"{key}.nii.gz")
    (tmp_path / "info.json").write_text(json.dumps({"reference_kind": "T1w_brain",
                                                    "route": "deepbet"}))

    def qc(maps):
        return compute_qc(tmp_path / "damping_ratio.nii.gz", tmp_path / "mask.nii.gz",
                          tmp_path / "reference.nii.gz", tmp_path / "info.json",
                          tmp_path / "t1.nii.gz", tmp_path / "template_mask.nii.gz",
                          tmp_path / "qc.json", tmp_path / "qc.png", subject="q1",
                          grid_modality="damping_ratio",
                          maps={name: tmp_path / f"{name}.nii.gz" for name in maps})

    both = qc(["damping_ratio", "stiffness"])
    assert both["correlation_map"] == "stiffness" and both["correlation"] > 0.99
    alone = qc(["damping_ratio"])
    assert alone["correlation_map"] == "damping_ratio" and alone["correlation"] < -0.99
    assert both["coverage"] == alone["coverage"] and both["dice"] == alone["dice"]
    # measured on the damping ratio alone (a damping-ratio model's cohort is preprocessed
    # with no modulus), it is recorded but not judged: the subject passes on Dice and
    # coverage, in training (tabulate_qc) as in prediction (apply.read_qc)
    from brainage.qc import qc_failures, thresholds

    minimums = thresholds({"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7})
    assert qc_failures(alone, minimums) == []
    assert qc_failures({**both, "correlation": 0.1}, minimums) == ["correlation 0.100 < 0.3"]
    older = {key: value for key, value in alone.items() if key != "correlation_map"}
    assert qc_failures(older, minimums) == [f"correlation {alone['correlation']:.3f} < 0.3"]


@pytest.mark.parametrize("kind", ["T1w_brain", "stiffness_brain"])
def test_a_registered_t1w_unlike_the_template_is_warned_of(tmp_path, caplog, kind):
    """Heads tilted 35-40 degrees were misregistered by 20-40 mm and passed Dice,
    correlation and coverage; the registered T1w's correlation with the template T1
    (0.33-0.42 there, 0.81-0.95 in the demo) was recorded and never read."""
    from brainage.qc import compute_qc

    shape, affine = (12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    t1 = rng.uniform(50, 150, shape).astype(np.float32)
    brain = np.zeros(shape, np.uint8)
    brain[2:10, 2:10, 2:10] = 1
    for name, data in {"stiffness": brain * (t1 / 40), "mask": brain, "t1": t1,
                       "template_mask": brain, "good": brain * t1,
                       "moved": brain * np.roll(t1, 3, axis=0)}.items():
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine),
                 tmp_path / f"{name}.nii.gz")
    (tmp_path / "info.json").write_text(json.dumps({"reference_kind": kind, "route": "deepbet"}))
    for reference in ("good", "moved"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="brainage.qc"):
            result = compute_qc(tmp_path / "stiffness.nii.gz", tmp_path / "mask.nii.gz",
                                tmp_path / f"{reference}.nii.gz", tmp_path / "info.json",
                                tmp_path / "t1.nii.gz", tmp_path / "template_mask.nii.gz",
                                tmp_path / "qc.json", tmp_path / "qc.png", subject="q1")
        warned = re.search(r"sub-q1.*: the registered T1w correlates -?0\.\d\d with the "
                           r"template T1 .* its registration has likely failed .* Look at "
                           r".*moved\.nii\.gz over the template T1, and at .*qc\.png",
                           caplog.text)
        expected = reference == "moved" and kind == "T1w_brain"
        assert bool(warned) == expected, (reference, result["reference_correlation"],
                                          caplog.text)


def _qc_figure_views(tmp_path: Path, monkeypatch, reorder) -> list[np.ndarray]:
    """The images and outlines compute_qc draws for one asymmetric subject whose template
    grid is stored in the voxel order ``reorder`` gives (a function of array and affine)."""
    import matplotlib.axes

    from brainage.qc import compute_qc

    rng = np.random.default_rng(3)
    shape, affine = (14, 16, 12), np.array([[2.0, 0, 0, -13], [0, 2.0, 0, -17],
                                            [0, 0, 2.0, -9], [0, 0, 0, 1]])
    brain = np.zeros(shape, dtype=np.float32)
    brain[2:9, 4:14, 3:11] = 1  # off-centre in every axis
    volumes = {"stiffness": brain * rng.uniform(2, 4, shape), "mask": brain,
               "reference": brain * 100.0, "t1": rng.uniform(0, 1, shape),
               "template_mask": brain}
    folder = tmp_path / reorder.__name__
    folder.mkdir()
    for key, data in volumes.items():
        stored, stored_affine = reorder(np.asarray(data, np.float32), affine)
        nib.save(nib.Nifti1Image(stored, stored_affine), folder / f"{key}.nii.gz")
    (folder / "info.json").write_text(json.dumps({"reference_kind": "stiffness",
                                                  "route": "none"}))
    drawn = []
    original_imshow, original_contour = matplotlib.axes.Axes.imshow, matplotlib.axes.Axes.contour

    def imshow(self, values, *args, **kwargs):
        drawn.append(np.ma.filled(np.ma.asarray(values, dtype=float), 0.0))
        return original_imshow(self, values, *args, **kwargs)

    def contour(self, values, *args, **kwargs):
        drawn.append(np.asarray(values, dtype=float))
        return original_contour(self, values, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", imshow)
    monkeypatch.setattr(matplotlib.axes.Axes, "contour", contour)
    compute_qc(folder / "stiffness.nii.gz", folder / "mask.nii.gz", folder / "reference.nii.gz",
               folder / "info.json", folder / "t1.nii.gz", folder / "template_mask.nii.gz",
               folder / "qc.json", folder / "qc.png", subject="o1")
    monkeypatch.undo()
    return drawn


def _ras(data, affine):
    return data, affine


def _las(data, affine):  # FSL's MNI152_T1_2mm: x runs right to left
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    return data[::-1].copy(), affine @ flip


def _lps(data, affine):
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    flip[1, 1], flip[1, 3] = -1, data.shape[1] - 1
    return data[::-1, ::-1].copy(), affine @ flip


def _asr(data, affine):  # voxel axes stored as (y, z, x)
    return np.ascontiguousarray(data.transpose(1, 2, 0)), affine[:, [1, 2, 0, 3]]


@pytest.mark.parametrize("reorder", [_las, _lps, _asr])
def test_qc_figure_shows_the_same_views_whatever_the_templates_voxel_order(
        tmp_path, monkeypatch, reorder):
    """The subject QC figure sliced the voxel arrays as if they were RAS: with a template
    stored LAS (FSL's MNI152 2 mm, allowed by template.source: file) the coronal and axial
    views were mirrored left-right, with LPS also front-back, and with permuted axes the
    panels showed the wrong planes under the sagittal/coronal/axial titles."""
    expected = _qc_figure_views(tmp_path, monkeypatch, _ras)
    drawn = _qc_figure_views(tmp_path, monkeypatch, reorder)
    assert len(drawn) == len(expected) == 9  # three panels: T1, map, outline
    for index, (got, want) in enumerate(zip(drawn, expected)):
        assert got.shape == want.shape, index
        np.testing.assert_array_equal(got, want, err_msg=f"drawn array {index}")


@pytest.mark.parametrize("modalities, grid", [(("T1w",), "T1w image"),
                                              (("damping_ratio",), "damping-ratio map")])
def test_native_mask_sidecar_names_the_grid_it_lives_on(tmp_path, modalities, grid):
    """The mask lives on the grid map's grid: a T1w cohort's sidecar said "stiffness map"."""
    from brainage.preprocess.chain import run_step, subject_files

    head = np.zeros((16, 16, 16), dtype=np.float32)
    head[4:12, 4:12, 4:12] = 0.3
    inputs = {}
    for name in (*modalities, "anat"):
        inputs[name] = str(tmp_path / f"sub-g1_{name}.nii.gz")
        nib.save(nib.Nifti1Image(head, np.diag([2.0, 2.0, 2.0, 1.0])), inputs[name])
    inputs.pop("T1w", None)
    files = subject_files(Layout(results=str(tmp_path / "out")), "g1", "preproc", modalities)
    run_step("strip_skull", files, inputs, template_t1="", template_mask="", subject="g1",
             options={"method": "none", "freesurfer_tool": "synthstrip", "threads": 1},
             modalities=modalities)
    sidecar = json.loads(Path(files["mask_json"]).read_text())
    assert sidecar == {"Type": "Brain", "Description": f"brain mask on the {grid}'s native grid"}

# -- several maps per subject (dataset.modalities) -------------------------------------------

def _with_damping(tmp_path: Path, files: dict, label: str, damping) -> Path:
    """A dataset with one subject: the simulated stiffness and T1w, and a damping-ratio map
    computed from the stiffness by ``damping`` (kPa -> ratio), NaN where it is NaN."""
    root = tmp_path / "dataset"
    for folder in ("mre", "anat"):
        (root / f"sub-{label}" / folder).mkdir(parents=True)
    stiffness = nib.load(files["stiffness"])
    data = stiffness.get_fdata(dtype=np.float32)
    nib.save(stiffness, root / f"sub-{label}" / "mre" / f"sub-{label}_stiffness.nii.gz")
    nib.save(nib.load(files["anat"]), root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")
    ratio = np.where(data > 0, damping(data), 0).astype(np.float32)
    nib.save(nib.Nifti1Image(ratio, stiffness.affine),
             root / f"sub-{label}" / "mre" / f"sub-{label}_damping_ratio.nii.gz")
    return root


@pytest.mark.slow
def test_maps_of_a_subject_share_one_transform(chosen, template_files, tmp_path):
    """Damping ratio = 0.05 + 0.04 x stiffness voxel by voxel: after registration the
    relation still holds wherever the maps have data, which it can only if both maps were
    carried by the same transform; the T1w channel is the reference inside the brain."""
    from brainage.inputs import subject_inputs

    root, young, _ = chosen
    label = "d1"
    dataset = _with_damping(tmp_path, _subject_files(root, young["participant_id"]), label,
                            lambda kpa: 0.05 + 0.04 * kpa)
    modalities = ("stiffness", "damping_ratio", "T1w")
    preprocess = {"skullstrip": "deepbet", "freesurfer_tool": "synthstrip", "n4": False,
                  "deterministic": True, "threads": 1, "max_nan_fraction": 0.01}
    files = run_subject(subject_inputs(dataset, label, modalities),
                        Layout(results=str(tmp_path / "out")), label, preproc="preproc",
                        preprocess=preprocess, template_t1=template_files["t1"],
                        template_mask=template_files["mask"], modalities=modalities)
    stiffness = nib.load(files["registered_stiffness"]).get_fdata()
    damping = nib.load(files["registered_damping_ratio"]).get_fdata()
    both = stiffness > 0
    assert both.sum() > 10_000 and np.array_equal(both, damping > 0)
    assert np.abs(damping[both] - (0.05 + 0.04 * stiffness[both])).max() < 1e-5
    assert "desc-clean_damping_ratio" in files["corrected_damping_ratio"]

    t1w = nib.load(files["registered_T1w"]).get_fdata()
    warped_mask = np.asarray(nib.load(files["registered_mask"]).dataobj) > 0
    reference = nib.load(files["registered_reference"]).get_fdata()
    assert np.all(t1w[~warped_mask] == 0) and t1w[warped_mask].mean() > 0
    assert np.allclose(t1w[warped_mask], np.maximum(reference[warped_mask], 0))
    qc = json.loads(Path(files["qc_json"]).read_text())
    assert set(qc["maps"]) == set(modalities)
    assert 0 < qc["maps"]["damping_ratio"]["median"] < 1


def test_damping_ratio_above_one_names_subject_and_file(processed, tmp_path):
    subject = processed["young"]
    dataset = _with_damping(tmp_path, subject["files"], "d2", lambda kpa: kpa / 2.0)
    maps = {name: dataset / "sub-d2" / "mre" / f"sub-d2_{name}.nii.gz"
            for name in ("stiffness", "damping_ratio")}
    with pytest.raises(InputError, match=r"subject sub-d2: damping-ratio map .*sub-d2_damping_"
                                         r"ratio\.nii\.gz: \d+ brain voxels lie outside \[0, 1\]"):
        correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                     {name: tmp_path / f"{name}.nii.gz" for name in maps},
                     tmp_path / "r.nii.gz", n4=False, subject="d2")
    assert not (tmp_path / "stiffness.nii.gz").exists()


def test_a_damping_ratio_at_or_below_zero_is_no_data_as_in_every_mre_map(processed, tmp_path):
    """A noisy inversion's few negative damping ratios become background, as the docs say
    of every MRE map (they stopped the subject as "outside [0, 1]"; found by a review); a
    map negative everywhere is still refused, as a wrong file."""
    subject = processed["young"]
    dataset = _with_damping(tmp_path, subject["files"], "d3",
                            lambda kpa: np.where(kpa > np.quantile(kpa, 0.99), -0.01, 0.25))
    maps = {name: dataset / "sub-d3" / "mre" / f"sub-d3_{name}.nii.gz"
            for name in ("stiffness", "damping_ratio")}
    outputs = {name: tmp_path / f"{name}.nii.gz" for name in maps}
    correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                 outputs, tmp_path / "r.nii.gz", n4=False, subject="d3")
    cleaned = nib.load(outputs["damping_ratio"]).get_fdata()
    raw = nib.load(maps["damping_ratio"]).get_fdata()
    assert np.count_nonzero(raw < 0) > 10 and np.all(cleaned[raw < 0] == 0)
    assert set(np.unique(cleaned)) == {0.0, np.float32(0.25)}

    dataset = _with_damping(tmp_path / "all", subject["files"], "d4", lambda kpa: -kpa / 50.0)
    maps = {name: dataset / "sub-d4" / "mre" / f"sub-d4_{name}.nii.gz"
            for name in ("stiffness", "damping_ratio")}
    with pytest.raises(PreprocessError, match=r"sub-d4_damping_ratio\.nii\.gz has no positive "
                                              r"voxel where the stiffness map"):
        correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                     {name: tmp_path / "all" / f"{name}.nii.gz" for name in maps},
                     tmp_path / "all" / "r.nii.gz", n4=False, subject="d4")


def _bias_warnings(maps: dict, subject: dict, out: Path, label: str, caplog) -> list[str]:
    """The warnings correct_bias logs for ``maps`` of a processed ``subject`` (no N4)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainage.preprocess.bias"):
        correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                     {name: out / f"{name}.nii.gz" for name in maps}, out / "r.nii.gz",
                     n4=False, subject=label)
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_a_further_map_without_data_where_the_first_has_some_is_warned_of(processed, tmp_path,
                                                                           caplog):
    """Holes of a damping-ratio map stored as 0 (a tighter mask than the stiffness's)
    became the channel's mean without a word, where the same holes as NaN stop the
    subject (found by a review: 57 % of a map zeroed moved a prediction by 0.6 years)."""
    subject = processed["young"]
    upper_half_empty = _with_damping(
        tmp_path, subject["files"], "d5",
        lambda kpa: np.where(np.arange(kpa.shape[2]) < kpa.shape[2] // 2, 0.25, 0.0)
        * np.ones_like(kpa))
    intact = _with_damping(tmp_path / "intact", subject["files"], "d6",
                           lambda kpa: np.full_like(kpa, 0.25))
    for dataset, label in ((upper_half_empty, "d5"), (intact, "d6")):
        maps = {name: dataset / f"sub-{label}" / "mre" / f"sub-{label}_{name}.nii.gz"
                for name in ("stiffness", "damping_ratio")}
        warnings = _bias_warnings(maps, subject, tmp_path / label, label, caplog)
        if label == "d6":
            assert warnings == []
            continue
        assert len(warnings) == 1, warnings
        assert re.fullmatch(r"subject sub-d5: damping-ratio map .*sub-d5_damping_ratio\.nii\.gz "
                            r"has no data \(0 or negative\) in \d+ of the \d+ voxels more than "
                            r"3 mm inside the stiffness map .*'s data \((\d+\.\d)%, more than "
                            r"preprocess\.max_nan_fraction=0\.01\): they become background.*",
                            warnings[0]), warnings[0]
        share = float(re.search(r"\((\d+\.\d)%", warnings[0]).group(1))
        assert 20 < share < 80


def test_a_hole_in_the_stiffness_map_itself_is_warned_of_whatever_its_encoding(
        processed, tmp_path, caplog):
    """A failed inversion's hole of 1.2 % of the brain in the stiffness map stored as 0 or
    -1 went on without a word (a review: the predicted age moved by 2.5 years), where the
    same hole as NaN stops the subject; only the further maps' holes were warned of."""
    subject = processed["young"]
    image = nib.load(subject["files"]["stiffness"])
    data = image.get_fdata(dtype=np.float32)
    centre = np.round(np.argwhere(data > 0).mean(axis=0)).astype(int)
    ball = (np.indices(data.shape) - centre[:, None, None, None]) ** 2
    ball = ball.sum(axis=0) <= 8 ** 2
    # NaN holes are clean_nonfinite's to count: 0.8 % NaN beside 0.2 % zeros is no warning
    # (counted together, with the map's own few, they were "more than max_nan_fraction")
    offset = np.array([0, 0, 10])
    small = [((np.indices(data.shape) - (centre + sign * offset)[:, None, None, None]) ** 2)
             .sum(axis=0) <= radius ** 2 for sign, radius in ((-1, 6.0), (1, 4.0))]
    mixed = np.where(small[0] & (data > 0), np.nan, np.where(small[1] & (data > 0), 0, data))
    said = {}
    for label, fill in (("h0", 0.0), ("h1", -1.0), ("whole", None), ("mixed", "mixed")):
        holed = (data if fill is None else mixed if fill == "mixed"
                 else np.where(ball & (data > 0), fill, data))
        path = tmp_path / f"sub-{label}_stiffness.nii.gz"
        nib.save(nib.Nifti1Image(holed.astype(np.float32), image.affine), path)
        said[label] = _bias_warnings({"stiffness": path}, subject, tmp_path / label, label,
                                     caplog)
    # and a further map's: the same NaN and zeros in a damping ratio beside the intact map
    ratio = np.where(np.isnan(mixed), np.nan, np.where(mixed > 0, 0.25, 0.0))
    damping = tmp_path / "sub-dmixed_damping_ratio.nii.gz"
    nib.save(nib.Nifti1Image(ratio.astype(np.float32), image.affine), damping)
    said["dmixed"] = _bias_warnings({"stiffness": tmp_path / "sub-whole_stiffness.nii.gz",
                                     "damping_ratio": damping}, subject, tmp_path / "dmixed",
                                    "dmixed", caplog)
    assert said.pop("whole") == []  # the simulated map's own few enclosed zeros: under 1 %
    for mixed_label in ("mixed", "dmixed"):
        assert [warning for warning in said.pop(mixed_label) if "has no data" in warning] == []
    for label, (warning, *more) in said.items():
        assert not more and re.fullmatch(
            rf"subject sub-{label}: stiffness map .*sub-{label}_stiffness\.nii\.gz has no data "
            r"\(0 or negative\) in \d+ of the \d+ voxels of the brain that its own data enclose "
            r"\((\d+\.\d)%, more than preprocess\.max_nan_fraction=0\.01\): they become "
            r"background.*", warning), (warning, more)


def test_a_stiffness_median_too_low_is_not_told_to_divide():
    """A map in MPa (or otherwise far below a few kPa) was told to divide by 1000, which
    moves it further out of range."""
    from brainage.modalities import modality
    from brainage.preprocess.bias import check_range

    brain = np.ones((4, 4, 4), bool)
    with pytest.raises(InputError) as low:
        check_range(np.full((4, 4, 4), 0.003, np.float32), brain, modality("stiffness"),
                    what="map")
    assert "Is the map in MPa (multiply by 1000)? Convert it to kPa" in str(low.value)
    with pytest.raises(InputError, match=r"Is the map in Pa \(divide by 1000\) or an unscaled "
                                         r"integer export\?"):
        check_range(np.full((4, 4, 4), 3000.0, np.float32), brain, modality("stiffness"),
                    what="map")


@pytest.mark.parametrize("scale, dtype", [(1000.0, np.float32), (50.0, np.uint8)],
                         ids=["pascal", "unscaled_uint8"])
def test_stiffness_map_in_another_unit_names_subject_file_and_unit(processed, tmp_path, scale,
                                                                    dtype):
    """A stiffness map in Pa (x 1000) or a byte export (kPa x 50 as integers) would pass
    every voxel check and train on values a thousand times too large."""
    subject = processed["young"]
    image = nib.load(subject["files"]["stiffness"])
    kpa = np.nan_to_num(image.get_fdata(dtype=np.float32))
    wrong = tmp_path / "sub-u1_stiffness.nii.gz"
    nib.save(nib.Nifti1Image(np.clip(kpa * scale, 0, 255 if dtype == np.uint8 else None)
                             .astype(dtype), image.affine), wrong)
    with pytest.raises(InputError, match=r"subject sub-u1: stiffness map .*sub-u1_stiffness"
                                         r"\.nii\.gz: the median brain value is \d+.*outside "
                                         r"the plausible \[0\.05, 50\] kPa.*divide by 1000"):
        correct_bias({"stiffness": wrong}, subject["mask"], subject["reference"],
                     subject["reference_info"], {"stiffness": tmp_path / "s.nii.gz"},
                     tmp_path / "r.nii.gz", n4=False, subject="u1")
    assert not (tmp_path / "s.nii.gz").exists()
    # the same map in kPa passes, and so do the simulated cohort's (medians of a few kPa)
    right = tmp_path / "sub-u2_stiffness.nii.gz"
    nib.save(nib.Nifti1Image(kpa, image.affine), right)
    correct_bias({"stiffness": right}, subject["mask"], subject["reference"],
                 subject["reference_info"], {"stiffness": tmp_path / "s.nii.gz"},
                 tmp_path / "r.nii.gz", n4=False, subject="u2")
    assert 0.05 < np.median(kpa[kpa > 0]) < 50


def test_damping_ratio_outside_the_brain_is_zeroed_not_range_checked(processed, tmp_path):
    subject = processed["young"]
    dataset = _with_damping(tmp_path, subject["files"], "d4", lambda kpa: 0.05 + 0.04 * kpa)
    maps = {name: dataset / "sub-d4" / "mre" / f"sub-d4_{name}.nii.gz"
            for name in ("stiffness", "damping_ratio")}
    image = nib.load(maps["damping_ratio"])
    ratio = image.get_fdata(dtype=np.float32)
    ratio[~(np.asarray(nib.load(subject["mask"]).dataobj) > 0)] = 5.0  # stray, beyond [0, 1]
    nib.save(nib.Nifti1Image(ratio, image.affine), maps["damping_ratio"])
    correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                 {name: tmp_path / f"{name}.nii.gz" for name in maps}, tmp_path / "r.nii.gz",
                 n4=False, subject="d4")
    corrected = nib.load(tmp_path / "damping_ratio.nii.gz").get_fdata()
    assert corrected.max() <= 1.0 and corrected.max() > 0


@pytest.mark.parametrize("name", ["damping_ratio", "storage_modulus"])
def test_a_map_without_data_where_the_grid_map_has_some_names_subject_and_file(processed, tmp_path,
                                                                              name):
    """A second map with values only outside the brain passes the input check (not all
    zero); the damping ratio became an all-zero channel without a word, and N4 of a
    modulus was blamed for its empty mask ("set preprocess.n4: false")."""
    subject = processed["young"]
    image = nib.load(subject["files"]["stiffness"])
    brain = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    maps = {"stiffness": subject["files"]["stiffness"],
            name: tmp_path / f"sub-e1_{name}.nii.gz"}
    nib.save(nib.Nifti1Image(np.where(brain, 0, 0.5).astype(np.float32), image.affine),
             maps[name])
    with pytest.raises(PreprocessError, match=rf"subject sub-e1: .* map .*sub-e1_{name}\.nii\.gz "
                                              rf"has no positive voxel where the stiffness map "
                                              rf".* has data inside the brain mask .*remove {name}"):
        correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                     {key: tmp_path / f"out_{key}.nii.gz" for key in maps},
                     tmp_path / "r.nii.gz", n4=True, subject="e1")
    assert not any(tmp_path.glob("out_*"))


def test_a_second_maps_nan_counts_where_the_grid_map_has_data(processed, tmp_path):
    """A damping ratio NaN over the upper third of the slab, where the stiffness map has
    data, was judged against its own data, which it does not enclose: it passed, and the
    channel was zero there."""
    subject = processed["young"]
    image = nib.load(subject["files"]["stiffness"])
    stiffness = image.get_fdata(dtype=np.float32)
    ratio = np.where(stiffness > 0, 0.3, 0).astype(np.float32)
    slices = np.flatnonzero((stiffness > 0).any(axis=(0, 1)))
    ratio[..., slices[-len(slices) // 3:]] = np.nan
    maps = {"stiffness": subject["files"]["stiffness"],
            "damping_ratio": tmp_path / "sub-n2_damping_ratio.nii.gz"}
    nib.save(nib.Nifti1Image(ratio, image.affine), maps["damping_ratio"])
    with pytest.raises(InputError, match=r"sub-n2: damping-ratio map .*sub-n2_damping_ratio\.nii"
                                         r"\.gz has \d+ NaN/inf voxels inside the brain, enclosed "
                                         r"by the map's data or where the stiffness map .* has data "
                                         r"\(more than 3 mm inside its edge\) \(\d"):
        correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                     {key: tmp_path / f"out_{key}.nii.gz" for key in maps},
                     tmp_path / "r.nii.gz", n4=False, subject="n2")
    # NaN on the edge of the stiffness map's data (a ratio resampled from another grid, its
    # NaN background grown inwards by partial volume) is no failure
    brain = np.asarray(nib.load(subject["mask"]).dataobj) > 0
    covered = brain & (stiffness > 0)
    edge = covered & ~ndimage.binary_erosion(covered)  # one voxel of this 2 mm grid
    ratio = np.where(covered & ~edge, 0.3, np.nan).astype(np.float32)
    assert np.count_nonzero(edge) > 0.01 * brain.sum()
    nib.save(nib.Nifti1Image(ratio, image.affine), maps["damping_ratio"])
    correct_bias(maps, subject["mask"], subject["reference"], subject["reference_info"],
                 {key: tmp_path / f"out_{key}.nii.gz" for key in maps},
                 tmp_path / "r.nii.gz", n4=False, subject="n2")


@pytest.mark.slow
def test_a_t1w_cohort_goes_through_the_same_chain(chosen, template_files, tmp_path):
    """Modalities [T1w] (a pretraining cohort): the mask lives on the T1w grid, the one
    output channel is the skull-stripped, registered T1w."""
    from brainage.inputs import subject_inputs

    root, young, _ = chosen
    dataset = tmp_path / "t1w"
    (dataset / "sub-t1" / "anat").mkdir(parents=True)
    nib.save(nib.load(_subject_files(root, young["participant_id"])["anat"]),
             dataset / "sub-t1" / "anat" / "sub-t1_T1w.nii.gz")
    preprocess = {"skullstrip": "deepbet", "freesurfer_tool": "synthstrip", "n4": True,
                  "deterministic": True, "threads": 1, "max_nan_fraction": 0.01}
    files = run_subject(subject_inputs(dataset, "t1", ("T1w",)),
                        Layout(results=str(tmp_path / "out")), "t1", preproc="preproc",
                        preprocess=preprocess, template_t1=template_files["t1"],
                        template_mask=template_files["mask"], modalities=("T1w",))
    assert not any(key.startswith("corrected_") and key != "corrected_reference"
                   for key in files)
    displacement = mean_displacement_mm(files["transform"], young, template_files["mask"])
    assert displacement < 1.0
    qc = json.loads(Path(files["qc_json"]).read_text())
    assert qc["dice"] > 0.9 and qc["reference_kind"] == "T1w_brain"
    t1w = nib.load(files["registered_T1w"]).get_fdata()
    assert t1w.shape == (99, 117, 95) and (t1w > 0).sum() > 100_000


# -- volume helpers ---------------------------------------------------------------------------

def test_a_mask_moved_to_another_grid_keeps_voxels_at_least_half_covered():
    """resample_mask: linear interpolation of the 0/1 mask, kept where >= 0.5 (a voxel
    half inside is kept; a corner voxel whose linear weight is 0.6^3 is not, where nearest
    neighbour would keep it)."""
    from brainage.preprocess.images import resample_mask

    source = np.eye(4)
    half = np.zeros((8, 8, 8), bool)
    half[:4] = True  # x indices 0-3
    coarse = np.diag([2.0, 1.0, 1.0, 1.0])
    coarse[0, 3] = 1.5  # target x voxels at source x 1.5, 3.5 (half inside), 5.5
    moved = resample_mask(half, source, (3, 8, 8), coarse)
    assert moved[:, 0, 0].tolist() == [True, True, False] and moved[:2].all()

    cube = np.zeros((8, 8, 8), bool)
    cube[:4, :4, :4] = True
    shifted = np.eye(4)
    shifted[:3, 3] = 0.4  # target voxel i at source i + 0.4
    moved = resample_mask(cube, source, (8, 8, 8), shifted)
    weight = np.clip(4 - (np.arange(8) + 0.4), 0, 1)  # linear coverage along each axis
    expected = np.einsum("i,j,k->ijk", weight, weight, weight) >= 0.5
    assert np.array_equal(moved, expected) and moved.sum() == 54
    assert not moved[3, 3, 3] and moved[3, 2, 2]
    assert np.array_equal(resample_mask(cube, source, (8, 8, 8), source), cube)  # same grid


def test_the_support_mask_is_the_largest_component_of_the_map_with_its_holes_filled():
    """support_mask (skullstrip none, or no T1w): the map's finite non-zero voxels, the
    largest component only, enclosed NaN/zero voxels filled; the background (the largest
    region of all) is never taken for the brain."""
    from brainage.preprocess.images import support_mask

    data = np.zeros((20, 20, 20), np.float32)
    data[2:9, 2:9, 2:9] = 2.5  # the brain: 343 voxels
    data[5, 5, 5], data[4, 5, 5] = np.nan, 0.0  # an inversion failure inside
    data[15:17, 15:17, 15:17] = 3.0  # a stray blob
    expected = np.zeros(data.shape, bool)
    expected[2:9, 2:9, 2:9] = True
    assert np.array_equal(support_mask(data), expected)
    assert not support_mask(np.zeros((4, 4, 4), np.float32)).any()
    # a "no data" background of -1, or a scaled integer's 0 decoded to -1e-8: the whole
    # field of view was the brain (13,660 ml in a review, QC Dice 0.35)
    for background in (-1.0, -1.26e-8):
        assert np.array_equal(support_mask(np.where(data == 0, background, data)), expected)

def test_nonfinite_voxels_up_to_max_nan_fraction_of_the_brain_are_allowed(caplog):
    """max_nan_fraction is the largest allowed share: exactly that share passes, and 0
    allows a map without NaN (it refused every map)."""
    from brainage.preprocess.images import clean_nonfinite

    brain = np.zeros((10, 10, 2), bool)
    brain[:, :, 0] = True  # 100 brain voxels
    data = np.ones(brain.shape, np.float32)
    cleaned, count = clean_nonfinite(data, brain, max_fraction=0.0, what="map")
    assert count == 0 and np.array_equal(cleaned, data)
    data[2, 3, 0], data[5, 5, 0], data[0, 0, 1] = np.nan, np.inf, np.nan  # 2 inside, 1 outside
    # (the clean map's INFO line is kept too where an earlier test left the root logger at
    # INFO, as predict run's in-process logging does)
    caplog.clear()
    with caplog.at_level("INFO", logger="brainage.preprocess.images"):
        cleaned, count = clean_nonfinite(data, brain, max_fraction=0.02, what="map")
    assert count == 3 and cleaned[2, 3, 0] == cleaned[5, 5, 0] == cleaned[0, 0, 1] == 0
    assert np.isfinite(cleaned).all() and cleaned.sum() == 197
    # a hole that passes but can move a prediction by years is a warning, not a log line
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert re.search(r"map: 2 NaN/inf voxels inside the brain, enclosed by the map's data "
                     r"\(2\.00% of brain voxels, within preprocess.max_nan_fraction=0.02\), set "
                     r"to background \(0\): the network sees a hole", caplog.text), caplog.text
    caplog.clear()
    large_brain = np.ones((20, 20, 10), bool)  # 4,000 brain voxels: the same 2 are 0.05 %
    holed = np.ones(large_brain.shape, np.float32)
    holed[2, 3, 0], holed[5, 5, 0] = np.nan, np.inf
    with caplog.at_level("INFO", logger="brainage.preprocess.images"):
        clean_nonfinite(holed, large_brain, max_fraction=0.02, what="map")
    assert [record.levelname for record in caplog.records] == ["INFO"]
    # the warning starts just above 0.1 % of the brain (NAN_WARNING_FRACTION): 4 holes of
    # 4,000 voxels are 0.1 %, 5 are 0.125 % (a 0.7 % hole moved a prediction by 3.6 years)
    for holes, level in ((4, "INFO"), (5, "WARNING")):
        caplog.clear()
        holed = np.ones(large_brain.shape, np.float32)
        holed[2, 2 + np.arange(holes), 0] = np.nan
        with caplog.at_level("INFO", logger="brainage.preprocess.images"):
            clean_nonfinite(holed, large_brain, max_fraction=0.02, what="map")
        assert [record.levelname for record in caplog.records] == [level], holes
    with pytest.raises(InputError, match=r"map has 2 NaN/inf voxels inside the brain, enclosed "
                                         r"by the map's data \(2\.0% of 100 brain voxels\)"):
        clean_nonfinite(data, brain, max_fraction=0.019, what="map")


def test_nan_around_the_maps_data_is_background_and_nan_it_encloses_is_counted():
    """A map whose background is NaN, not 0 (beyond its slab, and between the inversion's
    own mask and a larger brain mask) failed every subject with a T1w: the NaN around the
    data counted as failed voxels. Holes inside the data count, on the slab's first and
    last slices too (there only the slice encloses them). A failed region that reaches the
    data's edge is missing coverage, as it is written with zeros: QC's coverage judges it."""
    from brainage.preprocess.images import clean_nonfinite

    brain = np.zeros((20, 20, 12), bool)
    brain[2:18, 2:18, :] = True  # a T1w brain mask reaching beyond the slab
    data = np.full(brain.shape, np.nan, np.float32)
    data[4:16, 4:16, 3:9] = 2.5  # the slab: 6 slices, a tighter mask in plane
    cleaned, count = clean_nonfinite(data, brain, max_fraction=0.0, what="map")
    assert count == data.size - 12 * 12 * 6 and np.isfinite(cleaned).all()
    assert np.array_equal(cleaned > 0, np.isfinite(data))
    data[8, 8, 3] = data[9, 9, 6] = data[10, 10, 8] = np.nan  # first, middle, last slice
    with pytest.raises(InputError, match=r"map has 3 NaN/inf voxels inside the brain, enclosed"):
        clean_nonfinite(data, brain, max_fraction=0.0, what="map")
    slab = np.ones((20, 20, 6), np.float32)  # a slab that fills its array: holes on the
    slab[7, 7, 0] = slab[12, 12, 5] = np.nan  # border slices are enclosed within them
    with pytest.raises(InputError, match=r"map has 2 NaN/inf voxels inside the brain"):
        clean_nonfinite(slab, np.ones(slab.shape, bool), max_fraction=0.0, what="map")
    edge = np.where(np.isnan(data), 0, data)
    edge[4:10] = np.nan  # half the data, reaching its edge: NaN as zeros there would be
    for background in (np.nan, 0.0):
        edge[~brain | (np.arange(12) < 3) | (np.arange(12) >= 9)] = background
        cleaned, _ = clean_nonfinite(edge, brain, max_fraction=0.0, what="map")
        assert np.array_equal(cleaned > 0, np.isfinite(edge) & (edge > 0))
    # the map's data can also be given: a subject's second map where its first has data
    covered = np.zeros(brain.shape, bool)
    covered[4:16, 4:16, 3:9] = True
    with pytest.raises(InputError, match=r"map has 432 NaN/inf voxels inside the brain, enclosed by "
                                         r"the map's data or where the stiffness map has data "
                                         r"\(14\.1% of 3072"):
        clean_nonfinite(edge, brain, max_fraction=0.0, what="map",
                        within=(covered, "where the stiffness map has data"))


def test_the_edge_a_later_map_may_miss_is_in_mm_not_voxels():
    """A later map's NaN within 3 mm of the first map's edge is partial volume; deeper it
    counts. In voxels (2), a native 3 mm grid exempted 6 mm, a fifth of a brain, and a thin
    slab lost its whole coverage to the erosion along the slab's axis."""
    from brainage.preprocess.images import deeper_than

    x, y, z = np.ogrid[-25:25, -30:30, -20:20]
    ellipsoid = (x / 23.0) ** 2 + (y / 28.0) ** 2 + (z / 18.0) ** 2 <= 1
    def inner(layers):  # what is left after peeling face-connected layers
        return ndimage.binary_erosion(ellipsoid, iterations=layers)

    # (voxel size, layers always exempt, layers after which all counts): a voxel centre's
    # Euclidean depth below the edge, half a voxel less than the distance between centres
    for size, exempt, counted in ((3.0, 1, 2), (2.0, 2, 3), (1.5, 2, 4), (1.0, 3, 6)):
        deep = deeper_than(ellipsoid, np.diag([size, size, size, 1]), 3.0)
        assert not (deep & ~inner(exempt)).any() and not (inner(counted) & ~deep).any(), size
    slab = np.ones((20, 20, 4), bool)  # a native slab of 4 slices at 3 mm, filling its array
    deep = deeper_than(slab, np.diag([3.0, 3.0, 3.0, 1]), 3.0)
    assert deep[1:-1, 1:-1, 1:3].all() and not deep[..., [0, 3]].any()
    # anisotropic and coarse voxels: the centres' depth, axis by axis (a 3.5 mm or 4 mm edge
    # voxel's centre lies 1.75 or 2 mm deep, and is exempt)
    box = np.zeros((30, 30, 16), bool)
    box[2:-2, 2:-2, 2:-2] = True
    for sizes, in_plane, through in (([2, 2, 4], 2, 1), ([1, 1, 4], 3, 1), ([3.5] * 3, 1, 1)):
        deep = deeper_than(box, np.diag([*sizes, 1]), 3.0)
        assert deep[:, 15, 8].tolist().index(True) == 2 + in_plane, sizes
        assert deep[15, 15, :].tolist().index(True) == 2 + through, sizes


def test_the_field_of_view_box_is_the_supports_bounding_box_less_one_voxel():
    from brainage.preprocess.register import field_of_view_box

    support = np.zeros((10, 12, 8), bool)
    support[2, 3, 1] = support[6, 8, 4] = True  # the box's corners only
    expected = np.zeros(support.shape, np.float32)
    expected[3:6, 4:8, 2:4] = 1
    assert np.array_equal(field_of_view_box(support), expected)
    flat = np.zeros((10, 12, 8), bool)
    flat[2:7, 3:9, 4] = True  # one slice thick: the slice is kept
    expected = np.zeros(flat.shape, np.float32)
    expected[3:6, 4:8, 4] = 1
    assert np.array_equal(field_of_view_box(flat), expected)


def test_a_reference_sidecar_of_an_unknown_kind_asks_to_rerun_skull_stripping(tmp_path):
    from brainage.preprocess.skullstrip import read_reference_info

    for content in ({"reference_kind": "T2w"}, {"route": "deepbet"}):
        path = tmp_path / "reference.json"
        path.write_text(json.dumps(content))
        with pytest.raises(PreprocessError, match=r"reference\.json: reference_kind .* is not "
                                                  r"one of .*rerun strip_skull"):
            read_reference_info(path)
    path.write_text(json.dumps({"reference_kind": "stiffness", "route": "none"}))
    assert read_reference_info(path)["route"] == "none"


def test_only_maps_that_take_n4_are_corrected_and_the_others_keep_the_grid_maps_coverage(
        tmp_path):
    """A damping ratio is never N4-corrected, keeps data only where the stiffness map (the
    grid map) has some, and is range-checked only there (beyond the slab it is no data).
    A subject without a T1w: the corrected stiffness map is the reference."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    index = np.indices((20, 20, 20)).astype(np.float32)
    brain = np.linalg.norm(index - 9.5, axis=0) < 8
    covered = brain & (index[2] < 13)  # the MRE slab
    rng = np.random.default_rng(0)
    stiffness = np.where(covered, 2.5 * (1 + 0.2 * index[0] / 20)
                         + 0.05 * rng.standard_normal(brain.shape), 0).astype(np.float32)
    damping = np.where(brain, 0.2 + 0.1 * index[0] / 20, 0).astype(np.float32)
    damping[brain & ~covered] = 1.5  # beyond the slab: no data, not a range error
    paths = {name: tmp_path / f"sub-n1_{name}.nii.gz" for name in ("stiffness", "damping_ratio")}
    nib.save(nib.Nifti1Image(stiffness, affine), paths["stiffness"])
    nib.save(nib.Nifti1Image(damping, affine), paths["damping_ratio"])
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    (tmp_path / "reference.json").write_text(json.dumps({"reference_kind": "stiffness"}))
    out = {name: tmp_path / f"out_{name}.nii.gz" for name in paths}
    correct_bias(paths, tmp_path / "mask.nii.gz", paths["stiffness"], tmp_path / "reference.json",
                 out, tmp_path / "r.nii.gz", n4=True, subject="n1")
    corrected = {name: nib.load(path).get_fdata(dtype=np.float32) for name, path in out.items()}
    assert np.array_equal(corrected["damping_ratio"], np.where(covered, damping, 0))
    assert np.array_equal(corrected["stiffness"] > 0, covered)
    assert not np.allclose(corrected["stiffness"], stiffness)  # N4 ran on the stiffness
    assert corrected["stiffness"][covered].mean() == pytest.approx(stiffness[covered].mean(),
                                                                   rel=1e-4)
    assert np.array_equal(nib.load(tmp_path / "r.nii.gz").get_fdata(dtype=np.float32),
                          corrected["stiffness"])


# -- resuming the in-process chain ------------------------------------------------------------

def test_in_process_chain_redoes_steps_made_from_other_inputs_or_settings(tmp_path,
                                                                          monkeypatch, caplog):
    """run_subject (python -m brainage.predict run) continues an interrupted run, but redoes
    a step, and the steps after it, whose outputs came from other input files or settings.
    It used to reuse them silently: a replaced map, or a bundle with other preprocessing
    settings, predicted from the old maps. The steps are a test double that writes each
    step's outputs (_fake_chain)."""
    from brainage.preprocess import chain

    run, stiffness, template, _, layout = _fake_chain(tmp_path, monkeypatch)
    caplog.set_level("INFO", logger="brainage.preprocess.chain")
    assert run() == list(chain.STEPS)
    assert "sub-a: reused" not in caplog.text
    assert run() == []  # an interrupted or finished run continues: nothing to redo
    assert "sub-a: reused (every step's record matches its inputs and settings)" in caplog.text
    assert run(threads=4) == []  # thread counts do not change deterministic results
    caplog.set_level("WARNING", logger="brainage.preprocess.chain")
    assert run(n4=False) == ["correct_bias", "register_to_template", "compute_qc"]
    assert "sub-a: the correct_bias outputs" in caplog.text
    assert run(n4=False) == []
    # a cohort copied without its times: redone (the content may differ), and said so,
    # not "made from other input files or preprocessing settings" (a change to look for)
    caplog.clear()
    later = stiffness.stat().st_mtime + 60
    os.utime(stiffness, (later, later))
    assert run(n4=False) == list(chain.STEPS)
    assert ("sub-a: the input files of the strip_skull outputs in" in caplog.text
            and "have new modification times (the same names and sizes): copied without "
                "keeping them? (cp -a and rsync -a keep them.)" in caplog.text)
    assert "other input files" not in caplog.text
    caplog.clear()
    stiffness.write_bytes(b"a replaced map")  # another size: another file
    assert run(n4=False) == list(chain.STEPS)
    assert "made from other input files or preprocessing settings" in caplog.text
    template["template_mask"].write_bytes(b"another template mask")
    assert run(n4=False) == list(chain.STEPS)
    # a step interrupted after its outputs but before its record is done again
    chain.step_record_path(layout, "a", "preproc", "compute_qc").unlink()
    assert run(n4=False) == ["compute_qc"]
    # the records live beside the BIDS-Derivatives folder, not in it
    assert not list(Path(layout.preproc_dir("preproc")).rglob("*step_records*"))


def _fake_chain(tmp_path, monkeypatch):
    """run_subject on a one-map subject whose steps are a test double that writes every
    output of its step; returns (run, stiffness, template files, the subject's files,
    layout): ``run(fail=steps, **preprocess changes)`` gives the steps done."""
    from brainage.preprocess import chain

    done, failing = [], set()

    def fake_step(step, files, inputs, **_):
        done.append(step)
        if step in failing:
            raise PreprocessError(f"{step} failed")
        for output in chain.step_outputs(files, step):
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(step)

    monkeypatch.setattr(chain, "run_step", fake_step)
    stiffness = tmp_path / "sub-a_stiffness.nii.gz"
    stiffness.write_bytes(b"first map")
    template = {"template_t1": tmp_path / "t1.nii.gz", "template_mask": tmp_path / "mask.nii.gz"}
    for path in template.values():
        path.write_bytes(path.name.encode())
    layout = Layout(results=str(tmp_path / "out"))
    preprocess = {"skullstrip": "deepbet", "freesurfer_tool": "synthstrip", "n4": True,
                  "max_nan_fraction": 0.01, "deterministic": True, "threads": 1}

    def run(fail=(), **changes):
        done.clear()
        failing.clear()
        failing.update(fail)
        run_subject({"stiffness": str(stiffness)}, layout, "a", preproc="preproc",
                    modalities=("stiffness",), template_t1=str(template["template_t1"]),
                    template_mask=str(template["template_mask"]),
                    preprocess={**preprocess, **changes})
        return list(done)

    files = chain.subject_files(layout, "a", "preproc", ("stiffness",))
    return run, stiffness, template, files, layout


def test_in_process_chain_redoes_steps_for_a_same_size_map_another_t1_or_a_lost_product(
        tmp_path, monkeypatch):
    """A step's record names its inputs by name, size *and* modification time (a map
    re-exported at the same size is another map) and both template files; a registered
    map deleted is made again, and the transform with it."""

    from brainage.preprocess import chain

    run, stiffness, template, files, _ = _fake_chain(tmp_path, monkeypatch)
    assert run() == list(chain.STEPS)
    assert run() == []
    before = stiffness.stat()
    stiffness.write_bytes(b"other map")  # the same size
    os.utime(stiffness, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    assert stiffness.stat().st_size == before.st_size
    assert run() == list(chain.STEPS)
    template["template_t1"].write_bytes(b"another template T1")
    assert run() == list(chain.STEPS)
    Path(files["transform"]).unlink()
    Path(files["registered_stiffness"]).unlink()
    assert run() == ["register_to_template", "compute_qc"]
    assert Path(files["transform"]).is_file()


def test_in_process_chain_keeps_a_subject_whose_intermediates_were_deleted(tmp_path,
                                                                           monkeypatch, caplog):
    """The README's free files (N4-corrected maps, transforms) and the registered
    reference, deleted from a `predict run` folder to save space, made its next run
    preprocess every subject again without a word: the N4 step's marker was one of them.
    As in Snakemake, they are made again only when a step that reads them must run, and
    then a warning names the file."""
    from brainage.preprocess import chain

    run, _, _, files, _ = _fake_chain(tmp_path, monkeypatch)
    assert run() == list(chain.STEPS)
    freed = [files["corrected_stiffness"], files["corrected_reference"], files["transform"],
             files["registered_reference"], files["mask"]]
    for path in freed:
        Path(path).unlink()
    Path(files["qc_png"]).unlink()  # read by nothing after the chain, as the masks
    Path(files["registered_mask"]).unlink()
    caplog.set_level("INFO", logger="brainage.preprocess.chain")
    assert run() == []
    assert "sub-a: reused" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    Path(files["qc_json"]).unlink()  # read after: its step reads the registered reference
    assert run() == list(chain.STEPS)
    # the file whose loss made the steps run, not the free files made again for them
    assert caplog.messages == [f"sub-a: {files['qc_json']} is missing; doing strip_skull "
                               f"and the steps after it again"]
    assert all(Path(path).is_file() for path in freed)


def test_a_killed_redo_is_continued_without_blaming_the_inputs(tmp_path, monkeypatch, caplog):
    """A registration redone for a deleted map and stopped was said, at the next run, to
    have been made "from other input files or preprocessing settings": the old outputs
    were there, the record not."""
    from brainage.preprocess import chain

    run, _, _, files, _ = _fake_chain(tmp_path, monkeypatch)
    assert run() == list(chain.STEPS)
    Path(files["registered_stiffness"]).unlink()
    with pytest.raises(PreprocessError):
        run(fail={"register_to_template"})
    caplog.clear()
    caplog.set_level("INFO", logger="brainage.preprocess.chain")
    assert run() == ["register_to_template", "compute_qc"]
    assert caplog.messages == ["sub-a: register_to_template did not finish (stopped, or "
                               "failed); doing register_to_template and the steps after it "
                               "again"]


def test_a_step_that_fails_when_redone_leaves_no_record_to_reuse_its_old_outputs(
        tmp_path, monkeypatch):
    """A step redone (here because the skull stripping before it, which lost its record,
    was made again) drops its record before it runs: when it fails, its old outputs, made
    from the old mask, are not taken as done by the next run."""
    from brainage.preprocess import chain

    run, _, _, files, layout = _fake_chain(tmp_path, monkeypatch)
    assert run() == list(chain.STEPS)
    chain.step_record_path(layout, "a", "preproc", "strip_skull").unlink()
    with pytest.raises(PreprocessError, match="correct_bias failed"):
        run(fail={"correct_bias"})
    assert Path(files["corrected_reference"]).is_file()  # the old outputs are still there
    assert run() == ["correct_bias", "register_to_template", "compute_qc"]


def test_thread_counts_never_redo_a_step_and_one_thread_when_deterministic(tmp_path,
                                                                            monkeypatch):
    from brainage.preprocess import chain

    run, _, _, _, _ = _fake_chain(tmp_path, monkeypatch)
    assert run(deterministic=False, threads=2) == list(chain.STEPS)
    assert run(deterministic=False, threads=4) == []
    settings = {"skullstrip": "deepbet", "freesurfer_tool": "synthstrip", "n4": True,
                "max_nan_fraction": 0.01, "threads": 6}
    for step in ("strip_skull", "correct_bias", "register_to_template"):
        assert chain.step_options(step, {**settings, "deterministic": True})["threads"] == 1
        assert chain.step_options(step, {**settings, "deterministic": False})["threads"] == 6


def test_the_freesurfer_tool_is_an_option_of_skull_stripping_only_where_freesurfer_may_run():
    """Changing preprocess.freesurfer_tool reruns no subject of a deepbet or none cohort."""
    from brainage.preprocess import chain

    settings = {"freesurfer_tool": "watershed", "n4": True, "max_nan_fraction": 0.01,
                "deterministic": True, "threads": 1}
    for method, tool in (("auto", "watershed"), ("freesurfer", "watershed"),
                         ("deepbet", "synthstrip"), ("none", "synthstrip")):
        options = chain.step_options("strip_skull", {**settings, "skullstrip": method})
        assert options == {"method": method, "freesurfer_tool": tool, "threads": 1}, method


def test_a_t1w_channel_without_a_t1w_reference_says_what_to_do(tmp_path):
    # a subject registered with its stiffness map (no anat/ T1w) cannot give a T1w channel
    info = tmp_path / "reference.json"
    info.write_text(json.dumps({"reference_kind": "stiffness"}))
    unused = tmp_path / "unused.nii.gz"
    with pytest.raises(PreprocessError, match=r"subject sub-s01: the T1w channel needs a T1w "
                                              r".*anat/sub-s01_T1w\.nii\.gz\)\. Add the "
                                              r"subject's T1w image, or remove T1w from "
                                              r"dataset\.modalities"):
        register_to_template({}, unused, unused, info, unused, unused, {"T1w": unused},
                             unused, unused, unused, subject="s01")


@pytest.mark.parametrize("route", ["snakemake", "in_process"])
def test_registered_t1w_sidecar_says_whether_n4_ran(route, tmp_path, monkeypatch):
    """The registered T1w channel is the corrected reference; with preprocess.n4: false it
    is not bias-corrected, but its BIDS sidecar said 'N4-corrected' whatever the setting.
    The steps' image work is replaced by doubles: only the sidecars are checked."""
    import brainage.preprocess as preprocess_package
    import brainage.qc
    from brainage.preprocess import chain

    for name in ("strip_skull", "correct_bias", "register_to_template"):
        monkeypatch.setattr(preprocess_package, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(brainage.qc, "compute_qc", lambda *args, **kwargs: None)
    template_mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.uint8), np.eye(4)), template_mask)
    inputs = {"stiffness": tmp_path / "sub-a_stiffness.nii.gz",
              "anat": tmp_path / "sub-a_T1w.nii.gz"}
    for path in inputs.values():
        path.write_bytes(b"not read")
    inputs = {key: str(path) for key, path in inputs.items()}
    layout, modalities = Layout(results=str(tmp_path / "out")), ("stiffness", "T1w")
    files = chain.subject_files(layout, "a", "preproc", modalities)
    for n4 in (True, False):
        preprocess = {"skullstrip": "none", "freesurfer_tool": "synthstrip", "n4": n4,
                      "deterministic": True, "threads": 1, "max_nan_fraction": 0.01}
        if route == "snakemake":
            chain.run_job("correct_and_register", files, inputs, template_t1="",
                          template_mask=str(template_mask),
                          options=chain.job_options("correct_and_register", preprocess),
                          subject="a", modalities=modalities)
        else:
            chain.run_subject(inputs, layout, "a", preproc="preproc", preprocess=preprocess,
                              template_t1=str(template_mask), template_mask=str(template_mask),
                              modalities=modalities)
        description = json.loads(Path(files["registered_T1w_json"]).read_text())["Description"]
        assert ("N4-corrected" in description) == n4, (n4, description)


@pytest.mark.parametrize("record", [{"dice": 0.9, "coverage": 0.8},
                                    {"dice": 0.9, "correlation": None, "coverage": 0.8},
                                    {"dice": 0.9, "correlation": "0.5", "coverage": 0.8}])
def test_a_qc_record_without_a_metric_is_named_by_the_qc_table(tmp_path, record):
    """tabulate_qc stopped on a subject's QC JSON without a number for a metric with a bare
    KeyError 'correlation' (or a TypeError from float(None)) naming no file; the
    normalisation's coverage silently became NaN. Both now name the file."""
    from brainage.normalise import normalise_dataset
    from brainage.qc import tabulate_qc

    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "age": [30.0, 40.0],
                                 "sex": ["F", "M"], "study": ["s1", "s1"]})
    good = tmp_path / "sub-01_qc.json"
    good.write_text(json.dumps({"participant_id": "sub-01", "dice": 0.9, "correlation": 0.5,
                                "coverage": 0.8}))
    bad = tmp_path / "sub-02_qc.json"
    bad.write_text(json.dumps({"participant_id": "sub-02", **record}))
    message = (rf"^QC file {re.escape(str(bad))} has no number for correlation; remove it and "
               r"run again: a subject's job of rule correct_and_register "
               r"\(correct_and_register_<maps> in a pretraining or predict cohort\) writes it "
               r"again \(in a training or pretraining cohort the normalisation and the "
               r"trainings after it run again too")
    with pytest.raises(InputError, match=message):
        tabulate_qc([good, bad], participants, tmp_path / "qc.tsv",
                    minimums={"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7})
    with pytest.raises(InputError, match=message):
        normalise_dataset([], participants, [good, bad], tmp_path / "mask.nii.gz",
                          tmp_path / "images.npy", tmp_path / "participants.tsv",
                          tmp_path / "stats.json", split="holdout",
                          split_settings={"scheme": "holdout", "test_fraction": 0.5})


def test_a_qc_record_with_true_for_a_metric_is_named(tmp_path):
    """JSON true is a Python bool, an int: a record with "dice": true passed as Dice 1."""
    from brainage.qc import read_qc_records

    path = tmp_path / "sub-01_qc.json"
    path.write_text(json.dumps({"participant_id": "sub-01", "dice": True, "correlation": 0.5,
                                "coverage": 1}))
    with pytest.raises(InputError, match=rf"QC file {re.escape(str(path))} has no number "
                                         r"for dice"):
        read_qc_records([path], require=("dice", "correlation", "coverage"))


def test_qc_table_in_participants_order_with_each_verdict(tmp_path, caplog):
    from brainage.qc import QC_COLUMNS, read_qc_table, tabulate_qc

    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03"],
                                 "age": [30.0, 40.0, 50.0], "sex": ["F", "M", "F"],
                                 "study": ["s1", "s1", "s2"]})
    metrics = {"sub-01": (0.9, 0.5, 0.8), "sub-02": (0.8, 0.2, 0.8), "sub-03": (0.9, 0.3, 0.7)}
    files = []
    for pid in ("sub-03", "sub-01", "sub-02"):  # not in participants order
        dice, correlation, coverage = metrics[pid]
        files.append(tmp_path / f"{pid}_qc.json")
        files[-1].write_text(json.dumps({"participant_id": pid, "dice": dice,
                                         "correlation": correlation, "coverage": coverage,
                                         "correlation_map": "stiffness",
                                         "reference_kind": "T1w"}))
    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    with caplog.at_level("WARNING", logger="brainage.qc"):
        table = tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)
    assert list(table.columns) == list(QC_COLUMNS)
    # the QC overview reads which map each correlation was measured on from the table
    assert read_qc_table(tmp_path / "qc.tsv")["correlation_map"].tolist() == ["stiffness"] * 3
    assert table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert table["qc_pass"].tolist() == [True, False, True]  # a value at its minimum passes
    assert table["qc_failures"].tolist() == ["", "dice 0.800 < 0.85; correlation 0.200 < 0.3",
                                             ""]
    assert re.search(rf"QC flags sub-02 \(s1\): dice 0\.800 < 0\.85; correlation 0\.200 < "
                     rf"0\.3\. Look at its QC figure {re.escape(str(tmp_path / 'sub-02_qc.png'))} "
                     rf".* Config key qc\.exclude_failed decides what happens to it: false "
                     rf"\(the default\) trains on and evaluates it as any subject, true leaves "
                     rf"it out of every split\.", caplog.text), caplog.text
    assert "(a failed skull stripping or registration, or a T1w from another session" \
        in caplog.text and "short slab" not in caplog.text
    assert "every subject of study" not in caplog.text  # s1 has one passing
    saved = read_qc_table(tmp_path / "qc.tsv")
    assert saved["qc_pass"].tolist() == [True, False, True]
    assert saved["dice"].tolist() == [0.9, 0.8, 0.9]
    with pytest.raises(InputError, match=r"^no QC file for sub-02; a subject's job of rule "
                                         r"correct_and_register \(correct_and_register_<maps>"):
        tabulate_qc([files[0], files[1]], participants, tmp_path / "qc.tsv", minimums=minimums)


def test_a_study_of_maps_stiffer_than_the_others_at_their_ages_is_warned_about(tmp_path,
                                                                              caplog):
    """A study of another MRE drive frequency or inversion (30 % stiffer) passed QC and the
    whole table without a word, though the network and the read-out learn the study from
    it: at the same ages as the others' (the line of median stiffness against age of the
    other studies), it is named; studies as far apart as the demo's are not, and the QC
    table lists each subject's median stiffness (kPa)."""
    from brainage.qc import read_qc_table, tabulate_qc

    rng = np.random.default_rng(0)
    studies = {"s1": (20, 40), "s2": (40, 80), "s3": (20, 80), "s4": (60, 80)}
    rows, files = [], []
    for study, (low, high) in studies.items():
        for number in range(8):
            pid = f"sub-{study}n{number}"
            age = float(rng.uniform(low, high))
            factor = 1.3 if study == "s4" else 1.04 if study == "s1" else 1.0
            median = (2.95 - 0.01 * age + rng.normal(0, 0.145)) * factor
            rows.append({"participant_id": pid, "age": age, "sex": "F", "study": study})
            files.append(tmp_path / f"{pid}_qc.json")
            files[-1].write_text(json.dumps({
                "participant_id": pid, "dice": 0.95, "correlation": 0.8, "coverage": 0.9,
                "maps": {"stiffness": {"median": median, "p01": 1, "p99": 4, "voxels": 9}}}))
    participants = pd.DataFrame(rows)
    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    with caplog.at_level("WARNING", logger="brainage.qc"):
        table = tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)
    found = re.findall(r"QC: the maps of study (\w+) \(8 subjects\) are on average (\d+) % "
                       r"stiffer than the other studies' at the same ages \(\+([\d.]+) "
                       r"residual standard deviations", caplog.text)
    assert [(study, abs(int(percent) - 30) <= 6, float(sd) >= 3) for study, percent, sd
            in found] == [("s4", True, True)], caplog.text
    assert "another MRE drive frequency or inversion?" in caplog.text
    saved = read_qc_table(tmp_path / "qc.tsv")
    assert saved["median_stiffness"].to_numpy() == pytest.approx(
        [json.loads(path.read_text())["maps"]["stiffness"]["median"] for path in files])
    assert table["qc_pass"].all()
    # QC files of earlier versions (no median): no column values, no warning
    for path in files:
        path.write_text(json.dumps({key: value for key, value
                                    in json.loads(path.read_text()).items() if key != "maps"}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.qc"):
        table = tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)
    assert table["median_stiffness"].isna().all() and "the maps of study" not in caplog.text
    # a young and an old study of one protocol: no ages in common, nothing to compare (the
    # other's line stretched 40 years read as 20-45 % apart in 71 % of such cohorts of 15 +
    # 15 subjects): here the young study's own slope is steeper than the whole line's, as a
    # narrow age range's often is by chance
    rows, files = [], []
    for study, ages in {"young": np.linspace(20, 30, 15), "old": np.linspace(65, 80, 15)
                        }.items():
        for number, age in enumerate(ages):
            pid = f"sub-{study}{number}"
            slope = -0.03 if study == "young" else -0.01
            median = 2.95 - 0.01 * 25 + slope * (age - 25) if study == "young" else \
                2.95 - 0.01 * age
            rows.append({"participant_id": pid, "age": float(age), "sex": "F", "study": study})
            files.append(tmp_path / f"{pid}_qc.json")
            files[-1].write_text(json.dumps({
                "participant_id": pid, "dice": 0.95, "correlation": 0.8, "coverage": 0.9,
                "maps": {"stiffness": {"median": median + 0.1 * (-1) ** number,
                                       "p01": 1, "p99": 4, "voxels": 9}}}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.qc"):
        tabulate_qc(files, pd.DataFrame(rows), tmp_path / "qc.tsv", minimums=minimums)
    assert "the maps of study" not in caplog.text, caplog.text


def test_a_study_whose_every_subject_misses_the_coverage_threshold_is_named_once(tmp_path,
                                                                                caplog):
    """A study acquired with a short MRE slab fails coverage subject by subject: each line
    named a T1w from another session and a failed registration, which did not apply (Dice
    0.96, reference correlation 0.93), and nothing said it was the study's acquisition."""
    from brainage.qc import tabulate_qc

    participants = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(5)],
                                 "age": [30.0, 40.0, 50.0, 60.0, 70.0], "sex": "F",
                                 "study": ["a", "a", "b", "b", "b"]})
    files = []
    for index, pid in enumerate(participants["participant_id"]):
        files.append(tmp_path / f"{pid}_qc.json")
        files[-1].write_text(json.dumps({"participant_id": pid, "dice": 0.96,
                                         "correlation": 0.6,
                                         "coverage": 0.45 if index >= 2 else 0.9}))
    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    with caplog.at_level("WARNING", logger="brainage.qc"):
        tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)
    assert re.search(r"QC flags sub-02 \(b\): coverage 0\.450 < 0\.7\. Look at its QC figure "
                     r"\S+ \(a cut field of view, or an MRE map's short slab: the image covers "
                     r"too little of the template brain, however well it is registered\)",
                     caplog.text)
    assert "a T1w from another session" not in caplog.text
    assert caplog.text.count("QC: every subject of study") == 1
    assert ("QC: every subject of study b (3) misses the coverage threshold: the study's "
            "acquisition or preprocessing rather than its subjects") in caplog.text


def _passing_qc_files(folder: Path, field: str, values: dict) -> list[Path]:
    """A passing QC JSON per subject of ``values``, with ``field`` set to its value."""
    files = []
    for pid, value in values.items():
        files.append(folder / f"{pid}_qc.json")
        files[-1].write_text(json.dumps({"participant_id": pid, "dice": 0.9,
                                         "correlation": 0.5, "coverage": 0.8, field: value}))
    return files


def test_a_training_cohort_registered_by_different_references_is_warned_about(tmp_path,
                                                                               caplog):
    """A lab missing a few T1w scans trained and evaluated Table 3 on subjects registered by
    their T1w and subjects registered by their stiffness map without a word; a cohort to
    predict with the same mix was warned about (docs/method.md §7: 2.3 years)."""
    from brainage.qc import tabulate_qc

    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
                                 "age": [30.0, 40.0, 50.0, 60.0], "sex": ["F", "M", "F", "M"],
                                 "study": ["s1", "s1", "s2", "s3"]})
    files = _passing_qc_files(tmp_path, "reference_kind", {
        "sub-01": "T1w_brain", "sub-02": "T1w_brain", "sub-03": "stiffness",
        "sub-04": None})  # a QC file of an earlier version: not counted
    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    with caplog.at_level("WARNING", logger="brainage.qc"):
        tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)
    assert re.search(rf"the cohort of {re.escape(str(tmp_path / 'qc.tsv'))}: subjects were "
                     r"registered by different reference images: 2 by T1w_brain, 1 by "
                     r"stiffness \(sub-03\) .*follows the subjects like a site effect\. Give "
                     r"every subject its T1w", caplog.text), caplog.text
    caplog.clear()
    files[2].write_text(json.dumps({"participant_id": "sub-03", "dice": 0.9, "correlation": 0.5,
                                    "coverage": 0.8, "reference_kind": "T1w_brain"}))
    with caplog.at_level("WARNING", logger="brainage.qc"):
        tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)
    assert "different reference images" not in caplog.text


def test_a_cohort_stripped_by_two_tools_is_warned_about(tmp_path, caplog):
    """preprocess.skullstrip: auto takes FreeSurfer where a job's machine has it: a study
    added later on other nodes got the other tool's masks, without a word."""
    from brainage.qc import tabulate_qc

    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
                                 "age": [30.0, 40.0, 50.0, 60.0], "sex": ["F", "M", "F", "M"],
                                 "study": ["s1", "s1", "s2", "s3"]})
    # the routes as strip_skull records them: the program that ran
    routes = {"sub-01": "deepbet", "sub-02": "deepbet", "sub-03": "mri_synthstrip",
              "sub-04": None}
    files = _passing_qc_files(tmp_path, "skullstrip_route", routes)
    minimums = {"min_dice": 0.85, "min_correlation": 0.3, "min_coverage": 0.7}
    with caplog.at_level("WARNING", logger="brainage.qc"):
        tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)
    assert re.search(r"skull-stripped by two tools \(deepbet: 2 \(e\.g\. sub-01, sub-02\); "
                     r"freesurfer: 1 \(e\.g\. sub-03\)\).*Set preprocess\.skullstrip to one "
                     r"tool", caplog.text), caplog.text
    caplog.clear()
    files[2].write_text(json.dumps({"participant_id": "sub-03", "dice": 0.9, "correlation": 0.5,
                                    "coverage": 0.8, "skullstrip_route": "deepbet"}))
    with caplog.at_level("WARNING", logger="brainage.qc"):  # a subject without a T1w is no
        tabulate_qc(files, participants, tmp_path / "qc.tsv", minimums=minimums)  # 2nd tool
    assert "two tools" not in caplog.text


@pytest.mark.parametrize("content", ["{not json", '{"dice": 0.9}', "[1, 2]"])
def test_a_damaged_qc_record_names_its_file(tmp_path, content):
    """The QC table read each subject's JSON with a bare JSONDecodeError or KeyError, naming
    no file."""
    from brainage.qc import read_qc_records

    good = tmp_path / "sub-01_qc.json"
    good.write_text(json.dumps({"participant_id": "sub-01", "dice": 0.9}))
    bad = tmp_path / "sub-02_qc.json"
    bad.write_text(content)
    assert read_qc_records([good])["sub-01"]["dice"] == 0.9
    with pytest.raises(InputError, match=rf"QC file {re.escape(str(bad))} cannot be read"):
        read_qc_records([good, bad])


def test_a_qc_record_copied_from_another_subject_is_named(tmp_path):
    """The QC table keyed each record by the participant id inside it: a file copied from
    sub-01 to sub-02's place gave sub-01 two records (the last one kept) and reported
    sub-02 as having no QC file although Snakemake saw it, naming neither file."""
    from brainage.qc import read_qc_records

    record = {"participant_id": "sub-01", "dice": 0.9, "correlation": 0.5, "coverage": 0.8}
    own = tmp_path / "sub-01_qc.json"
    own.write_text(json.dumps(record))
    copied = tmp_path / "sub-02_qc.json"
    copied.write_text(json.dumps(record))
    with pytest.raises(InputError, match=rf"^QC file {re.escape(str(copied))} is the record "
                                         r"of sub-01, not of sub-02; remove it and run again"):
        read_qc_records([own, copied])
    elsewhere = tmp_path / "again"
    elsewhere.mkdir()
    (elsewhere / "sub-01_qc.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"^QC files .* both hold the record of sub-01"):
        read_qc_records([own, elsewhere / "sub-01_qc.json"])
    assert read_qc_records([own])["sub-01"]["dice"] == 0.9
