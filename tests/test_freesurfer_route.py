"""The FreeSurfer skull-stripping route, without FreeSurfer.

FreeSurfer cannot be installed here, so these tests check the route through the nipype
interfaces' exact command lines and through TEST DOUBLES of the programs
(tests/doubles/mri_*_double.py, put on PATH under the real names, with FREESURFER_HOME
pointing at a folder that holds only a FreeSurfer 7.4.1 build stamp, which is what makes
nipype treat FreeSurfer as installed). The doubles threshold the image; they say nothing about
FreeSurfer's accuracy, only that the pipeline calls it correctly and uses its output.
"""

from __future__ import annotations

import json
import logging
import re
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage.preprocess import PreprocessError, resolve_method, strip_skull
from brainage.preprocess.interfaces import SynthStrip, WatershedSkullStrip

DOUBLES = Path(__file__).resolve().parent / "doubles"


@pytest.fixture
def freesurfer_double(tmp_path, monkeypatch):
    """FreeSurfer's programs on PATH as test doubles; returns the file logging their calls."""
    bin_dir = tmp_path / "fake_freesurfer_bin"
    bin_dir.mkdir()
    for program in ("mri_synthstrip", "mri_watershed"):
        wrapper = bin_dir / program
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" '
                           f'"{DOUBLES / (program + "_double.py")}" "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    home = tmp_path / "freesurfer_home"
    home.mkdir()
    (home / "build-stamp.txt").write_text(FREESURFER_STAMP + "\n")
    # nipype reads FREESURFER_HOME when it is imported, before this fixture ran: point it
    # at the stamp, as a job started with FreeSurfer set up finds it (it then reads
    # $SUBJECTS_DIR for every FreeSurfer interface)
    from nipype.interfaces.freesurfer.base import Info

    monkeypatch.setattr(Info, "version_file", str(home / "build-stamp.txt"))
    monkeypatch.setattr(Info, "_version", None)
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FREESURFER_HOME", str(home))
    # a module that sets FREESURFER_HOME and PATH only, without FreeSurferEnv.sh
    monkeypatch.delenv("SUBJECTS_DIR", raising=False)
    monkeypatch.setenv("DOUBLE_CALLS_LOG", str(calls))
    monkeypatch.setenv("DOUBLE_THREADS_LOG", str(tmp_path / "threads.log"))
    return calls


FREESURFER_STAMP = "freesurfer-linux-ubuntu22_x86_64-7.4.1-20230614-7eb8460"


@pytest.fixture
def no_freesurfer(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("FREESURFER_HOME", raising=False)


@pytest.fixture
def head(tmp_path):
    """A synthetic head: T1w on a 2 mm grid (bright brain ball, dimmer skull shell) and a
    stiffness map on a 3 mm grid of the same space, covering the brain's lower 80 %."""
    t1_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1_affine[:3, 3] = -40
    centre = np.array([0.0, 0.0, 0.0])
    grid = np.indices((41, 41, 41)).reshape(3, -1)
    radius = np.linalg.norm(t1_affine[:3, :3] @ grid + t1_affine[:3, 3:] - centre[:, None],
                            axis=0).reshape(41, 41, 41)
    t1 = np.where(radius < 24, 1000.0, np.where(radius < 32, 300.0, 0.0)).astype(np.float32)
    stiffness_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    stiffness_affine[:3, 3] = -39
    sgrid = np.indices((27, 27, 27)).reshape(3, -1)
    points = stiffness_affine[:3, :3] @ sgrid + stiffness_affine[:3, 3:]
    brain_on_map_grid = (np.linalg.norm(points, axis=0) < 24).reshape(27, 27, 27)
    in_slab = (points[2] < 14).reshape(27, 27, 27)
    stiffness = np.where(brain_on_map_grid & in_slab, 2.8, 0.0).astype(np.float32)
    paths = {"anat": tmp_path / "sub-a_T1w.nii.gz", "stiffness": tmp_path / "sub-a_stiffness.nii.gz"}
    nib.save(nib.Nifti1Image(t1, t1_affine), paths["anat"])
    nib.save(nib.Nifti1Image(stiffness, stiffness_affine), paths["stiffness"])
    paths["expected_mask"] = brain_on_map_grid
    return paths


def _outputs(tmp_path):
    return [tmp_path / "mask.nii.gz", tmp_path / "reference.nii.gz", tmp_path / "info.json"]


def test_synthstrip_interface_command_line(tmp_path):
    """Threads go through OMP_NUM_THREADS, not -t: FreeSurfer 7.3-7.4's mri_synthstrip
    has no -t and exited with code 2 on it, for every subject with a T1w."""
    image = tmp_path / "T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), image)
    strip = SynthStrip(in_file=str(image), mask_file="/out/mask.nii.gz", num_threads=1)
    assert strip.cmdline == f"mri_synthstrip -i {image} -m /out/mask.nii.gz"
    assert strip.inputs.environ["OMP_NUM_THREADS"] == "1"
    strip = SynthStrip(in_file=str(image), mask_file="/out/m.nii.gz", num_threads=2)
    assert strip.inputs.environ["OMP_NUM_THREADS"] == "2"
    strip.inputs.num_threads = 3
    assert strip.inputs.environ["OMP_NUM_THREADS"] == "3"
    watershed = WatershedSkullStrip(in_file=str(image), out_file="/out/brain.nii.gz")
    assert watershed.cmdline == f"mri_watershed {image} /out/brain.nii.gz"


def test_auto_picks_freesurfer_only_when_installed(freesurfer_double, monkeypatch):
    assert resolve_method("auto", "synthstrip") == "freesurfer"
    assert resolve_method("auto", "watershed") == "freesurfer"
    monkeypatch.delenv("FREESURFER_HOME")
    assert resolve_method("auto", "synthstrip") == "deepbet"


def test_skull_stripping_asks_for_synthstrips_memory_where_it_may_run(freesurfer_double,
                                                                      monkeypatch):
    """SynthStrip needs 5.8-7.7 GB for a 1 mm T1w; mri_watershed and deepbet fit in
    resources.preprocess.mem_mb."""
    from brainage.preprocess.skullstrip import SYNTHSTRIP_MEM_MB, strip_skull_memory_mb

    assert strip_skull_memory_mb("auto", "synthstrip", 2000) == SYNTHSTRIP_MEM_MB
    assert strip_skull_memory_mb("auto", "synthstrip", 12000) == 12000  # a larger request
    assert strip_skull_memory_mb("auto", "watershed", 2000) == 2000
    monkeypatch.delenv("FREESURFER_HOME")  # auto: deepbet here
    assert strip_skull_memory_mb("auto", "synthstrip", 2000) == 2000
    assert strip_skull_memory_mb("deepbet", "synthstrip", 2000) == 2000
    assert strip_skull_memory_mb("freesurfer", "synthstrip", 2000) == SYNTHSTRIP_MEM_MB


def test_auto_falls_back_to_deepbet_and_freesurfer_request_fails(no_freesurfer):
    assert resolve_method("auto") == "deepbet"
    assert resolve_method("none") == "none"
    with pytest.raises(PreprocessError, match=r"preprocess\.skullstrip is 'freesurfer' but "
                                              r"FreeSurfer's mri_synthstrip is not usable .*"
                                              r"FREESURFER_HOME: unset"):
        resolve_method("freesurfer", "synthstrip")
    with pytest.raises(ValueError, match="preprocess.freesurfer_tool"):
        resolve_method("auto", "bet")


@pytest.mark.parametrize("freesurfer_major", ["7", "8"])
def test_synthstrip_route_runs_the_program_and_carries_the_mask(freesurfer_double, head,
                                                              tmp_path, caplog, monkeypatch,
                                                              freesurfer_major):
    """Both FreeSurfer 7.3-7.4's and FreeSurfer 8's mri_synthstrip accept the command."""
    monkeypatch.setenv("DOUBLE_FREESURFER_MAJOR", freesurfer_major)
    with caplog.at_level(logging.INFO):
        info = strip_skull(head["stiffness"], *_outputs(tmp_path), anat=head["anat"],
                           method="auto", freesurfer_tool="synthstrip", threads=2, subject="a")
    assert info["route"] == "mri_synthstrip" and info["reference_kind"] == "T1w_brain"
    assert info["tool_version"] == FREESURFER_STAMP  # which FreeSurfer stripped the skull
    assert "with mri_synthstrip (preprocess.skullstrip auto)" in caplog.text
    calls = [json.loads(line) for line in freesurfer_double.read_text().splitlines()]
    assert len(calls) == 1
    program, *arguments = calls[0]
    assert program == "mri_synthstrip"
    assert arguments[:2] == ["-i", str(head["anat"].resolve())]
    assert arguments[2] == "-m" and arguments[3].endswith("/mask.nii.gz")
    assert arguments[4:] == []
    assert (tmp_path / "threads.log").read_text().split() == ['"2"']
    mask_image = nib.load(tmp_path / "mask.nii.gz")
    assert mask_image.shape == (27, 27, 27)  # on the stiffness grid, not the T1w's
    mask = np.asarray(mask_image.dataobj) > 0
    expected = head["expected_mask"]
    assert 2 * (mask & expected).sum() / (mask.sum() + expected.sum()) > 0.95
    # the volume of the mask on the stiffness grid (3 mm voxels), not the T1w's (2 mm)
    assert info["mask_volume_ml"] == round(mask.sum() * 0.027, 2)
    reference = nib.load(tmp_path / "reference.nii.gz").get_fdata()
    assert reference.max() == 1000.0 and not np.any(reference == 300.0)  # skull removed


@pytest.mark.parametrize("subjects_dir", [None, "/nonexistent/subjects"])
def test_watershed_route(freesurfer_double, head, tmp_path, monkeypatch, subjects_dir):
    """mri_watershed runs whatever $SUBJECTS_DIR says. nipype reads it wherever FreeSurfer
    is installed and stopped with a bare KeyError when it was unset, or a TraitError when
    it named a folder missing on the node, before running anything."""
    if subjects_dir:
        monkeypatch.setenv("SUBJECTS_DIR", subjects_dir)
    info = strip_skull(head["stiffness"], *_outputs(tmp_path), anat=head["anat"],
                       method="freesurfer", freesurfer_tool="watershed", subject="a")
    assert info["route"] == "mri_watershed" and info["tool_version"] == FREESURFER_STAMP
    program, *arguments = json.loads(freesurfer_double.read_text().splitlines()[0])
    assert program == "mri_watershed"
    assert arguments[0] == str(head["anat"].resolve()) and arguments[1].endswith("brain.nii.gz")
    mask = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj) > 0
    expected = head["expected_mask"]
    assert 2 * (mask & expected).sum() / (mask.sum() + expected.sum()) > 0.95


def test_empty_freesurfer_mask_names_subject_and_file(freesurfer_double, head, tmp_path,
                                                     monkeypatch):
    monkeypatch.setenv("DOUBLE_THRESHOLD", "2.0")  # the double finds no brain
    with pytest.raises(PreprocessError, match=r"sub-a: skull stripping \(mri_synthstrip\) of "
                                              r".*sub-a_T1w\.nii\.gz returned an empty brain "
                                              r"mask"):
        strip_skull(head["stiffness"], *_outputs(tmp_path), anat=head["anat"],
                    method="freesurfer", subject="a")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_a_mask_on_another_grid_of_the_same_shape_is_refused(freesurfer_double, head,
                                                             tmp_path, monkeypatch):
    """The T1w's mask is read on the T1w's voxels: a tool's mask stored flipped (a cubic
    T1w's keeps its shape) would have put the brain on the other side, unseen."""
    monkeypatch.setenv("DOUBLE_MASK_REORIENTED", "1")
    with pytest.raises(PreprocessError, match=r"sub-a: mri_synthstrip wrote a mask of shape "
                                              r"\(41, 41, 41\) with affine"):
        strip_skull(head["stiffness"], *_outputs(tmp_path), anat=head["anat"],
                    method="freesurfer", subject="a")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_failing_freesurfer_program_is_reported_with_its_exit_and_error(freesurfer_double, head,
                                                                      tmp_path, monkeypatch):
    """nipype does not raise when a program exits non-zero: it then missed the output file,
    and the error named the mask in the (deleted) temporary folder, not what FreeSurfer
    said."""
    monkeypatch.setenv("DOUBLE_ERROR", "ERROR: cannot find model weights synthstrip.1.pt")
    with pytest.raises(PreprocessError) as raised:
        strip_skull(head["stiffness"], *_outputs(tmp_path), anat=head["anat"],
                    method="freesurfer", subject="a")
    message = str(raised.value)
    assert re.search(r"sub-a: skull stripping \(mri_synthstrip\) of .*sub-a_T1w\.nii\.gz "
                     r"failed: mri_synthstrip exited with code 1: ERROR: cannot find model "
                     r"weights synthstrip\.1\.pt\. Check", message), message
    assert ".strip_skull-" not in message
    assert not any(path.exists() for path in _outputs(tmp_path))
    assert not list(tmp_path.glob(".strip_skull-*"))


@pytest.mark.parametrize(("failure", "hint"), [
    ({"DOUBLE_ERROR": "error: unrecognized arguments: -t 1", "DOUBLE_ERROR_EXIT": "2"},
     r"exited with code 2: error: unrecognized arguments: -t 1\. mri_synthstrip refused the "
     r"options it was given \(exit code 2, a usage error\): check the FreeSurfer version"),
    ({"DOUBLE_KILLED": "1"},
     r"mri_synthstrip was killed \(exit code 137\): usually the job ran out of memory, at "
     r"its memory limit, and the image is not at fault\. .*raise resources\.preprocess\.mem_mb"),
])
def test_a_failing_freesurfer_program_gets_the_hint_of_its_failure(freesurfer_double, head,
                                                                  tmp_path, monkeypatch,
                                                                  failure, hint):
    """A usage error or a kill is not the image's fault: every non-zero exit said to check
    the image."""
    for variable, value in failure.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(PreprocessError, match=hint) as raised:
        strip_skull(head["stiffness"], *_outputs(tmp_path), anat=head["anat"],
                    method="freesurfer", subject="a")
    assert "Check the image" not in str(raised.value)
    assert not any(path.exists() for path in _outputs(tmp_path))


@pytest.mark.parametrize(("missing", "warning"), [
    ("FREESURFER_HOME", r"mri_synthstrip is on PATH \(.*\) but FREESURFER_HOME is unset, so "
                        r"deepbet runs\. To use FreeSurfer, source its SetUpFreeSurfer\.sh"),
    ("PATH", r"FREESURFER_HOME is set \(.*\) but mri_synthstrip is not on PATH, so deepbet "
             r"runs\. FreeSurfer before 7\.3 has no mri_synthstrip: set "
             r"preprocess\.freesurfer_tool: watershed.* source FreeSurfer's "
             r"SetUpFreeSurfer\.sh in the job's environment"),
])
def test_auto_says_why_it_passes_over_a_freesurfer_half_there(freesurfer_double, monkeypatch,
                                                              caplog, missing, warning):
    if missing == "PATH":
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
    else:
        monkeypatch.delenv(missing)
    with caplog.at_level(logging.WARNING):
        assert resolve_method("auto", "synthstrip") == "deepbet"
    assert re.search(warning, caplog.text), caplog.text
    if missing == "PATH":  # with watershed asked for already, no advice to ask for it
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert resolve_method("auto", "watershed") == "deepbet"
        assert "mri_watershed is not on PATH" in caplog.text
        assert "set preprocess.freesurfer_tool: watershed" not in caplog.text


def test_auto_without_any_freesurfer_warns_of_nothing(no_freesurfer, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_method("auto", "synthstrip") == "deepbet"
    assert caplog.text == ""


def test_freesurfer_requested_but_missing_stops_before_work(no_freesurfer, head, tmp_path):
    with pytest.raises(PreprocessError, match=r"Source FreeSurfer's SetUpFreeSurfer\.sh"):
        strip_skull(head["stiffness"], *_outputs(tmp_path), anat=head["anat"],
                    method="freesurfer", subject="a")


def test_a_subject_without_a_t1w_needs_no_freesurfer_where_it_is_asked_for(no_freesurfer, head,
                                                                          tmp_path):
    """docs/method.md §1: a subject without an anatomical image gets its map's support
    mask whatever the route. With ``freesurfer`` asked for and absent such a subject was
    refused for want of a tool it does not use (an MRE-only cohort could not be predicted
    with a FreeSurfer-trained bundle)."""
    info = strip_skull(head["stiffness"], *_outputs(tmp_path), anat=None, method="freesurfer",
                       subject="a")
    assert (info["route"], info["mask_source"]) == ("none", "stiffness_support")
    assert info["skullstrip"] == "freesurfer"
