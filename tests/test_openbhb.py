"""The OpenBHB reader: the release's table and split, resampling onto our grid, and the
errors for a release that is incomplete or does not match itself."""

from __future__ import annotations

import re
import textwrap
import zlib

import numpy as np
import pandas as pd
import pytest

from brainage.inputs import InputError
from brainage.openbhb import (
    QUASIRAW_AFFINE,
    QUASIRAW_SHAPE,
    Grid,
    Resampler,
    bids_label,
    read_release,
    write_pretraining_split,
)
from openbhb_fixture import SMALL_SHAPE, array_path, small_affine, write_openbhb_release


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "openBHB"
    written = write_openbhb_release(root, n_train=5, n_validation=4)
    return root, written


# -- the table and the split -------------------------------------------------------------------

def test_reads_ids_ages_sites_and_the_official_split(release):
    root, written = release
    result = read_release(root)
    table = result.table.set_index("openbhb_id")
    assert sorted(table.index) == sorted(written["participant_id"])
    for row in written.itertuples(index=False):
        ours = table.loc[row.participant_id]
        assert ours["participant_id"] == f"sub-{row.participant_id}"
        assert ours["age"] == pytest.approx(float(row.age))
        assert ours["study"] == f"site{int(float(row.site))}"
        assert ours["sex"] == {"male": "M", "female": "F"}[row.sex]
        assert ours["subset"] == ("train" if row.split == "train" else "validation")
        assert ours["openbhb_split"] == row.split and ours["openbhb_study"] == row.study
        assert ours["siteXacq"] == row.siteXacq and ours["tiv"] == row.tiv
    assert (result.table["subset"] == "train").sum() == 5
    assert set(result.table["openbhb_split"]) == {"train", "internal_test", "external_test"}
    assert result.table["age"].dtype == float
    # each row's file is the one the release keeps for that scan
    for pid, split, path in zip(result.table["openbhb_id"], result.table["openbhb_split"],
                                result.files):
        assert path == array_path(root, pid, split)
    assert result.grid_source.endswith("quasiraw_space-MNI152_desc-brain_T1w.nii.gz")
    assert result.grid.shape == SMALL_SHAPE
    np.testing.assert_allclose(result.grid.affine, small_affine(SMALL_SHAPE))


@pytest.mark.parametrize("validation, kept", [("both", {"internal_test", "external_test"}),
                                              ("internal", {"internal_test"}),
                                              ("external", {"external_test"})])
def test_validation_option_chooses_the_official_subsets(release, validation, kept):
    root, written = release
    table = read_release(root, validation=validation).table
    validation_rows = table[table["subset"] == "validation"]
    assert set(validation_rows["openbhb_split"]) == kept
    expected = written[written["split"].isin(kept)]["participant_id"]
    assert sorted(validation_rows["openbhb_id"]) == sorted(expected)
    assert (table["subset"] == "train").sum() == 5
    # rows are numbered as load(row) and files[row] take them, with scans left out too
    assert list(table.index) == list(range(len(table)))


def test_site_column_option_and_bad_choices(release):
    root, written = release
    table = read_release(root, site_column="siteXacq").table.set_index("openbhb_id")
    for row in written.itertuples(index=False):
        assert table.loc[row.participant_id, "study"] == f"siteXacq{row.siteXacq}"
    with pytest.raises(ValueError, match="validation"):
        read_release(root, validation="private")
    with pytest.raises(ValueError, match="site_column"):
        read_release(root, site_column="study")


def test_ids_with_other_characters_map_to_bids_labels(tmp_path):
    ids = ["100053248969", "ab_12-3", "ab12-3_", "x.9"]
    write_openbhb_release(tmp_path, n_train=2, n_validation=2, ids=ids)
    table = read_release(tmp_path).table.set_index("openbhb_id")
    assert table.loc["100053248969", "participant_id"] == "sub-100053248969"
    labels = table["participant_id"].str[len("sub-"):]
    assert labels.str.fullmatch(r"[A-Za-z0-9]+").all()
    assert labels.is_unique  # "ab_12-3" and "ab12-3_" differ only in punctuation
    assert table.loc["ab_12-3", "participant_id"] == f"sub-{bids_label('ab_12-3')}"
    assert bids_label("ab_12-3") == bids_label("ab_12-3") != bids_label("ab12-3_")
    assert bids_label("ab_12-3").startswith("ab123x")


def test_ids_that_map_to_the_same_label_are_refused(tmp_path):
    """An id that already is a label can equal another id's label (letters, digits, x and
    its CRC32): two scans would share one participant_id."""
    ids = ["a_b", f"abx{zlib.crc32(b'a_b'):08x}", "100053248969", "100053248970"]
    write_openbhb_release(tmp_path, n_train=2, n_validation=2, ids=ids)
    with pytest.raises(InputError, match="map to the same BIDS label") as error:
        read_release(tmp_path)
    assert "a_b" in str(error.value) and ids[1] in str(error.value)


def test_sex_codes_any_case_and_values_padded_with_spaces(release):
    """``male``/``female`` become M/F whatever their case, other codes stay as written;
    spaces around a value (a hand-edited table) are not part of it."""
    root, written = release
    table = written.copy()
    table.loc[0, "sex"], table.loc[1, "sex"], table.loc[2, "sex"] = "Female", "MALE", "other"
    table = table.apply(lambda column: " " + column + " ")
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    ours = read_release(root).table
    assert list(ours["openbhb_id"]) == list(written["participant_id"])
    assert list(ours["sex"][:4]) == ["F", "M", "other", "F"]
    assert list(ours["subset"]) == ["train"] * 5 + ["validation"] * 4
    np.testing.assert_allclose(ours["age"], written["age"].astype(float))
    assert list(ours["study"]) == [f"site{int(float(site))}" for site in written["site"]]


def test_the_configuration_in_the_module_docstring_validates(tmp_path):
    """The module docstring shows the configuration of an OpenBHB pretraining run; a user
    copying it (run name and root filled in) must get a config the schema accepts."""
    import yaml

    import brainage.openbhb
    from brainage.config import validate_config

    doc = brainage.openbhb.__doc__
    block = doc[doc.index("defaults shown)::"):].split("::", 1)[1]
    block = block.split("\n\n")[1]  # the indented block after the blank line
    text = block.replace("<run>", "openbhb").replace("root: null", f"root: {tmp_path}")
    config = validate_config(yaml.safe_load(textwrap.dedent(text)))
    source = config["pretrain"]["openbhb"]["source"]
    assert source["kind"] == "openbhb" and source["openbhb_validation"] == "both"


# -- streaming and resampling ------------------------------------------------------------------

def test_identity_grid_returns_the_arrays_unchanged(release):
    root, _ = release
    result = read_release(root)
    for method in ("area", "linear", "auto"):
        resample = Resampler(result.grid, result.grid, method=method)
        for row in range(len(result)):
            volume = resample(result.load(row))
            assert volume.dtype == np.float32 and volume.shape == SMALL_SHAPE
            written = np.load(result.files[row])
            assert written.shape == (1, 1) + SMALL_SHAPE
            np.testing.assert_array_equal(volume, written[0, 0].astype(np.float32))


def axis_centres(grid: Grid) -> list[np.ndarray]:
    """World (MNI mm) coordinate of the voxel centres along each axis of an axis-aligned grid."""
    matrix = grid.affine[:3, :3]
    assert np.allclose(matrix, np.diag(np.diag(matrix)))
    return [matrix[axis, axis] * np.arange(size) + grid.affine[axis, 3]
            for axis, size in enumerate(grid.shape)]


def cube_volume(grid: Grid, low_mm, high_mm) -> np.ndarray:
    """1 at voxel centres inside the box [low, high] (MNI mm, inclusive), else 0."""
    inside = [(c >= low - 1e-6) & (c <= high + 1e-6) for c, low, high in
              zip(axis_centres(grid), low_mm, high_mm)]
    return np.einsum("i,j,k->ijk", *inside).astype(np.float32)


def test_a_cube_at_known_mni_coordinates_lands_on_the_right_2mm_voxels():
    """The release's real grid (x flipped) onto nilearn's MNI152 2009a 2 mm template grid."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    target = Grid(template.shape, template.affine)
    source = Grid(QUASIRAW_SHAPE, QUASIRAW_AFFINE)
    low, high = np.array([-34.0, 10.0, 20.0]), np.array([-20.0, 22.0, 30.0])  # left hemisphere
    volume = cube_volume(source, low, high)
    area = Resampler(source, target)
    assert area.method == "area"
    result = area(volume)
    assert result.shape == template.shape and result.dtype == np.float32
    # The 2 mm voxel centres fall on 1 mm voxel centres: each 2 mm voxel averages the
    # 1 mm voxels at its centre (weight 1/2) and its two neighbours (1/4 each), per axis.
    profiles = []
    for c, lo, hi in zip(axis_centres(target), low, high):
        inside = [((c + d >= lo) & (c + d <= hi)).astype(float) for d in (-1, 0, 1)]
        profiles.append(0.25 * inside[0] + 0.5 * inside[1] + 0.25 * inside[2])
    expected = np.einsum("i,j,k->ijk", *profiles)
    np.testing.assert_allclose(result, expected, atol=1e-6)
    # in voxel terms (x = 2i - 98, y = 2j - 134, z = 2k - 72 mm), the voxels wholly inside:
    full = np.argwhere(result == 1.0)
    assert full.min(axis=0).tolist() == [33, 73, 47] and full.max(axis=0).tolist() == [38, 77, 50]
    x_mm = axis_centres(target)[0]
    assert x_mm[np.argwhere(result > 0)[:, 0]].max() < 0  # left stays left: nothing at x > 0
    # linear interpolation puts the cube's centre of mass in the same place
    linear = Resampler(source, target, method="linear")(volume)
    for resampled in (result, linear):
        mass = np.argwhere(resampled > 0).T
        weights = resampled[resampled > 0]
        centre = (target.affine[:3, :3] @ (mass * weights).sum(axis=1) / weights.sum()
                  + target.affine[:3, 3])
        np.testing.assert_allclose(centre, (low + high) / 2, atol=0.5)


def test_aligned_grids_give_exact_block_averages():
    source = Grid((8, 6, 4), small_affine((8, 6, 4)))
    # 2 mm voxels whose corners sit on 1 mm voxel corners: source voxel (0,0,0) starts block 0
    target_affine = source.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5],
                                              [0, 0, 0, 1.0]])
    target = Grid((4, 3, 2), target_affine)
    volume = np.random.default_rng(1).uniform(0, 10, source.shape).astype(np.float32)
    resampler = Resampler(source, target)
    assert resampler.method == "area"
    blocks = volume.reshape(4, 2, 3, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(resampler(volume), blocks, rtol=1e-6)


def test_linear_interpolation_between_voxels_and_auto_choice():
    source = Grid((6, 6, 6), np.eye(4))
    volume = np.zeros(source.shape, dtype=np.float32)
    volume[2, 3, 3], volume[3, 3, 3] = 4.0, 8.0
    shifted = np.eye(4)
    shifted[0, 3] = 0.5  # target voxel i sits half-way between source voxels i and i+1
    linear = Resampler(source, Grid(source.shape, shifted), method="linear")
    result = linear(volume)
    assert result[2, 3, 3] == pytest.approx(6.0) and result[1, 3, 3] == pytest.approx(2.0)
    assert result[3, 3, 3] == pytest.approx(4.0) and result[0, 0, 0] == 0.0
    # a same-size box half-way between two voxels averages them too: auto takes area
    area = Resampler(source, Grid(source.shape, shifted))
    assert area.method == "area"
    np.testing.assert_allclose(area(volume), result, atol=1e-6)
    # outside the source grid is background 0: half a voxel past the edge is half-way to 0
    beyond = np.eye(4)
    beyond[0, 3] = -2.5
    for method in ("linear", "area"):  # area: the box half outside holds half a voxel
        edge = Resampler(source, Grid((9, 6, 6), beyond), method=method)(np.ones(source.shape))
        np.testing.assert_allclose(edge[:, 3, 3], [0, 0, 0.5, 1, 1, 1, 1, 1, 0.5], atol=1e-6)
    rotated = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert Resampler(source, Grid(source.shape, rotated)).method == "linear"
    with pytest.raises(ValueError, match="axis-aligned"):
        Resampler(source, Grid(source.shape, rotated), method="area")
    finer = np.diag([0.5, 0.5, 0.5, 1.0])
    assert Resampler(source, Grid((12, 12, 12), finer)).method == "linear"


def test_resampler_refuses_bad_grids_and_volumes():
    source = Grid((6, 6, 6), np.eye(4))
    singular, nonfinite = np.eye(4), np.eye(4)
    singular[2, 2] = 0.0
    nonfinite[0, 3] = np.nan
    for target, match in [(Grid((0, 6, 6), np.eye(4)), "not 3 positive sizes"),
                          (Grid((6, 6), np.eye(4)), "not 3 positive sizes"),
                          (Grid((6, 6, 6), singular), "finite, invertible"),
                          (Grid((6, 6, 6), nonfinite), "finite, invertible"),
                          (Grid((6, 6, 6), np.eye(3)), "finite, invertible")]:
        with pytest.raises(ValueError, match=f"target grid: .*{match}"):
            Resampler(source, target)
    with pytest.raises(ValueError, match="method"):
        Resampler(source, source, method="cubic")
    for method in ("area", "linear"):
        with pytest.raises(ValueError, match=r"volume has shape \(7, 6, 6\)"):
            Resampler(source, source, method=method)(np.ones((7, 6, 6)))


def test_the_release_becomes_a_pretraining_split_normalised_on_its_training_scans(release,
                                                                                  tmp_path):
    """Rule prepare_openbhb's output is a split folder like any cohort's: [n, 1, X, Y, Z]
    in participant-id order (whatever the release table's: training's batches are drawn
    over row positions), the official train / validation subsets, statistics from the
    training scans only, loadable by training with validation as its held-out subset."""
    import dataclasses

    import nibabel as nib

    from brainage.normalise import scaled_by_brain_median
    from brainage.split_data import load_split

    root, _ = release
    result = read_release(root)
    target = Grid((6, 7, 6), small_affine(SMALL_SHAPE) @ np.diag([2.0, 2.0, 2.0, 1.0]))
    mask = np.zeros(target.shape, dtype=np.uint8)
    mask[1:5, 1:6, 1:5] = 1
    nib.save(nib.Nifti1Image(mask, target.affine), tmp_path / "mask.nii.gz")
    split = tmp_path / "split"
    stats = write_pretraining_split(result, tmp_path / "mask.nii.gz", split / "images.npy",
                                    split / "participants.tsv", split / "stats.json")
    images = np.load(split / "images.npy", mmap_mode="r")
    assert images.shape == (9, 1, 6, 7, 6) and images.dtype == np.float32
    written = pd.read_csv(split / "participants.tsv", sep="\t")
    order = np.argsort(result.table["participant_id"].to_numpy(dtype=str), kind="stable")
    assert list(written["participant_id"]) == list(result.table["participant_id"].iloc[order])
    assert list(written["subset"]) == list(result.table["subset"].iloc[order])
    resample = Resampler(result.grid, target)
    brains = [scaled_by_brain_median(resample(result.load(row)) * mask) for row in order]
    # the release's rows reversed: the same split, byte for byte
    reversed_release = dataclasses.replace(
        result, table=result.table.iloc[::-1].reset_index(drop=True),
        files=tuple(reversed(result.files)))
    again = write_pretraining_split(reversed_release, tmp_path / "mask.nii.gz",
                                    tmp_path / "again" / "images.npy",
                                    tmp_path / "again" / "participants.tsv",
                                    tmp_path / "again" / "stats.json")
    assert again["images_sha256"] == stats["images_sha256"]
    training = np.concatenate([b[b != 0] for b, s in zip(brains, written["subset"])
                               if s == "train"]).astype(np.float64)
    assert stats["mean"] == [pytest.approx(training.mean(), rel=1e-5)]
    assert stats["sd"] == [pytest.approx(training.std(), rel=1e-4)]
    assert stats["n_train"] == 5 and stats["n_validation"] == 4
    validation_row = int(np.flatnonzero(written["subset"] == "validation")[0])
    brain = brains[validation_row]
    expected = np.where(brain != 0, (brain - stats["mean"][0]) / stats["sd"][0], 0)
    np.testing.assert_allclose(images[validation_row, 0], expected, atol=1e-4)
    assert (images[:, 0][:, mask == 0] == 0).all()
    loaded = load_split(split)
    assert loaded.eval_subset == "validation" and len(loaded.train_index) == 5
    # normalise.scope all (the reference code's statistics over the whole cohort) holds for
    # the release as for any pretraining cohort: every scan enters the statistics
    everything = write_pretraining_split(result, tmp_path / "mask.nii.gz", tmp_path / "i.npy",
                                         tmp_path / "p.tsv", tmp_path / "s.json", scope="all")
    every_scan = np.concatenate([b[b != 0] for b in brains]).astype(np.float64)
    assert everything["mean"] == [pytest.approx(every_scan.mean(), rel=1e-5)]
    assert everything["mean"] != stats["mean"]


# -- what a broken release is told -------------------------------------------------------------

def test_wrong_array_shape_names_the_file(release):
    root, written = release
    row = written.iloc[1]
    path = array_path(root, row["participant_id"], row["split"])
    np.save(path, np.zeros((1, 1, 12, 14, 11)))
    with pytest.raises(InputError) as error:
        read_release(root)
    message = str(error.value)
    assert str(path) in message and "shape (1, 1, 12, 14, 11)" in message
    assert "(1, 1, 12, 14, 12)" in message


@pytest.mark.parametrize("leading", [(1, 1, 1), (2, 1)])
def test_arrays_other_than_one_sample_one_channel_are_refused(release, leading):
    root, written = release
    row = written.iloc[1]
    path = array_path(root, row["participant_id"], row["split"])
    np.save(path, np.ones(leading + SMALL_SHAPE))
    with pytest.raises(InputError, match=re.escape(f"has shape {leading + SMALL_SHAPE}")) as error:
        read_release(root)
    assert str(path) in str(error.value)


def test_integer_arrays_are_read_as_float32(tmp_path):
    """Any real numeric dtype is accepted (the release's dtype is not confirmed) and comes
    back as float32 with the same values."""
    write_openbhb_release(tmp_path, n_train=2, n_validation=2, dtype=np.int16)
    result = read_release(tmp_path)
    for row in range(len(result)):
        volume = result.load(row)
        assert volume.dtype == np.float32 and volume.shape == SMALL_SHAPE
        np.testing.assert_array_equal(volume, np.load(result.files[row])[0, 0])


def test_wrong_array_dtype_names_the_file(release):
    root, written = release
    row = written.iloc[0]
    path = array_path(root, row["participant_id"], row["split"])
    np.save(path, np.zeros((1, 1) + SMALL_SHAPE, dtype=np.complex64))
    with pytest.raises(InputError, match="dtype complex64") as error:
        read_release(root)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("column", ["participant_id", "age", "sex", "split", "site"])
def test_a_missing_column_is_named(release, column):
    root, written = release
    written.drop(columns=[column]).to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError) as error:
        read_release(root)
    message = str(error.value)
    assert str(root / "participants.tsv") in message and f"lacks column(s) {column};" in message


def test_a_table_without_rows(release):
    root, written = release
    (root / "participants.tsv").write_text("\t".join(written.columns) + "\n")
    with pytest.raises(InputError, match="lists no participants"):
        read_release(root)


def test_a_row_without_its_array(release):
    root, written = release
    row = written.iloc[6]
    path = array_path(root, row["participant_id"], row["split"])
    path.unlink()
    with pytest.raises(InputError) as error:
        read_release(root)
    message = str(error.value)
    assert str(path) in message and "1 of 9 scans" in message and row["participant_id"] in message


def test_an_array_without_a_row(release):
    root, written = release
    written.drop(index=3).to_csv(root / "participants.tsv", sep="\t", index=False)
    orphan = array_path(root, written.iloc[3]["participant_id"], "train")
    with pytest.raises(InputError) as error:
        read_release(root)
    assert str(orphan) in str(error.value) and "no row in" in str(error.value)


def test_a_row_whose_array_is_in_the_other_split(release):
    root, written = release
    table = written.copy()
    table.loc[0, "split"] = "internal_test"
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="other split's folder") as error:
        read_release(root)
    assert written.iloc[0]["participant_id"] in str(error.value)


@pytest.mark.parametrize("column, value, expected", [
    ("age", "twenty", "age 'twenty' is not a number of years"),
    ("age", "250", "age 250.0 years is outside"),
    ("age", "-3", "age -3.0 years is outside"),
    ("sex", "", "column 'sex' is empty"),
    ("split", "test", "split 'test' is not one of train, internal_test, external_test"),
    ("site", "", "column 'site' is empty"),
])
def test_bad_values_name_the_line(release, column, value, expected):
    root, written = release
    table = written.copy()
    table.loc[2, column] = value
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=expected) as error:
        read_release(root)
    assert f"participants.tsv line 4 (participant_id {written.iloc[2]['participant_id']!r})" \
        in str(error.value)


def test_error_lines_count_the_blank_lines_pandas_skips(release):
    """pandas skips blank (and spaces-only) lines, before the header too: the line named is
    the file's, not the count of rows read."""
    root, written = release
    table = written.copy()
    table.loc[2, "age"] = "twenty"
    header, *rows = table.to_csv(sep="\t", index=False).splitlines()
    lines = ["", header, rows[0], "", rows[1], "   ", rows[2], *rows[3:]]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="age 'twenty' is not a number of years") as error:
        read_release(root)
    assert f"participants.tsv line 7 (participant_id {written.iloc[2]['participant_id']!r})" \
        in str(error.value)
    # and the same file without the bad value reads every row
    (root / "participants.tsv").write_text("\n".join(lines).replace("twenty", "30") + "\n")
    assert sorted(read_release(root).table["openbhb_id"]) == sorted(written["participant_id"])


def test_an_empty_id_names_its_line(release):
    root, written = release
    table = written.copy()
    table.loc[2, "participant_id"] = ""
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="participants.tsv line 4: participant_id is empty"):
        read_release(root)


@pytest.mark.parametrize("openbhb_id", ["../../../etc", "a/b", "..", ".hidden", "a\\b"])
def test_an_id_that_could_name_another_folder_is_refused(release, openbhb_id):
    """The id names the folder a scan's array is read from (quasiraw_path): one with a path
    separator or a leading dot read outside the release's derivatives folder."""
    root, written = release
    table = written.copy()
    table.loc[1, "participant_id"] = openbhb_id
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"participants.tsv line 3 .* participant_id holds a "
                                         r"path separator or starts with a dot"):
        read_release(root)


def test_duplicate_ids(release):
    root, written = release
    table = written.copy()
    table.loc[1, "participant_id"] = table.loc[0, "participant_id"]
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=f"duplicate participant_id {table.loc[0, 'participant_id']}"):
        read_release(root)


def test_an_empty_split(tmp_path):
    write_openbhb_release(tmp_path, n_train=3, n_validation=1)  # one internal_test scan only
    read_release(tmp_path, validation="internal")
    with pytest.raises(InputError, match="no row has split external_test, so the validation "
                                         "subset is empty"):
        read_release(tmp_path, validation="external")
    table = pd.read_csv(tmp_path / "participants.tsv", sep="\t", dtype=str)
    table["split"] = "internal_test"
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="so the train subset is empty"):
        read_release(tmp_path)


def test_messages_name_the_config_keys_that_exist(tmp_path):
    """The fixes the reader's messages give name keys of a pretraining run's source
    (pretrain.<run>.source.root, pretrain.<run>.source.openbhb_validation): a key the schema
    does not have (pretrain.source.validation) cannot be set."""
    from brainage.config import _shared_schema

    source_keys = _shared_schema()["$defs"]["pretrain_run"]["properties"]["source"]["properties"]
    write_openbhb_release(tmp_path, n_train=3, n_validation=1)  # one internal_test scan only
    with pytest.raises(InputError) as error:
        read_release(tmp_path, validation="external")
    named = set(re.findall(r"pretrain\.\S*?source\.(\w+)", str(error.value)))
    assert named == {"openbhb_validation"} and named <= set(source_keys), str(error.value)
    assert "pretrain.<run>.source.openbhb_validation" in str(error.value)
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "nowhere", tmp_path / "empty"):  # no folder; no participants.tsv
        with pytest.raises(InputError, match=r"pretrain\.<run>\.source\.root"):
            read_release(root)


@pytest.mark.parametrize("labels_on_top", [False, True])
def test_the_ieee_dataport_layout_is_named_not_taken_for_a_partial_download(tmp_path,
                                                                            labels_on_top):
    """The IEEE DataPort download unpacks to flat train/train_quasiraw/ arrays with the
    labels in train/train_labels/: the reader said participants.tsv was missing or, with
    the table copied up, that every array was missing and the 42 GB train/ folder had to
    be downloaded again."""
    root = tmp_path / "openbhb"
    arrays = root / "train" / "train_quasiraw"
    arrays.mkdir(parents=True)
    np.save(arrays / "sub-100053248969_preproc-quasiraw_T1w.npy", np.zeros((1, 1, 2, 2, 2)))
    labels = root / "train" / "train_labels"
    labels.mkdir()
    (labels / "participants.tsv").write_text("participant_id\tage\n100053248969\t30\n")
    if labels_on_top:
        (root / "participants.tsv").write_text((labels / "participants.tsv").read_text())
    with pytest.raises(InputError, match=r"openbhb/train holds the IEEE DataPort download "
                                         r"of OpenBHB .* move each array to "
                                         r"<root>/<train or val>/derivatives/sub-<id>/ses-1/"):
        read_release(root)
    # laid out as the message says: the emptied folder left behind is no DataPort download
    (arrays / "sub-100053248969_preproc-quasiraw_T1w.npy").unlink()
    (root / "train" / "derivatives").mkdir()
    with pytest.raises(InputError) as error:
        read_release(root)
    assert "IEEE DataPort" not in str(error.value)


def test_missing_folder_file_and_the_challenge_layout(tmp_path):
    with pytest.raises(InputError, match=r"does not exist. Set pretrain\.<run>\.source\.root"):
        read_release(tmp_path / "nowhere")
    with pytest.raises(InputError, match="participants.tsv is missing"):
        read_release(tmp_path)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "train.npy", np.zeros((2, 10), dtype=np.float32))
    (tmp_path / "data" / "train.tsv").write_text("participant_id\tage\tsite\n1\t20\t3\n")
    with pytest.raises(InputError, match="RAMP challenge's concatenated arrays"):
        read_release(tmp_path)
    write_openbhb_release(tmp_path / "release", n_train=2, n_validation=2)
    import shutil

    shutil.rmtree(tmp_path / "release" / "val")
    with pytest.raises(InputError, match="release/val is missing"):
        read_release(tmp_path / "release")


def test_without_the_grid_file_the_documented_grid_is_used(tmp_path):
    write_openbhb_release(tmp_path, n_train=2, n_validation=2, write_grid=False)
    with pytest.raises(InputError, match=r"the release's quasi-raw arrays are \(1, 1, 182, 218, 182\)"):
        read_release(tmp_path)  # small arrays do not fit the full-size grid
    result = read_release(tmp_path, check_arrays=False)
    assert result.grid.shape == QUASIRAW_SHAPE and "documented" in result.grid_source
    np.testing.assert_array_equal(result.grid.affine, QUASIRAW_AFFINE)


def test_nonfinite_or_empty_volume_is_named_when_loaded(release):
    root, written = release
    result = read_release(root)
    path = result.files[3]
    data = np.load(path)
    data[0, 0, 5, 5, 5] = np.nan
    np.save(path, data)
    for row in range(3):
        result.load(row)  # the others still load
    with pytest.raises(InputError, match="NaN/inf") as error:
        result.load(3)
    assert str(path) in str(error.value)
    np.save(path, np.zeros_like(data))
    with pytest.raises(InputError, match="no non-zero voxel"):
        result.load(3)


def test_an_array_changed_after_reading_the_release_is_named_when_loaded(release):
    root, _ = release
    result = read_release(root)
    path = result.files[2]
    np.save(path, np.ones((1, 1, 12, 14, 11)))
    with pytest.raises(InputError, match=re.escape("has shape (1, 1, 12, 14, 11)")) as error:
        result.load(2)
    assert str(path) in str(error.value)
