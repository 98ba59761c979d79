"""The preprocessing folder is a BIDS-Derivatives dataset that the BIDS validator accepts.

Two simulated subjects go through the real chain (brainage.preprocess.chain.run_subject,
the functions the rules call; stiffness maps only, skull stripping "none", to be quick),
the folder is described (brainage.preprocess.derivatives), and the schema-based BIDS
validator (PyPI bids-validator-deno, a test dependency; it runs offline with its bundled
schema) must report no error. Skipped where the validator is not installed, except in CI.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from bids_validator import assert_bids_valid
from brainage import brainage_version
from brainage.inputs import subject_inputs
from brainage.logs import also_logging_to
from brainage.paths import TRAINING_PREPROC, Layout
from brainage.preprocess.chain import run_subject, run_subjects
from brainage.preprocess.derivatives import describe_preprocessing

FAST = {"skullstrip": "none", "freesurfer_tool": "synthstrip", "n4": False,
        "deterministic": True, "threads": 1, "max_nan_fraction": 0.01}


def _template_in(layout: Layout, template_files) -> dict[str, str]:
    template = {"template_t1": layout.template("T1w"),
                "template_mask": layout.template("brain_mask")}
    for kind, source in (("template_t1", "t1"), ("template_mask", "mask")):
        Path(template[kind]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template_files[source], template[kind])
    return template


@pytest.fixture(scope="module")
def derivatives(tmp_path_factory, simulated_cohort, template_files):
    root, truth = simulated_cohort
    out = tmp_path_factory.mktemp("derivatives")
    layout = Layout(results=str(out))
    template = _template_in(layout, template_files)
    for participant_id in truth["participant_id"][:2]:
        label = participant_id[len("sub-"):]
        run_subject(subject_inputs(root, label), layout, label, preproc=TRAINING_PREPROC,
                    preprocess=FAST, **template)
    describe_preprocessing(layout.preproc_dir(), space=layout.space,
                           template_shape=(99, 117, 95), source=str(root),
                           version=brainage_version(), template=True)
    return Path(layout.preproc_dir())


def test_description_names_the_pipeline_and_the_template_space(derivatives):
    description = json.loads((derivatives / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0] == {
        "Name": "brainage", "Version": brainage_version(),
        "Description": description["GeneratedBy"][0]["Description"]}
    registered = sorted(derivatives.glob("sub-*/anat/*_desc-preproc_stiffness.nii.gz"))
    assert len(registered) == 2
    assert all("_space-MNI152NLin2009aSym_res-2_" in path.name for path in registered)
    assert (derivatives / "tpl-MNI152NLin2009aSym"
            / "tpl-MNI152NLin2009aSym_res-2_T1w.nii.gz").is_file()
    # the mask shares the T1's grid but is not made from it (nilearn, or the user, gives it)
    mask = json.loads((derivatives / "tpl-MNI152NLin2009aSym"
                       / "tpl-MNI152NLin2009aSym_res-2_desc-brain_mask.json").read_text())
    assert mask["SpatialReference"] == ("bids::tpl-MNI152NLin2009aSym/tpl-MNI152NLin2009aSym"
                                        "_res-2_T1w.nii.gz") and "Sources" not in mask


def test_the_description_says_what_the_folder_holds_and_what_was_done(tmp_path):
    """The dataset description named stiffness maps and N4 whatever the cohort and the
    settings: a pretraining cohort's folder holds T1w images only, and preprocess.n4 false
    corrects nothing, as the README beside it said (found by a review)."""
    def described(**options):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        describe_preprocessing(folder, space="MNI152NLin2009aSym", template_shape=(99, 117, 95),
                               source=str(tmp_path), version="1", **options)
        return json.loads((folder / "dataset_description.json").read_text())

    training = described(modalities=["stiffness", "damping_ratio", "T1w"])
    assert training["Name"] == ("brainage: preprocessed stiffness maps, damping-ratio maps "
                                "and T1w images")
    assert training["GeneratedBy"][0]["Description"].startswith(
        "brain masks (by skull stripping unless preprocess.skullstrip is none), N4 bias "
        "correction and affine registration")
    pretraining = described(modalities=["T1w"], n4=False)
    assert pretraining["Name"] == "brainage: preprocessed T1w images"
    assert pretraining["GeneratedBy"][0]["Description"] == (
        "brain masks (by skull stripping unless preprocess.skullstrip is none), no bias "
        "correction (preprocess.n4 false), and affine registration to MNI152NLin2009aSym at "
        "2 mm")


def test_the_folder_names_its_source_wherever_it_is_read_from(tmp_path, monkeypatch):
    """`predict run --dataset ../cohort` wrote "Derived from ../cohort" into the folder's
    README, relative to where the command ran, beside the description's absolute URL."""
    (tmp_path / "cohort").mkdir()
    monkeypatch.chdir(tmp_path / "cohort")
    describe_preprocessing(tmp_path / "out", space="MNI152NLin2009aSym",
                           template_shape=(99, 117, 95), source="../cohort", version="1",
                           modalities=["T1w"])
    cohort = (tmp_path / "cohort").resolve()
    readme = (tmp_path / "out" / "README.md").read_text()
    assert f"Derived from {cohort} by brainage 1." in readme
    description = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert description["DatasetLinks"]["raw"] == cohort.as_uri()
    # a root reached through a link (current -> a release) is named by the release read,
    # in both files
    (tmp_path / "current").symlink_to(tmp_path / "cohort")
    describe_preprocessing(tmp_path / "out", space="MNI152NLin2009aSym",
                           template_shape=(99, 117, 95), source="../current", version="1",
                           modalities=["T1w"])
    assert f"Derived from {cohort} by" in (tmp_path / "out" / "README.md").read_text()
    description = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert description["SourceDatasets"] == [{"URL": cohort.as_uri()}]


def test_subjects_in_parallel_processes_give_the_same_files(derivatives, simulated_cohort,
                                                            template_files, tmp_path, caplog):
    """`predict run --jobs 2`: each subject in a spawned process of its own; with
    deterministic preprocessing every file equals the one-subject-at-a-time run's."""
    import nibabel as nib
    import numpy as np

    root, truth = simulated_cohort
    layout = Layout(results=str(tmp_path))
    labels = [participant_id[len("sub-"):] for participant_id in truth["participant_id"][:2]]
    caplog.set_level("INFO")  # the level the processes are given, as predict run's
    with also_logging_to(tmp_path / "run.log", heading="the run") as run_log:
        done = run_subjects({label: subject_inputs(root, label) for label in labels}, layout,
                            preproc=TRAINING_PREPROC, preprocess=FAST, jobs=2,
                            **_template_in(layout, template_files))
    assert list(done) == labels
    # the processes write to the run's log too (predict run's <output>/logs/predict_run.log):
    # a subject's warnings outlive the console
    logged = run_log.read_text()
    assert logged.startswith("===== the run (")
    for label in labels:
        assert re.search(rf"INFO brainage\.\S+: subject sub-{label}: Dice", logged), logged
    for label in labels:
        for key, path in done[label].items():
            serial = derivatives / Path(path).relative_to(layout.preproc_dir())
            if path.endswith(".nii.gz"):
                image, expected = nib.load(path), nib.load(serial)
                np.testing.assert_array_equal(np.asanyarray(image.dataobj),
                                              np.asanyarray(expected.dataobj), err_msg=key)
                np.testing.assert_array_equal(image.affine, expected.affine)
            else:
                assert Path(path).read_bytes() == serial.read_bytes(), key


@pytest.mark.slow
def test_a_failing_subject_stops_the_parallel_run_and_the_others_keep_their_files(
        simulated_cohort, template_files, tmp_path):
    from brainage.inputs import InputError

    root, truth = simulated_cohort
    good = truth["participant_id"][0][len("sub-"):]
    broken = tmp_path / "sub-broken_stiffness.nii.gz"
    broken.write_bytes(b"not an image")
    layout = Layout(results=str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"sub-broken: stiffness map .*sub-broken_stiffness"):
        run_subjects({"broken": {"stiffness": str(broken)}, good: subject_inputs(root, good)},
                     layout, preproc=TRAINING_PREPROC, preprocess=FAST, jobs=2,
                     **_template_in(layout, template_files))
    assert Path(layout.subject_qc(good, ".json")).is_file()


def _killed_subject(files, layout, label, **settings):
    """Subject b finishes at once, a is slow, c's worker is killed as the out-of-memory
    killer does (module level: the spawned worker imports it by name)."""
    import os
    import signal
    import time

    if label == "a":
        time.sleep(30)
    if label == "c":
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    return {}


def test_a_killed_worker_is_named_with_what_to_do(tmp_path, monkeypatch):
    """`predict run --jobs 2` with a worker killed for memory stopped with a
    BrokenProcessPool traceback naming no subject and no remedy."""
    from brainage.preprocess import chain

    monkeypatch.setattr(chain, "run_subject", _killed_subject)
    with pytest.raises(chain.WorkerKilledError,
                       match=r"cohort c: a preprocessing process was killed \(by the "
                             r"out-of-memory killer, or a signal\); 1 of 3 subjects were done, "
                             r"not sub-a, sub-c\. Run the same command again .* with a lower "
                             r"--jobs if memory ran out\."):
        run_subjects({"a": {}, "b": {}, "c": {}}, Layout(results=str(tmp_path)),
                     preproc=TRAINING_PREPROC, preprocess=FAST, template_t1="t1.nii.gz",
                     template_mask="mask.nii.gz", jobs=2, cohort="c")


def test_without_a_writable_dev_shm_the_subjects_run_one_at_a_time(tmp_path, monkeypatch,
                                                                    caplog):
    """`predict run --jobs 2` in a container whose /dev/shm is read-only stopped with a bare
    traceback ending in 'OSError: [Errno 30] Read-only file system' (the pool's semaphores),
    which named neither /dev/shm nor --jobs."""
    from brainage.preprocess import chain

    def no_semaphores(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    done = []
    monkeypatch.setattr(chain, "ProcessPoolExecutor", no_semaphores)
    monkeypatch.setattr(chain, "run_subject",
                        lambda files, layout, label, **settings: done.append(label) or {})
    with caplog.at_level(logging.WARNING, logger="brainage.preprocess.chain"):
        result = run_subjects({"a": {}, "b": {}, "c": {}}, Layout(results=str(tmp_path)),
                              preproc=TRAINING_PREPROC, preprocess=FAST,
                              template_t1="t1.nii.gz", template_mask="mask.nii.gz", jobs=2,
                              cohort="c")
    assert done == ["a", "b", "c"] and list(result) == ["a", "b", "c"]
    assert ("cohort c: 2 subjects at a time need a writable /dev/shm for the processes' "
            "semaphores ([Errno 30] Read-only file system); preprocessing one subject at a "
            "time instead") in caplog.text, caplog.text


def test_default_space_names_nilearns_template_symmetric():
    """nilearn's MNI152 is ICBM 2009a *symmetric* (its docstring says asymmetrical): the file
    it loads is McGill's ``..._tal_nlin_sym_09a`` and equals its mirror image about x = 0
    voxel for voxel, so its TemplateFlow identifier is MNI152NLin2009aSym."""
    import numpy as np
    from nilearn import datasets

    from brainage.paths import DEFAULT_SPACE

    assert DEFAULT_SPACE == "MNI152NLin2009aSym"
    template = datasets.load_mni152_template(resolution=1)
    assert "_tal_nlin_sym_09a" in Path(datasets.MNI152_FILE_PATH).name
    data, affine = np.asarray(template.dataobj), template.affine
    assert np.allclose(affine[:3, :3], np.eye(3))
    midline = -affine[0, 3]  # the x index of world x = 0
    assert float(midline).is_integer() and 2 * midline == data.shape[0] - 1
    assert np.array_equal(data, data[::-1])
    # the comparison can fail: a mirror plane half a voxel off, or front-back, is not one
    assert not np.array_equal(data[1:], data[:0:-1])
    assert not np.array_equal(data, data[:, ::-1])


def test_bids_validator_accepts_the_derivative_dataset(derivatives):
    assert_bids_valid(derivatives)


def test_every_mre_map_is_ignored_by_the_validator():
    """BIDS has no suffix for any MRE map, not only the stiffness."""
    from brainage.modalities import MODALITIES
    from brainage.preprocess.derivatives import BIDS_IGNORE

    for name, kind in MODALITIES.items():
        if kind.is_mre:
            assert f"*_{name}.nii.gz" in BIDS_IGNORE, name


@pytest.mark.slow
def test_bids_validator_accepts_the_default_modalities(simulated_cohort, template_files,
                                                       tmp_path):
    """config.yaml's dataset.modalities [stiffness, damping_ratio, T1w]: the damping-ratio
    maps and the registered T1w channel (a derivative T1w with a res entity: its sidecar
    needs SkullStripped and Resolution) must pass the validator too. They failed it."""
    import nibabel as nib
    import numpy as np

    root, truth = simulated_cohort
    label = truth["participant_id"][0][len("sub-"):]
    dataset = tmp_path / "dataset"
    for folder, name in (("mre", "stiffness"), ("anat", "T1w")):
        (dataset / f"sub-{label}" / folder).mkdir(parents=True)
        shutil.copyfile(root / f"sub-{label}" / folder / f"sub-{label}_{name}.nii.gz",
                        dataset / f"sub-{label}" / folder / f"sub-{label}_{name}.nii.gz")
    stiffness = nib.load(dataset / f"sub-{label}" / "mre" / f"sub-{label}_stiffness.nii.gz")
    kpa = np.nan_to_num(stiffness.get_fdata(dtype=np.float32))
    nib.save(nib.Nifti1Image(np.where(kpa > 0, 0.05 + 0.04 * kpa, 0).astype(np.float32),
                             stiffness.affine),
             dataset / f"sub-{label}" / "mre" / f"sub-{label}_damping_ratio.nii.gz")
    modalities = ("stiffness", "damping_ratio", "T1w")
    layout = Layout(results=str(tmp_path / "results"))
    run_subject(subject_inputs(dataset, label, modalities), layout, label,
                preproc=TRAINING_PREPROC, preprocess=FAST, modalities=modalities,
                **_template_in(layout, template_files))
    describe_preprocessing(layout.preproc_dir(), space=layout.space,
                           template_shape=(99, 117, 95), source=str(dataset),
                           version=brainage_version(), template=True, modalities=modalities)
    assert_bids_valid(Path(layout.preproc_dir()))
    # every file the README names is a file of the subject, and every image is named
    readme = (Path(layout.preproc_dir()) / "README.md").read_text()
    named = {name.split(".")[0] for name in re.findall(r"`((?:space|desc|from)-[^`]+)`", readme)}
    written = {path.name[len(f"sub-{label}_"):].split(".")[0]
               for path in (Path(layout.preproc_dir()) / f"sub-{label}" / "anat").iterdir()}
    assert named == written, (named ^ written)


def test_the_readme_says_what_was_done_to_each_map(tmp_path):
    # the desc-biascorr files keep their name with preprocess.n4 false: the README says so
    for n4, expected in ((True, "N4-corrected"), (False, "not bias-corrected")):
        describe_preprocessing(tmp_path, space="MNI152NLin2009aSym", template_shape=(99, 117, 95),
                               source=str(tmp_path), version="0", n4=n4,
                               modalities=("stiffness", "damping_ratio"))
        readme = (tmp_path / "README.md").read_text()
        assert f"`desc-biascorr_stiffness`: the stiffness map (kPa) cleaned (no data = 0) and " \
               f"{expected}" in readme
        assert "`desc-clean_damping_ratio`: the damping-ratio map (1)" in readme
        assert "T1w" not in readme
        assert ("`desc-brain_reference` and its sidecar: the registration reference (the "
                "stiffness map)") in readme
    # the transform in the direction a reader applies it (found by a review: "template to
    # native" sent readers to apply it backwards)
    assert ("`from-native_to-MNI152NLin2009aSym_mode-image_xfm.mat`: the ANTs affine that "
            "brings native images into MNI152NLin2009aSym") in readme
    # a T1w-only cohort (pretraining) has no MRE map grid to speak of
    describe_preprocessing(tmp_path, space="MNI152NLin2009aSym", template_shape=(99, 117, 95),
                           source=str(tmp_path), version="0", n4=True, modalities=("T1w",))
    readme = (tmp_path / "README.md").read_text()
    assert "zero outside the warped brain mask" in readme
    assert "MRE" not in readme and "elastography" not in readme


def test_template_space_sidecars_give_the_template_image_as_spatial_reference(tmp_path):
    """SpatialReference is the reference image (a BIDS URI, or a URI), not a space label.
    The registered mask's sidecar said "MNI152NLin2009aSym" (no such file), and the
    registered T1w's had none, which the validator requires for a template.space outside
    TemplateFlow's list (a user's own template): that folder failed the validator."""
    import nibabel as nib
    import numpy as np

    from brainage.preprocess.derivatives import describe_mask, describe_registered_t1w

    space = "MyLabTemplate"
    layout = Layout(results=str(tmp_path / "results"), space=space)
    root = Path(layout.preproc_dir())
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = Path(layout.subject_mni("01", "brain", "mask"))
    t1w = Path(layout.subject_mni("01", "preproc", "T1w"))
    template_mask = Path(layout.template("brain_mask"))
    for image, dtype in ((mask, np.uint8), (t1w, np.float32), (template_mask, np.uint8),
                         (Path(layout.template("T1w")), np.float32)):
        image.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), dtype), grid), image)
    describe_mask(mask, template_mask=template_mask)
    describe_registered_t1w(t1w, template_mask=template_mask)
    expected = f"bids::tpl-{space}/tpl-{space}_res-2_desc-brain_mask.nii.gz"
    for image in (mask, t1w):
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SpatialReference"] == expected, image.name
    # the T1w channel is zero outside the warped brain mask: skull-stripped on every route
    sidecar = json.loads(t1w.with_name(t1w.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["SkullStripped"] is True
    assert sidecar["Resolution"] == {"2": f"2 mm isotropic grid of the {space} template as the "
                                          f"pipeline prepares it (4 x 4 x 4 voxels)"}
    describe_preprocessing(root, space=space, template_shape=(4, 4, 4), source=str(tmp_path),
                           version="0", template=True, modalities=("stiffness", "T1w"))
    assert_bids_valid(root)
    # a new cohort's folder registers to the training cohort's template: its file URI
    other = tmp_path / "cohort" / "sub-01" / "anat" / mask.name
    other.parent.mkdir(parents=True)
    shutil.copyfile(mask, other)
    describe_mask(other, template_mask=template_mask)
    sidecar = json.loads(other.with_name(other.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["SpatialReference"] == template_mask.resolve().as_uri()


def test_a_deleted_output_is_made_again_on_the_next_run(tmp_path, monkeypatch):
    """A rerun after deleting one subject's registered map (by hand, or a clean-up of
    large files) skipped every step, because each step's marker file was still there, and
    then failed reading the missing map ('not a readable NIfTI file ... Re-export it').
    The step that writes it, and the steps after it, are done again."""
    from brainage.preprocess import chain

    done = []

    def fake_step(step, files, inputs, **options):
        done.append(step)
        for path in files.values():  # every step "writes" every file: simplest fake
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(step)

    monkeypatch.setattr(chain, "run_step", fake_step)
    for name in ("stiffness.nii.gz", "t1.nii.gz", "mask.nii.gz"):
        (tmp_path / name).write_text(name)
    preprocess = {"skullstrip": "deepbet", "freesurfer_tool": "synthstrip", "n4": True,
                  "deterministic": True, "threads": 1, "max_nan_fraction": 0.01}
    arguments = dict(preproc=TRAINING_PREPROC, preprocess=preprocess,
                     template_t1=str(tmp_path / "t1.nii.gz"),
                     template_mask=str(tmp_path / "mask.nii.gz"), modalities=["stiffness"])
    inputs = {"stiffness": str(tmp_path / "stiffness.nii.gz")}
    layout = Layout(results=str(tmp_path / "out"))
    files = run_subject(inputs, layout, "01", **arguments)
    assert done == list(chain.STEPS)
    done.clear()
    run_subject(inputs, layout, "01", **arguments)
    assert done == []  # all there: nothing to do
    Path(files["registered_stiffness"]).unlink()
    run_subject(inputs, layout, "01", **arguments)
    assert done == ["register_to_template", "compute_qc"]
    assert Path(files["registered_stiffness"]).is_file()
