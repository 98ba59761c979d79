"""The config schema is the documentation: every key described, defaulted, typos rejected."""

import re
from pathlib import Path

import pytest
import yaml

from brainage.config import (
    ConfigError,
    _shared_schema,
    cell_settings,
    check_batch_sizes,
    check_pretrain_batch_size,
    check_search_batch_size,
    check_simulated_folders,
    encoder_owners,
    grid_cells,
    load_config,
    pretrain_settings,
    pretrained_run,
    resolve_cell,
    resource_for_attempt,
    training_settings,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "config").glob("*.yaml"))


def _properties(node, path=""):
    """Yield (dotted key, schema) for every declared property, recursively."""
    for name, sub in node.get("properties", {}).items():
        yield f"{path}{name}", sub
        yield from _properties(sub, f"{path}{name}.")


def test_every_key_has_description_and_default():
    schema = _shared_schema()
    undocumented = [key for key, sub in _properties(schema)
                    if "description" not in sub and "$ref" not in sub]
    undefaulted = [key for key, sub in _properties(schema) if "default" not in sub]
    assert undocumented == []
    assert undefaulted == []


def test_resolving_every_cell_leaves_the_shared_schema_as_parsed():
    # validate_config and cell_settings share one parsed schema (no copy per cell): filling
    # defaults must write into the settings, never into the schema.
    import yaml

    from brainage.config import CONFIG_SCHEMA

    config = load_config(REPO / "config" / "paper.yaml")
    for experiment, variant, seed in grid_cells(config):
        settings = cell_settings(config, experiment, variant, seed)
        settings["train"]["epochs"] = -1  # a caller editing its copy
        settings["loss"].clear()
    for name in config["pretrain"]:
        pretrain_settings(config, name)["loss"].clear()
    assert _shared_schema() == yaml.safe_load(CONFIG_SCHEMA.read_text())


@pytest.mark.parametrize("cell", [
    # the documented way to train without the head: its encoder recorded the default
    # features 'projection', and the export's check and every search trial refused it
    {"model": {"projection_head": False, "features": "encoder"}},
    # the untrained baseline under a supervised top level: its training settings keep no
    # loss, and the default (adaptive) was paired with the regression head in its job
    {"loss": {"name": "supervised"}, "model": {"head": "regression", "projection_dim": 1},
     "train": {"epochs": 0, "views": 1}},
], ids=["without_head", "untrained_supervised"])
def test_resolving_a_cells_training_settings_again_changes_nothing(cell):
    trained = resolve_cell(training_settings(resolve_cell(cell)))
    assert resolve_cell(trained) == trained
    assert resolve_cell(resolve_cell(trained)) == trained
    if not cell["model"].get("projection_head", True):
        assert trained["model"]["features"] == "encoder"


def test_an_encoder_without_a_head_is_exported_whatever_features_it_recorded():
    from brainage.export import ExportError, check_training_settings

    settings = resolve_cell({"model": {"projection_head": False, "features": "encoder"}})
    recorded = {**settings, "model": {**settings["model"], "features": "projection"}}
    check_training_settings({"settings": recorded}, settings, encoder_path="encoder.pt")
    retrained = {**settings, "train": {**settings["train"], "lr": 0.5}}
    with pytest.raises(ExportError, match=r"train\.lr"):
        check_training_settings({"settings": recorded}, retrained, encoder_path="encoder.pt")


@pytest.mark.parametrize("where", ["model", "variant", "pretrain"])
def test_a_projection_head_of_one_dimension_is_refused_naming_the_key_that_sets_it(where):
    """Its unit vectors are +1 or -1: no gradient reaches the encoder (a review's Table 3
    row predicted the training mean for every subject, under a warning to lower train.lr).
    A lab reaches it by setting the supervised baseline's projection_dim: 1 at the top
    level and head: projection in a contrastive variant, as the head's message said."""
    config = {"loss": {"name": "supervised"},
              "model": {"head": "regression", "projection_dim": 1},
              "train": {"views": 1},
              "experiments": {"table3": {"seeds": [0], "variants": {
                  "supervised": {},
                  "yaware": {"loss": {"name": "yaware"}, "model": {"head": "projection"},
                             "train": {"views": 2}}}}}}
    if where == "model":  # every contrastive cell inherits it: all are named at once
        config = {"model": {"projection_dim": 1}, "experiments": {"table3": {
            "seeds": [0], "variants": {"adaptive": {}, "yaware": {"loss": {"name": "yaware"}}}}}}
    elif where == "pretrain":  # the grid's supervised cell is right; the run inherits 1
        del config["experiments"]["table3"]["variants"]["yaware"]
        config["pretrain"] = {"t1w": {"source": {"kind": "simulate", "n_subjects": 16},
                                      "loss": {"name": "exponential"},
                                      "model": {"head": "projection"}}}
        config["dataset"] = {"modalities": ["stiffness", "T1w"]}
    with pytest.raises(ConfigError) as refused:
        validate_config(config)
    message = str(refused.value)
    assert "config key 'model.projection_dim' is 1 for the " in message
    assert "no gradient reaches the encoder" in message
    cells = {"model": ["experiments.table3.variants.adaptive",
                       "experiments.table3.variants.yaware"],
             "variant": ["experiments.table3.variants.yaware"],
             "pretrain": ["pretrain.t1w"]}[where]
    for cell in cells:
        assert (f"Set {cell}.model.projection_dim to 2 or more (the paper's 128), or "
                f"'model.projection_dim' for every cell that inherits it") in message
    assert message.count("no gradient") == len(cells)
    # the variant's own key, where it sets one
    if where == "variant":
        config["experiments"]["table3"]["variants"]["yaware"]["model"]["projection_dim"] = 1
        with pytest.raises(ConfigError, match=r"config key 'experiments\.table3\.variants\."
                                              r"yaware\.model\.projection_dim' is 1.*Set "
                                              r"experiments\.table3\.variants\.yaware\.model\."
                                              r"projection_dim to 2 or more \(the paper's 128\);"):
            validate_config(config)
        config["experiments"]["table3"]["variants"]["yaware"]["model"]["projection_dim"] = 32
        validate_config(config)


def test_the_random_search_with_a_projection_head_of_one_dimension_is_refused():
    """Its trials train the top-level model: every trial scored alike and best.json was the
    first one (a review), though each grid cell set its own projection_dim."""
    config = {"model": {"projection_dim": 1}, "search": {"enabled": True},
              "experiments": {"table3": {"seeds": [0], "variants": {
                  "adaptive": {"model": {"projection_dim": 32}},
                  "baseline": {"model": {"encoder": "none"},
                               "readout": {"method": "pca_ridge"}}}}}}
    with pytest.raises(ConfigError) as refused:
        validate_config(config)
    message = str(refused.value)
    assert ("config key 'model.projection_dim' is 1 for the random search's trials" in message
            and "Set model.projection_dim to 2 or more (the paper's 128);" in message)
    assert message.count("no gradient") == 1  # not the cells that override it or have no
    config["search"]["enabled"] = False       # network
    validate_config(config)


def test_an_untrained_cell_reading_the_regression_heads_one_output_is_refused():
    """Under a supervised top level the untrained baseline inherited the regression head:
    its read-out saw one random number per subject and predicted the training mean, as a
    Table 3 row "Untrained ResNet-18 + read-out", without a word (a review)."""
    config = {"loss": {"name": "supervised"},
              "model": {"head": "regression", "projection_dim": 1}, "train": {"views": 1},
              "experiments": {"table3": {"seeds": [0], "variants": {
                  "supervised": {}, "untrained": {"train": {"epochs": 0}}}}}}
    with pytest.raises(ConfigError, match=r"the experiments\.table3\.variants\.untrained trains "
                                          r"nothing.*'model\.head' regression.*Add model: "
                                          r"\{features: encoder\} to experiments\.table3\."
                                          r"variants\.untrained"):
        validate_config(config)
    config["experiments"]["table3"]["variants"]["untrained"]["model"] = {"features": "encoder"}
    validate_config(config)
    # a frozen cell over a supervised pretraining run with its head: its one output is the
    # pretrained network's predicted age, loaded, not random
    config["dataset"] = {"modalities": ["stiffness", "T1w"]}
    config["pretrain"] = {"t1w": {"source": {"kind": "simulate", "n_subjects": 16},
                                  "loss": {"name": "supervised"}}}
    config["experiments"]["table3"]["variants"]["untrained"]["model"] = {
        "init": "pretrained:t1w"}
    validate_config(config)


def test_a_frozen_pretrained_cell_reads_projections_only_through_the_runs_own_head():
    """A cell that trains nothing keeps a head of other sizes than the run's at random
    initialisation: a review's Table 3 row "Pretrained ResNet-18, not fine-tuned" read its
    features through it, said only in the training log, at INFO."""
    def config(frozen_model, run_model):
        return {"dataset": {"modalities": ["stiffness", "T1w"]},
                "pretrain": {"t1w": {"source": {"kind": "simulate", "n_subjects": 16},
                                     "model": run_model}},
                "experiments": {"table3": {"seeds": [0], "variants": {"frozen": {
                    "model": {"init": "pretrained:t1w", **frozen_model},
                    "train": {"epochs": 0}}}}}}

    with pytest.raises(ConfigError, match=r"the cell experiments\.table3\.variants\.frozen "
                                          r"trains nothing.*\('model\.hidden_dim' 512 "
                                          r"against 'pretrain\.t1w\.model\.hidden_dim' 16\).*"
                                          r"random initialisation. Add model: \{features: "
                                          r"encoder\} to experiments\.table3\.variants\.frozen"):
        validate_config(config({}, {"hidden_dim": 16}))
    # a head size the variant sets is named by the variant's key
    with pytest.raises(ConfigError, match=r"\('experiments\.table3\.variants\.frozen\.model\."
                                          r"hidden_dim' 16 against 'model\.hidden_dim' 512\)"):
        validate_config(config({"hidden_dim": 16}, {}))
    validate_config(config({"features": "encoder"}, {"hidden_dim": 16}))
    validate_config(config({"features": "projection", "hidden_dim": 16}, {"hidden_dim": 16}))


def test_every_object_rejects_unknown_keys():
    schema = _shared_schema()
    open_objects = [key for key, sub in _properties(schema)
                    if sub.get("type") == "object" and "properties" in sub
                    and sub.get("additionalProperties", True) is not False]
    assert open_objects == []


def test_empty_config_gets_every_default():
    config = validate_config({})
    assert config["train"]["epochs"] == 50
    assert config["loss"]["distance"] == "manhattan"
    assert config["normalise"]["scope"] == "train"
    assert config["dataset"]["simulate"]["enabled"] is False
    # the paper's Table 3 (7 losses) and its 5 baselines, 5 seeds each
    assert len(grid_cells(config)) == (7 + 5) * 5, "default grid = the paper's Table 3"


def test_typo_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.*epocs"):
        validate_config({"train": {"epocs": 3}})


def test_wrong_type_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        validate_config({"train": {"batch_size": "thirty-two"}})


def test_unknown_enum_value_is_rejected():
    with pytest.raises(ConfigError, match=r"preprocess\.skullstrip"):
        validate_config({"preprocess": {"skullstrip": "bet2"}})


def test_threshold_form_defaults_to_the_paper_and_rejects_unknown_values():
    assert validate_config({})["loss"]["threshold_form"] == "paper"
    config = validate_config({"loss": {"name": "threshold", "threshold_form": "reference"}})
    assert config["loss"]["threshold_form"] == "reference"
    with pytest.raises(ConfigError, match=r"loss\.threshold_form"):
        validate_config({"loss": {"threshold_form": "code"}})


def test_variant_overrides_are_validated():
    bad = {"experiments": {"x": {"variants": {"a": {"loss": {"sigmaa": 1.0}}}}}}
    with pytest.raises(ConfigError, match="sigmaa"):
        validate_config(bad)


@pytest.mark.parametrize("variant, message", [
    # a cell without a projection head cannot read features after it; the pair used to
    # pass validation and fail in the training job (which never sees model.features)
    ({"model": {"projection_head": False}},
     r"'experiments\.x\.variants\.a\.model\.features' is 'projection' but .*projection_head' is false"),
    # SimCLR's only positives are a subject's other views: with one view its loss is 0
    ({"loss": {"name": "simclr"}, "train": {"views": 1}},
     r"'experiments\.x\.variants\.a\.train\.views' is 1 but the simclr loss needs at least 2"),
    ({"loss": {"name": "nnclr"}, "train": {"views": 3}},
     r"'experiments\.x\.variants\.a\.train\.views' is 3 but the nnclr loss needs exactly 2"),
])
def test_settings_that_cannot_train_together_are_refused_naming_the_keys(variant, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"experiments": {"x": {"variants": {"a": variant}}}})
    fixed = {"model": {"projection_head": False, "features": "encoder"}} \
        if "model" in variant else {**variant, "train": {"views": 2}}
    validate_config({"experiments": {"x": {"variants": {"a": fixed}}}})


@pytest.mark.parametrize("bad", [
    {"predict": {"model": {"name": ".."}}},
    {"experiments": {"table3": {"variants": {"..": {"loss": {"name": "yaware"}}}}}},
], ids=["bundle", "variant"])
def test_names_that_would_leave_their_folder_are_rejected(bad):
    with pytest.raises(ConfigError, match=r"\.\."):
        validate_config(bad)


@pytest.mark.parametrize("name", ["search", "pretrain"])
def test_an_experiment_named_as_the_pipelines_own_cells_is_refused(name):
    """The random search's cells are experiment "search", a pretraining run's "pretrain":
    an experiment so named was taken for them (its messages named the top-level train.lr
    where its variant set its own, or a pretrain.<run> key that does not exist)."""
    experiment = {"seeds": [0], "variants": {"adaptive": {"loss": {"name": "adaptive"},
                                                          "train": {"lr": 0.5}}}}
    with pytest.raises(ConfigError, match=rf"config key 'experiments': the name '{name}' is "
                                          rf"the pipeline's own .* rename the experiment, e\.g\. "
                                          rf"'{name}_1'"):
        validate_config({"experiments": {name: experiment}})
    validate_config({"experiments": {f"{name}_1": experiment}})
    # a name with a bad character is not told to take the reserved name next
    with pytest.raises(ConfigError, match=rf"Rename it, e\.g\. '{name}_1'"):
        validate_config({"experiments": {f"{name} ": experiment}})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)  # a --configfile replaces the demo config as a whole
    assert grid_cells(config), f"{path.name} declares no grid cell"


def test_cell_settings_apply_variant_overrides_only_to_that_cell():
    config = validate_config({"loss": {"name": "adaptive", "sigma": 2.0},
                              "experiments": {"sweep": {"seeds": [3], "variants": {
                                  "wide": {"loss": {"sigma": 5.0}},
                                  "base": {}}}}})
    wide = cell_settings(config, "sweep", "wide", 3)
    base = cell_settings(config, "sweep", "base", 3)
    assert wide["loss"]["sigma"] == 5.0 and base["loss"]["sigma"] == 2.0
    assert wide["loss"]["name"] == base["loss"]["name"] == "adaptive"
    assert grid_cells(config) == [("sweep", "wide", 3), ("sweep", "base", 3)]


def test_settings_do_not_depend_on_the_order_of_keys_in_the_file():
    """Snakemake compares a job's params by their repr, in which a dict's key order shows:
    keys written in another order, or a default written out, must give the same settings,
    else every training reruns (train_encoder's params are the cell's settings)."""
    written = {"train": {"epochs": 3, "batch_size": 4},
               "loss": {"name": "exponential", "sigma": 2.0},
               "normalise": {"resolution_mm": 8},
               "pretrain": {"t1w": {"source": {"kind": "simulate", "n_subjects": 8},
                                    "train": {"epochs": 2, "batch_size": 3}}},
               "experiments": {"sweep": {"seeds": [0], "variants": {
                   "wide": {"loss": {"sigma": 5.0}}, "base": {}}}}}
    reordered = {section: (dict(reversed(list(values.items())))
                           if section in ("train", "loss") else values)
                 for section, values in reversed(list(written.items()))}
    reordered["train"] = {"weight_decay": 5.0e-5, **reordered["train"]}  # the default
    reordered["normalise"] = {"dtype": "float32", "resolution_mm": 8}    # the default
    reordered["experiments"]["sweep"] = {"variants": {
        "wide": {"loss": {"sigma": 5.0}}, "base": {}}, "seeds": [0]}
    first, second = validate_config(written), validate_config(reordered)
    for section in ("train", "loss", "normalise", "split", "dataset"):
        assert repr(first[section]) == repr(second[section]), section
    for variant in ("wide", "base"):
        assert (repr(cell_settings(first, "sweep", variant, 0))
                == repr(cell_settings(second, "sweep", variant, 0)))
    assert repr(pretrain_settings(first, "t1w")) == repr(pretrain_settings(second, "t1w"))
    # names the user chooses keep the user's order (encoder owners, table rows)
    assert list(second["experiments"]["sweep"]["variants"]) == ["wide", "base"]


def test_a_number_is_kept_as_its_default_is_written_whole_or_not():
    """sigma: 2 where the default is 2.0 (YAML reads an int) gave a params repr of 2, not
    2.0: writing out a default reran every job that takes it (found by a review). A number
    takes the form of its key's default: a float default makes a float, an int default an
    int from a whole float; lists element by element; variants and pretraining runs alike."""
    written = {"loss": {"sigma": 2, "temperature": 0.1},
               "train": {"cutout_size_mm": 64.0, "epochs": 50.0, "rotation_degrees": 10},
               "readout": {"alphas": [0.01, 0.1, 1, 10, 100]},
               "pretrain": {"t1w": {"source": {"kind": "simulate"}, "loss": {"sigma": 2}}},
               "experiments": {"sweep": {"seeds": [0], "variants": {
                   "wide": {"loss": {"sigma": 5}}, "base": {}}}}}
    plain = {"pretrain": {"t1w": {"source": {"kind": "simulate"}, "loss": {"sigma": 2.0}}},
             "experiments": {"sweep": {"seeds": [0], "variants": {
                 "wide": {"loss": {"sigma": 5.0}}, "base": {}}}}}
    first, second = validate_config(written), validate_config(plain)
    for section in ("train", "loss", "readout"):
        assert repr(first[section]) == repr(second[section]), section
    assert type(first["loss"]["sigma"]) is float and type(first["train"]["epochs"]) is int
    for variant in ("wide", "base"):
        assert (repr(cell_settings(first, "sweep", variant, 0))
                == repr(cell_settings(second, "sweep", variant, 0)))
    assert repr(pretrain_settings(first, "t1w")) == repr(pretrain_settings(second, "t1w"))
    assert repr(resolve_cell({"loss": {"sigma": 3}})) == repr(resolve_cell({"loss": {"sigma": 3.0}}))
    # a key without a numeric default keeps what was written
    assert resolve_cell({"loss": {"lam": 1}})["loss"]["lam"] == 1


def test_a_seed_listed_twice_is_refused():
    """Seeds [0, 0] planned cell 0 twice: make_tables read its metrics.json twice and
    weighted that seed double in every mean."""
    config = {"experiments": {"e": {"seeds": [0, 0, 1], "variants": {"a": {}}}}}
    with pytest.raises(ConfigError, match=r"config key 'experiments\.e\.seeds'.*non-unique"):
        validate_config(config)


def test_disabled_experiment_adds_no_cells():
    config = validate_config({"experiments": {"off": {"enabled": False,
                                                      "variants": {"a": {}}}}})
    assert grid_cells(config) == []


def test_unknown_cell_is_reported():
    config = validate_config({"experiments": {"e": {"variants": {"a": {}}}}})
    with pytest.raises(ConfigError, match="no variant 'b'"):
        cell_settings(config, "e", "b", 0)


# -- values that pass the schema but cannot train ------------------------------------------

def _grid(**sections) -> dict:
    return {"experiments": {"table3": {"seeds": [0], "variants": {
        "adaptive": {"loss": {"name": "adaptive"}}, "yaware": {"loss": {"name": "yaware"}}}}},
        **sections}


@pytest.mark.parametrize("epochs, nn_step", [(2, 2), (3, 2), (1, 1)])
def test_adaptive_schedule_needs_two_steps_within_the_epochs(epochs, nn_step):
    """brainage.losses.schedule.check_schedule: nn_step <= epochs // 2; the loss raised it
    only inside the training job."""
    with pytest.raises(ConfigError, match=rf"experiments\.table3\.variants\.adaptive .*"
                                          rf"train\.epochs {epochs}.*loss\.nn_step {nn_step}"
                                          rf".*raise train\.epochs to at least {2 * nn_step}"
                       ) as raised:
        validate_config(_grid(train={"epochs": epochs}, loss={"nn_step": nn_step}))
    assert "variants.yaware" not in str(raised.value)  # no schedule without the loss


def test_adaptive_schedule_boundary_and_disabled_experiments_pass():
    validate_config(_grid(train={"epochs": 4}, loss={"nn_step": 2}))
    disabled = _grid(train={"epochs": 2}, loss={"nn_step": 2})
    disabled["experiments"]["table3"]["enabled"] = False
    validate_config(disabled)


def test_cells_without_an_encoder_have_no_adaptive_schedule_to_check():
    """A cell with model.encoder none trains nothing, so the base loss's schedule is no
    reason to refuse it (train.epochs 1 cannot run Adaptive Neighborhoods)."""
    baselines = {"experiments": {"baselines": {"seeds": [0], "variants": {
        "mean": {"model": {"encoder": "none"}, "readout": {"method": "train_mean"}},
        "pca": {"model": {"encoder": "none"}, "readout": {"method": "pca_ridge"}}}}},
        "train": {"epochs": 1}}
    validate_config(baselines)
    with pytest.raises(ConfigError) as raised:  # the default grid: only cells that train
        validate_config({"train": {"epochs": 1}})
    assert "variants.adaptive " in str(raised.value)
    assert "variants.train_mean" not in str(raised.value)


def test_adaptive_final_neighbourhood_fits_the_batch():
    bad = _grid(train={"batch_size": 8}, loss={"nn_final": 14})
    with pytest.raises(ConfigError, match=r"variants\.adaptive .*loss\.nn_final must not "
                                          r"exceed train\.batch_size"):
        validate_config(bad)


def test_batch_larger_than_a_split_names_the_key_the_split_and_its_size():
    config = validate_config(_grid(train={"batch_size": 64}, loss={"nn_final": 4}))
    config["experiments"]["table3"]["variants"]["small"] = {"train": {"batch_size": 7}}
    config["experiments"]["table3"]["variants"]["large"] = {"train": {"batch_size": 9}}
    with pytest.raises(ConfigError) as raised:
        check_batch_sizes(config, {"fold1": 8, "fold2": 7})
    lines = str(raised.value).splitlines()
    assert len(lines) == 2, lines
    assert ("config key train.batch_size is 64 (used by experiments.table3.variants.adaptive, "
            "experiments.table3.variants.yaware) but split fold2 has only 7 training "
            "subjects") in lines[0]
    assert "config key experiments.table3.variants.large.train.batch_size is 9" in lines[1]
    assert "Lower experiments.table3.variants.large.train.batch_size to at most 7" in lines[1]
    check_batch_sizes(config, {"fold1": 64, "fold2": 64})


def test_a_batch_lowered_as_told_does_not_run_into_the_neighbourhood_check():
    # a 12-subject pilot with the paper's defaults (batch 32, nn_final 14): the first message
    # must name both keys, not send the lab to lower one and meet the other's error
    config = validate_config(_grid(train={"batch_size": 32}, loss={"nn_final": 14}))
    with pytest.raises(ConfigError) as raised:
        check_batch_sizes(config, {"holdout": 10})
    assert ("Lower train.batch_size to at most 10, and loss.nn_final (14) to at most the new "
            "batch size") in str(raised.value)
    config = validate_config(_grid(train={"batch_size": 32}, loss={"nn_final": 4}))
    with pytest.raises(ConfigError, match=r"to at most 10\.$"):
        check_batch_sizes(config, {"holdout": 10})


def test_search_batch_larger_than_its_training_subjects_names_both_keys():
    config = validate_config(_grid(train={"batch_size": 8}, loss={"nn_final": 4},
                                   search={"enabled": True, "validation_fraction": 0.5}))
    with pytest.raises(ConfigError) as raised:
        check_search_batch_size(config, {"fold1": 9, "fold2": 7})
    message = str(raised.value)
    assert ("config key train.batch_size is 8, the batch of the random search's trials "
            "(search.enabled), but split fold2 leaves them only 7 training subjects once "
            "config key search.validation_fraction (0.5)") in message
    assert "Lower train.batch_size to at most 7 or search.validation_fraction" in message
    check_search_batch_size(config, {"fold1": 9, "fold2": 8})
    config["search"]["enabled"] = False  # no search, no trials to train
    check_search_batch_size(config, {"fold1": 1})
    # the cells that train with the lowered batch and keep their own nn_final: named too, so
    # that lowering the batch as told does not stop the next run at their schedule
    config = validate_config(_grid(train={"batch_size": 8}, loss={"nn_final": 8},
                                   search={"enabled": True, "validation_fraction": 0.5}))
    with pytest.raises(ConfigError, match=r"search\.validation_fraction, and loss\.nn_final "
                                          r"\(8\) to at most the new batch size"):
        check_search_batch_size(config, {"fold1": 9, "fold2": 7})


# -- nn_final and nn_step from the random search (loss.nn_from_search) ------------------------

def _searched(**sections) -> dict:
    config = _grid(search={"enabled": True, "nn_final_range": [2, 8], "nn_step_range": [1, 2]},
                   train={"epochs": 4, "batch_size": 8}, **sections)
    config.setdefault("loss", {})["nn_final"] = 4
    config["experiments"]["table3"]["variants"]["adaptive_searched"] = {
        "loss": {"name": "adaptive", "nn_from_search": True}}
    return config


def test_nn_from_search_needs_the_search_enabled():
    config = _searched()
    config["search"]["enabled"] = False
    with pytest.raises(ConfigError, match=r"experiments\.table3\.variants\.adaptive_searched"
                                          r"\.loss\.nn_from_search is true but config key "
                                          r"search\.enabled is false.*Set search\.enabled: true"):
        validate_config(config)


def test_nn_from_search_needs_adaptive_neighborhoods():
    config = _searched()
    config["experiments"]["table3"]["variants"]["yaware"]["loss"]["nn_from_search"] = True
    with pytest.raises(ConfigError, match=r"experiments\.table3\.variants\.yaware\.loss\."
                                          r"nn_from_search is true but config key experiments"
                                          r"\.table3\.variants\.yaware\.loss\.name is yaware"
                                          r".*nn_from_search: false"):
        validate_config(config)
    # set on the top-level loss section, inherited by every variant: the message says so
    inherited = _searched(loss={"nn_from_search": True})
    with pytest.raises(ConfigError, match=r"config key loss\.nn_from_search is true \(inherited "
                                          r"by experiments\.table3\.variants\.yaware\)"):
        validate_config(inherited)
    with pytest.raises(ConfigError, match=r"pretrain\.t1\.loss\.nn_from_search"):
        validate_config(_with_pretraining(loss={"name": "adaptive", "nn_from_search": True}))


def test_nn_from_search_replaces_the_schedule_check_by_the_search_ranges():
    # the configured nn_final (20 > batch 8) is replaced by the search's choice: accepted
    config = _searched()
    config["experiments"]["table3"]["variants"]["adaptive_searched"]["loss"]["nn_final"] = 20
    validate_config(config)
    # but every value the search can choose must fit the cell (the search trains with the
    # top-level train section, batch 8 and 4 epochs; this cell has batch 6 and 2 epochs)
    config["experiments"]["table3"]["variants"]["adaptive_searched"]["train"] = {
        "batch_size": 6, "epochs": 2}
    with pytest.raises(ConfigError) as raised:
        validate_config(config)
    lines = str(raised.value).splitlines()
    assert len(lines) == 2, lines
    assert ("search.nn_final_range [2, 8], cut to the search's train.batch_size 8), but config "
            "key experiments.table3.variants.adaptive_searched.train.batch_size is 6") in lines[0]
    assert "lower the upper end of search.nn_final_range to at most 6" in lines[0]
    assert ("search.nn_step_range [1, 2], cut to the search's train.epochs // 2 = 2), but "
            "config key experiments.table3.variants.adaptive_searched.train.epochs is 2") \
        in lines[1]
    assert "raise experiments.table3.variants.adaptive_searched.train.epochs to at least 4" \
        in lines[1]
    # a range the search itself cannot draw from
    empty = _searched()
    empty["search"]["nn_final_range"] = [10, 12]
    with pytest.raises(ConfigError, match=r"adaptive_searched\.loss\.nn_from_search is true, "
                                          r"but the random search cannot run: config key "
                                          r"search\.nn_final_range \[10, 12\] leaves no value"):
        validate_config(empty)


def test_one_view_and_a_neighbourhood_of_one_cannot_train():
    """train.views 1 with nn_final 1: the last neighbourhoods held the anchor alone, every
    pair was dropped, and the encoder trained on a loss of exactly 0 without a word."""
    config = _grid(train={"views": 1}, loss={"nn_final": 1})
    with pytest.raises(ConfigError, match=r"experiments\.table3\.variants\.adaptive \(loss\."
                                          r"name adaptive\): train\.views 1 with loss\.nn_final"
                                          r" 1 .*the loss is 0.* Fix: set train\.views: 2"
                       ) as raised:
        validate_config(config)
    assert "variants.yaware" not in str(raised.value)  # no neighbourhood without the loss
    validate_config(_grid(train={"views": 1}, loss={"nn_final": 2}))
    validate_config(_grid(train={"views": 2}, loss={"nn_final": 1}))
    # a cell taking the search's nn_final, and the search's own trials, may draw 1
    searched = _searched()
    searched["train"]["views"] = 1
    searched["search"]["nn_final_range"] = [1, 8]
    with pytest.raises(ConfigError) as raised:
        validate_config(searched)
    message = str(raised.value)
    assert ("adaptive_searched.loss.nn_from_search is true, and the random search may choose "
            "nn_final 1 (config key search.nn_final_range [1, 8]) while config key "
            "train.views is 1") in message
    assert "the random search's trials train with config key train.views 1" in message
    searched["search"]["nn_final_range"] = [2, 8]
    validate_config(searched)


@pytest.mark.parametrize("key", ["nn_final_range", "nn_step_range"])
@pytest.mark.parametrize("value", [[2], [1, 2, 3], []])
def test_a_search_range_is_two_numbers(key, value):
    """search_bounds unpacks [low, high]: another length stopped validate_config (or the
    search job) with a ValueError traceback."""
    with pytest.raises(ConfigError, match=rf"config key 'search\.{key}'"):
        validate_config({**_searched(), "search": {"enabled": True, key: value}})


def test_an_enabled_search_that_cannot_draw_stops_before_any_job():
    """Without a cell taking its result, an empty range used to pass validation and stop
    only the search job, after the preprocessing."""
    config = _grid(search={"enabled": True, "nn_step_range": [3, 5]},
                   train={"epochs": 4, "batch_size": 8}, loss={"nn_final": 4})
    with pytest.raises(ConfigError, match=r"config key search\.nn_step_range \[3, 5\] leaves "
                                          r"no value between 1 and train\.epochs // 2 \(2\)"):
        validate_config(config)
    config["search"]["enabled"] = False  # no search, nothing drawn
    validate_config(config)


def test_cells_differing_only_in_nn_from_search_train_their_own_encoders():
    config = validate_config(_searched())
    owners = encoder_owners(config)
    assert owners[("table3", "adaptive_searched", 0)] == ("table3", "adaptive_searched", 0)
    assert owners[("table3", "adaptive", 0)] == ("table3", "adaptive", 0)


def test_switching_an_experiment_off_moves_no_encoder():
    # the read-out ablation's ridge cell evaluates the encoder trained in the first cell
    # with its training settings, table3's; with table3 off it still does, so turning an
    # experiment off or on retrains nothing
    experiments = {
        "table3": {"seeds": [0], "variants": {"adaptive": {"loss": {"name": "adaptive"}}}},
        "predictor": {"seeds": [0], "variants": {
            "ridge": {"loss": {"name": "adaptive"}, "readout": {"method": "ridge"}},
            "l1": {"loss": {"name": "adaptive"}, "readout": {"method": "l1"}}}}}
    owners = encoder_owners(validate_config({"experiments": experiments}))
    switched_off = encoder_owners(validate_config(
        {"experiments": {**experiments, "table3": {**experiments["table3"], "enabled": False}}}))
    assert owners[("predictor", "ridge", 0)] == ("table3", "adaptive", 0)
    assert switched_off == owners


def test_untrained_encoders_keep_how_their_features_are_computed():
    # an untrained encoder's job still embeds the split: with train.precision float32 on
    # CUDA its features must not come out in the bf16 of the default 'auto'; what it would
    # have learnt with (loss, optimiser) is left out, so those cells share one encoder
    base = {"train": {"epochs": 0, "precision": "float32", "threads": 3, "deterministic": True}}
    experiments = {"baselines": {"seeds": [0], "variants": {
        "untrained": {},
        "untrained_other_loss": {"loss": {"name": "simclr"}, "train": {"lr": 0.5}},
        "untrained_bf16": {"train": {"precision": "bf16"}}}}}
    config = validate_config({**base, "experiments": experiments})
    untrained = training_settings(cell_settings(config, "baselines", "untrained", 0))
    resolved = resolve_cell(untrained)["train"]
    assert (resolved["precision"], resolved["threads"], resolved["deterministic"]) \
        == ("float32", 3, True)
    assert set(untrained) == {"seed", "model", "train"}  # no loss section
    owners = encoder_owners(config)
    assert owners[("baselines", "untrained_other_loss", 0)] == ("baselines", "untrained", 0)
    assert owners[("baselines", "untrained_bf16", 0)] == ("baselines", "untrained_bf16", 0)


# -- pretraining runs (config pretrain, model.init) -----------------------------------------

def _with_pretraining(**run) -> dict:
    return {"pretrain": {"t1": {"source": {"kind": "simulate"}, **run}},
            "experiments": {"table3": {"seeds": [0], "variants": {
                "adaptive": {"loss": {"name": "adaptive"}},
                "adaptive_pretrained": {"loss": {"name": "adaptive"},
                                        "model": {"init": "pretrained:t1"}}}}}}


def test_pretraining_defaults_are_the_papers_checkpoint():
    config = validate_config({**_with_pretraining(), "model": {"width": 8},
                              "train": {"threads": 3, "epochs": 7}})
    settings = pretrain_settings(config, "t1")
    assert settings["loss"]["name"] == "exponential" and settings["loss"]["sigma"] == 2.0
    assert settings["train"]["epochs"] == 300 and settings["train"]["batch_size"] == 32
    # the architecture and where it runs come from the config; the input is the T1w
    assert settings["model"]["width"] == 8 and settings["model"]["modalities"] == ["T1w"]
    assert settings["train"]["threads"] == 3
    assert settings["model"]["init"] == "scratch"


def test_pretraining_overrides_keep_the_other_defaults():
    settings = pretrain_settings(validate_config(_with_pretraining(
        train={"batch_size": 8}, loss={"name": "yaware"})), "t1")
    assert settings["train"]["batch_size"] == 8 and settings["train"]["epochs"] == 300
    assert settings["loss"]["name"] == "yaware"


def test_pretraining_on_the_training_cohorts_folder_is_refused(tmp_path, monkeypatch):
    """The test subjects' T1w and ages would reach the encoder before they are tested."""
    monkeypatch.chdir(tmp_path)
    same = {**_with_pretraining(source={"kind": "bids", "root": "./data/mre/"}),
            "dataset": {"root": str(tmp_path / "data" / "mre")}}
    with pytest.raises(ConfigError, match=r"pretrain\.t1\.source\.root.*\(dataset\.root\)"):
        validate_config(same)
    other = {**same, "pretrain": {"t1": {"source": {"kind": "bids", "root": "data/t1w"}}}}
    assert validate_config(other)["pretrain"]["t1"]["source"]["root"] == "data/t1w"


def test_a_simulation_into_another_cohorts_folder_is_refused_naming_both_keys(tmp_path,
                                                                              monkeypatch):
    """Two simulations into one folder left Snakemake two rules for its participants.tsv
    (AmbiguousRuleException); a simulation into a folder another cohort reads would feed
    that cohort the simulated subjects."""
    monkeypatch.chdir(tmp_path)
    both = validate_config({
        "dataset": {"root": "data/demo", "simulate": {"enabled": True}},
        "predict": {"cohorts": {"demo": "./data/demo/"},
                    "simulate": {"enabled": True, "cohort": "demo"}}})
    assert check_simulated_folders(both) == [
        "config: config keys 'dataset.root' and 'predict.cohorts.demo' are the same folder "
        "(data/demo), into which dataset.simulate and predict.simulate write their simulated "
        "cohorts. Give each cohort a folder of its own (a simulation an empty one)."]
    into_pretraining = validate_config({
        "dataset": {"root": "data/mre", "simulate": {"enabled": False}},
        "pretrain": {"t1": {"source": {"kind": "bids", "root": str(tmp_path / "data/t1w")}}},
        "predict": {"cohorts": {"clinic": "data/clinic", "new": "data/t1w"},
                    "simulate": {"enabled": True, "cohort": "new"}}})
    [message] = check_simulated_folders(into_pretraining)
    assert re.search(r"'predict\.cohorts\.new' and 'pretrain\.t1\.source\.root' are the "
                     r"same folder .* predict\.simulate writes its simulated cohort", message)
    # a cohort a model is applied to may be any folder no simulation writes
    read_only = validate_config({
        "dataset": {"root": "data/mre", "simulate": {"enabled": False}},
        "predict": {"cohorts": {"again": "data/mre", "demo": "data/new"},
                    "simulate": {"enabled": True, "cohort": "demo"}}})
    assert check_simulated_folders(read_only) == []


def test_a_pretraining_batch_larger_than_its_cohort_names_the_runs_key():
    """The run's batch (pretrain.<run>.train.batch_size, 32 by default, never the top-level
    train.batch_size) against its cohort's training subjects: the schema's defaults for a
    simulated cohort (24 subjects, 19 for training) cannot pretrain."""
    config = validate_config({**_with_pretraining(), "train": {"batch_size": 8},
                              "loss": {"nn_final": 4}})
    with pytest.raises(ConfigError, match=r"config key pretrain\.t1\.train\.batch_size is 32 "
                                          r"but pretraining run t1's T1w cohort has only 19 "
                                          r".*Lower pretrain\.t1\.train\.batch_size to at "
                                          r"most 19"):
        check_pretrain_batch_size(config, "t1", 19)
    check_pretrain_batch_size(config, "t1", 32)
    adaptive = validate_config({**_with_pretraining(loss={"name": "adaptive", "nn_final": 14}),
                                "train": {"batch_size": 8}, "loss": {"nn_final": 4}})
    with pytest.raises(ConfigError, match=r"at most 9 \(and pretrain\.t1\.loss\.nn_final, 14, "
                                          r"to at most the new batch size\)"):
        check_pretrain_batch_size(adaptive, "t1", 9)
    untrained = validate_config(_with_pretraining(train={"epochs": 0}))
    check_pretrain_batch_size(untrained, "t1", 3)  # no batch without training


def test_a_bias_fit_on_the_test_study_of_leave_one_study_out_is_refused():
    """Under split.scheme loso the exported model's split tests one whole study: a bundle's
    age-bias line fitted on it (18-32-year-olds of one site, when tried) was applied to
    every new subject at every age, 8.5 years off the training fit at 25."""
    with pytest.raises(ConfigError, match=r"config key predict\.bias_fit is 'test', but "
                                          r"split\.scheme is 'loso': .*Set predict\.bias_fit: "
                                          r"training"):
        validate_config({"split": {"scheme": "loso"}, "predict": {"bias_fit": "test"}})
    validate_config({"split": {"scheme": "loso"}})  # the default fit: out-of-fold training
    validate_config({"split": {"scheme": "kfold"}, "predict": {"bias_fit": "test"}})


def test_simulated_cohorts_beside_a_real_training_cohort_are_named():
    from brainage.config import simulated_beside_real_data

    demo = load_config(REPO / "config" / "config.yaml")
    assert simulated_beside_real_data(demo) == []  # the demo simulates everything
    demo["dataset"]["simulate"]["enabled"] = False
    warnings = simulated_beside_real_data(demo)
    assert len(warnings) == 2 and "pretrain.t1w.source.kind is 'simulate'" in warnings[0]
    assert "predict.simulate.enabled is true" in warnings[1]
    assert simulated_beside_real_data(validate_config(
        {"dataset": {"simulate": {"enabled": False}}})) == []  # README's own-data config


def test_an_init_the_variant_inherits_is_named_by_its_top_level_key():
    """paper.yaml without its pretrain section: the message named
    experiments.table3.variants.simclr.model.init, a key not in the file (the value came
    from the top-level model.init)."""
    config = _with_pretraining()
    config["model"] = {"init": "pretrained:t1"}
    config.pop("pretrain")
    with pytest.raises(ConfigError, match=r"config key 'model\.init' is 'pretrained:t1' but "
                                          r"config key pretrain has no run"):
        validate_config(config)


def test_an_exponent_yaml_reads_as_text_gets_a_hint():
    with pytest.raises(ConfigError, match=r"'train\.lr': '1e-3' is not of type 'number' "
                                          r"\(YAML reads 1e-3 as text: .*e\.g\. 1\.0e-3"):
        validate_config(yaml.safe_load("train:\n  lr: 1e-3\n"))
    with pytest.raises(ConfigError, match=r"'train\.lr': '1\.0e-3' is not of type 'number' "
                                          r"\(text, not a number: in a config file, remove its "
                                          r"quotes; .*--configfile"):
        validate_config(yaml.safe_load("train:\n  lr: '1.0e-3'\n"))
    with pytest.raises(ConfigError) as refused:  # a list expected: no hint about numbers
        validate_config(yaml.safe_load("readout:\n  alphas: 1e-3\n"))
    assert "YAML reads" not in str(refused.value) and "quotes" not in str(refused.value)


@pytest.mark.parametrize("text, hint", [
    ("dataset:\n  modalities: stiffness\n", "'dataset.modalities': 'stiffness' is not of type "
                                             "'array' (write a list: [stiffness])"),
    ("dataset:\n  simulate: false\n", "'dataset.simulate': False is not of type 'object' (it "
                                       "is a section: write {enabled: false})"),
    ("qc: 3\n", "'qc': 3 is not of type 'object' (it is a section: write its keys under it, "
                 "indented)"),
    ("pretrain: false\n", "'pretrain': False is not of type 'object' (it holds named entries: "
                          "write {} for none)"),
    ("dataset:\n  modalities: stiffness, damping_ratio\n", "(write a list: [stiffness, "
                                                         "damping_ratio])"),
    # a variant's section given as one value: its keys, not {} (which drops the override),
    # and no {enabled: ...} where a section needs more than enabled
    ("experiments:\n  table3: {variants: {a: {loss: adaptive}}}\n",
     "'experiments.table3.variants.a.loss': 'adaptive' is not of type 'object' (it is a "
     "section: write its keys under it, indented)"),
    ("experiments:\n  table3: false\n", "(it is a section: write its keys under it, indented)"),
    # a list quoted as text, a range: no list to suggest by wrapping it
    ("dataset:\n  modalities: '[stiffness]'\n", "is not of type 'array'\n"),
    ("search:\n  nn_final_range: 2-32\n", "is not of type 'array'\n"),
    # a variant with its lines commented out: YAML's null
    ("experiments:\n  table3: {variants: {simclr: }}\n",
     "'experiments.table3.variants.simclr': None is not of type 'object' (an empty section: "
     "write {} for one that sets nothing)"),
    # a name the user chose, with a character the folders and wildcards cannot take: the
    # refusal printed the regular expression
    ("predict:\n  cohorts: {patients-2024: /data/p}\n",
     "config key 'predict.cohorts': the name 'patients-2024' may hold only ASCII letters, digits "
     "and '_': it names folders and Snakemake wildcards. Rename it, e.g. 'patients_2024'"),
    ("experiments:\n  table3: {variants: {my variant: {}}}\n",
     "the name 'my variant' may hold only ASCII letters, digits, '_', '-' and '.' (not first)"),
    ("predict:\n  model: {name: my model}\n", "Rename it, e.g. 'my_model'"),
    ("predict:\n  cohorts: {Zürich: /data/z}\n", "Rename it, e.g. 'Zurich'"),
    # a name that names another key's cohort: renaming it alone left it naming none
    ("predict:\n  simulate: {cohort: my-clinic}\n",
     "Rename the cohort in predict.cohorts and here, e.g. 'my_clinic'"),
])
def test_a_list_or_section_written_as_one_value_is_told_its_shape(text, hint):
    # the YAML shapes a lab's first config gets wrong got jsonschema's words alone
    with pytest.raises(ConfigError) as refused:
        validate_config(yaml.safe_load(text))
    assert hint in str(refused.value) + "\n"


@pytest.mark.parametrize("override, key, what", [
    ("split={seed: 7}", "split.seed", "a number"),
    ("qc={exclude_failed: yes}", "qc.exclude_failed", "true or false"),
    ("qc={exclude_failed: on}", "qc.exclude_failed", "true or false"),
    ("dataset={simulate: {enabled: false}}", "dataset.simulate.enabled", "true or false"),
    ("normalise={resolution_mm: 6.5}", "normalise.resolution_mm", "a number"),
])
def test_a_value_from_snakemakes_config_option_is_told_to_go_in_a_config_file(
        override, key, what, monkeypatch):
    """snakemake --config reads every value inside a section as text: every number and
    true/false given so was refused as if mistyped, with no word of where the text came
    from (the planning's own advice, dataset.simulate.enabled: false, could not be
    followed with it)."""
    monkeypatch.setenv("SLURM_CONF", "/dev/null")  # see conftest.local_snakemake_environment
    from snakemake.cli import parse_config

    given = parse_config([override])
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': .* is not of type "
                                          rf".*\(text, not {what}: .*snakemake --config .* "
                                          rf"always arrives as text, so give it in a YAML file "
                                          rf"with --configfile instead\)"):
        validate_config(given)


def test_an_exponent_from_snakemakes_config_option_is_told_to_go_in_a_config_file(
        monkeypatch):
    """The exponent hint (write 1.0e-3) was wrong under --config, where 1.0e-3 is text too."""
    monkeypatch.setenv("SLURM_CONF", "/dev/null")  # see conftest.local_snakemake_environment
    from snakemake.cli import parse_config

    with pytest.raises(ConfigError, match=r"'train\.lr': '1e-3' is not of type 'number' \(YAML "
                                          r"reads 1e-3 as text: .*; with snakemake --config "
                                          r"inside a section any value arrives as text: give "
                                          r"it in a YAML file with --configfile\)"):
        validate_config(parse_config(["train={lr: 1e-3}"]))


def test_cell_names_its_pretraining_run():
    config = validate_config(_with_pretraining())
    assert cell_settings(config, "table3", "adaptive_pretrained", 0)["model"]["init"] == \
        "pretrained:t1"
    assert pretrained_run(cell_settings(config, "table3", "adaptive", 0)["model"]) is None


@pytest.mark.parametrize("change, message", [
    (lambda c: c["pretrain"].pop("t1"), r"model\.init.*pretrained:t1.*no run 't1'"),
    (lambda c: c["experiments"]["table3"]["variants"]["adaptive_pretrained"]["model"].update(
        init_checkpoint="x.pt"), r"model\.init.*model\.init_checkpoint.*keep one"),
    (lambda c: c["pretrain"]["t1"].update(source={"kind": "bids"}), r"pretrain\.t1\.source\.root"),
    (lambda c: c["pretrain"]["t1"].update(train={"epocs": 3}),
     r"pretrain\.t1\.train\.epocs.*did you mean 'epochs'"),
    (lambda c: c["pretrain"]["t1"].update(model={"modalities": ["stiffness"]}),
     r"pretrain\.t1\.model\.modalities.*cannot be set"),
    (lambda c: c["experiments"]["table3"]["variants"]["adaptive"].update(
        model={"init": "pretrained"}), r"model\.init"),
    # an encoder the run's weights do not fit: no tensor at all at another width, random
    # shortcut biases with bias_downsample; both named before the run pretrains for days
    (lambda c: c["experiments"]["table3"]["variants"]["adaptive_pretrained"]["model"].update(
        width=32), r"'experiments\.table3\.variants\.adaptive_pretrained\.model\.width' is "
                   r"32, but .* pretrained with 'model\.width' 64"),
    (lambda c: c["pretrain"]["t1"].update(model={"bias_downsample": True}),
     r"'model\.bias_downsample' is False, but .* 'pretrain\.t1\.model\.bias_downsample' True"),
])
def test_bad_pretraining_settings_stop_naming_the_key(change, message):
    config = _with_pretraining()
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_a_pretraining_run_always_trains_the_resnet():
    """pretrain_encoder trains the ResNet-18 whatever model.encoder says, but with encoder
    none evaluate_pretrained_encoder read out the raw voxels (metrics.json did not measure
    the encoder) and the run's Adaptive schedule went unchecked. The run's own override is
    refused, naming it; a top-level encoder none (the grid's default) is not the run's."""
    config = _with_pretraining(model={"encoder": "none"})
    with pytest.raises(ConfigError, match=r"pretrain\.t1\.model\.encoder.*cannot be set"):
        validate_config(config)
    inherited = validate_config({**_with_pretraining(), "model": {"encoder": "none"}})
    assert pretrain_settings(inherited, "t1")["model"]["encoder"] == "resnet18"
    explicit = validate_config(_with_pretraining(model={"encoder": "resnet18"}))
    assert pretrain_settings(explicit, "t1")["model"]["encoder"] == "resnet18"


def test_search_trials_must_fit_the_encoder_they_fine_tune():
    """The random search's trials fine-tune the pretraining run of the top-level model.init
    (rule search_hyperparameters) with the top-level model section: an encoder of another
    width loaded no tensor there, known only after the pretraining, although every cell
    fitted it."""
    config = _with_pretraining(model={"width": 32})
    config["model"] = {"init": "pretrained:t1"}
    config["search"] = {"enabled": True}
    for variant in config["experiments"]["table3"]["variants"].values():
        variant["model"] = {"width": 32}
    with pytest.raises(ConfigError, match=r"config key 'model\.width' is 64, but the encoder "
                                          r"the random search's trials fine-tune .*"
                                          r"'pretrain\.t1\.model\.width' 32"):
        validate_config(config)
    config["search"]["enabled"] = False  # no trial: the cells fit
    validate_config(config)
    config["search"]["enabled"] = True
    config["model"]["width"] = 32
    validate_config(config)


def test_a_cell_may_fine_tune_with_another_head():
    config = _with_pretraining()
    config["experiments"]["table3"]["variants"]["supervised_pretrained"] = {
        "loss": {"name": "supervised"},
        "model": {"init": "pretrained:t1", "head": "regression", "projection_dim": 1}}
    validate_config(config)


@pytest.mark.parametrize("text, key", [
    ("template:\n  space: >\n    MNI152NLin6Asym\n", "template.space"),
    ("predict:\n  model:\n    name: |\n      mybundle\n", "predict.model.name"),
    ("predict:\n  simulate:\n    id_prefix: |\n      new\n", "predict.simulate.id_prefix"),
    ('experiments:\n  "table3\\n":\n    variants: {adaptive: {}}\n', "experiments"),
    ("model:\n  init: >\n    scratch\n", "model.init"),
], ids=["space", "bundle", "id_prefix", "experiment", "init"])
def test_a_name_ending_in_a_newline_is_refused(text, key):
    # A YAML block scalar (| or >) ends its value with a newline, which Python's "$"
    # accepts: the name would reach file names (space-MNI152NLin6Asym\n_res-2...) or miss
    # every rule's wildcard pattern after hours of work.
    import yaml

    config = yaml.safe_load(text)
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}'.*newline"):
        validate_config(config)
    # the same value on its key's line is fine
    validate_config(yaml.safe_load(text.replace(">\n    ", "").replace("|\n      ", "")
                                   .replace("\\n", "")))


@pytest.mark.parametrize("section", ["split", "search"])
def test_a_negative_split_or_search_seed_is_refused_naming_the_key(section):
    # NumPy's generators take no negative seed: a split seed of -1 stopped the dry run with
    # a traceback from inside numpy, a search seed of -1 the search job after preprocessing.
    with pytest.raises(ConfigError, match=rf"'{section}\.seed'.*minimum"):
        validate_config({section: {"seed": -1}})
    assert validate_config({section: {"seed": 0}})[section]["seed"] == 0


def test_an_empty_list_of_ridge_alphas_is_refused_naming_the_key():
    # scikit-learn's grid search takes no empty grid: the read-out failed in every
    # evaluate_encoder job, after training
    with pytest.raises(ConfigError, match=r"'readout\.alphas'.*(empty|short)"):
        validate_config({"readout": {"alphas": []}})
    override = {"table3": {"variants": {"ridge": {"readout": {"alphas": []}}}}}
    with pytest.raises(ConfigError,
                       match=r"'experiments\.table3\.variants\.ridge\.readout\.alphas'"):
        validate_config({"experiments": override})
    assert validate_config({"readout": {"alphas": [1.0]}})["readout"]["alphas"] == [1.0]


def test_a_seed_beyond_scikit_learns_range_is_refused_naming_the_key():
    # a cell's seed also shuffles the folds of its age-bias correction (scikit-learn's
    # KFold, seeds below 2**32): seed 2**32 trained for hours, then failed in evaluation
    largest = 2**32 - 1
    experiment = {"table3": {"seeds": [0, 2**32], "variants": {"adaptive": {}}}}
    with pytest.raises(ConfigError, match=r"'experiments\.table3\.seeds\.1'.*maximum"):
        validate_config({"experiments": experiment})
    run = {"source": {"kind": "simulate"}, "seed": 2**32}
    with pytest.raises(ConfigError, match=r"'pretrain\.t1w\.seed'.*maximum"):
        validate_config({"pretrain": {"t1w": run}})
    with pytest.raises(ConfigError, match=r"'search\.seed'.*maximum"):  # the trials' seed
        validate_config({"search": {"seed": 2**32}})
    experiment["table3"]["seeds"] = [0, largest]
    assert (0, largest) == tuple(validate_config({"experiments": experiment})
                                 ["experiments"]["table3"]["seeds"])


def test_a_file_template_without_its_files_is_refused_naming_the_keys():
    # the template rule then had no input: Snakemake stopped the plan with an
    # InputFunctionException ("did not return str ... [None]") that named no config key
    with pytest.raises(ConfigError, match=r"keys 'template\.t1' and 'template\.mask' are not "
                                          r"set, but template\.source is 'file'"):
        validate_config({"template": {"source": "file"}})
    with pytest.raises(ConfigError, match=r"key 'template\.mask' is not set"):
        validate_config({"template": {"source": "file", "t1": "tpl/t1.nii.gz"}})
    template = {"source": "file", "t1": "tpl/t1.nii.gz", "mask": "tpl/mask.nii.gz"}
    assert validate_config({"template": template})["template"]["t1"] == "tpl/t1.nii.gz"
    assert validate_config({})["template"]["t1"] is None  # nilearn needs no file
    # a model bundle's record: its user passes the template files again
    from brainage.config import check_preprocessing_record
    record = {"preprocess": {}, "qc": {}, "template": {"source": "file"}}
    assert check_preprocessing_record(record, source="bundle")["template"]["t1"] is None


@pytest.mark.parametrize("section, key", [
    ({"resources": {"train": {"mem_mb": 0}}}, "resources.train.mem_mb"),
    ({"resources": {"preprocess": {"runtime_min": -1}}}, "resources.preprocess.runtime_min"),
    ({"pretrain": {"t1w": {"source": {"kind": "simulate"}, "resources": {"mem_mb": 0}}}},
     "pretrain.t1w.resources.mem_mb"),
])
def test_job_memory_and_wall_time_must_be_positive(section, key):
    """0 or a negative number passed a dry run: on SLURM --mem 0 asks for a whole node, a
    negative wall time fails at submission, after the jobs before it ran."""
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': -?\d+ is less "
                                          rf"than the minimum of 1"):
        validate_config(section)


@pytest.mark.parametrize("text, key", [
    ("experiments:\n  lambda:\n    variants:\n      0.5: {}\n", "experiments.lambda.variants.0.5"),
    ("experiments:\n  2024:\n    variants: {adaptive: {}}\n", "experiments.2024"),
    ("experiments:\n  table3:\n    variants:\n      on: {}\n", "experiments.table3.variants.True"),
    ("predict:\n  cohorts:\n    1: /data/cohort1\n", "predict.cohorts.1"),
], ids=["float", "int", "bool", "cohort"])
def test_a_name_yaml_reads_as_a_number_is_refused_naming_the_key(text, key):
    # the schema's name patterns check strings only: a variant named 0.5 passed, its cells'
    # paths held '0.5', and every job's lookup of that text stopped with "no variant '0.5'"
    import yaml

    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}'.*Quote the name"):
        validate_config(yaml.safe_load(text))
    quoted = re.sub(r"^(\s+)(0\.5|2024|on|1):", r"\1'\2':", text, flags=re.M)
    validate_config(yaml.safe_load(quoted))


@pytest.mark.parametrize("text", ["- train\n- model\n", "participant_id age sex study\n"],
                         ids=["list", "text"])
def test_a_config_file_that_holds_no_sections_is_named(tmp_path, text):
    # it stopped with AttributeError "'list' object has no attribute 'items'", no file named
    path = tmp_path / "wrong.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: a config file maps"):
        load_config(path)


@pytest.mark.parametrize("config, key", [
    ({"experiments": {"Table3": {"variants": {"adaptive": {}}},
                      "table3": {"variants": {"adaptive": {}}}}}, "experiments"),
    ({"experiments": {"table3": {"variants": {"mse": {}, "MSE": {}}}}},
     "experiments.table3.variants"),
    ({"pretrain": {"t1w": {"source": {"kind": "simulate"}},
                   "T1w": {"source": {"kind": "simulate"}}}}, "pretrain"),
    ({"predict": {"cohorts": {"adni": "/data/a", "ADNI": "/data/b"}}}, "predict.cohorts"),
], ids=["experiments", "variants", "pretrain", "cohorts"])
def test_names_differing_only_in_case_are_refused_naming_the_key(config, key):
    # each names a folder under results/: on macOS or a Windows share the two folders are
    # one, and one name's jobs overwrote the other's results without an error
    with pytest.raises(ConfigError, match=rf"config key {re.escape(key)} names .* differ only "
                                          rf"in case"):
        validate_config(config)
    # the same names in different mappings are separate folders
    validate_config({"experiments": {"a": {"variants": {"mse": {}}},
                                     "b": {"variants": {"mse": {}}}}})


@pytest.mark.parametrize("key, value", [("min_coverage", 70), ("min_dice", 85),
                                        ("min_correlation", 30), ("min_dice", -0.1)])
def test_a_qc_threshold_outside_its_metrics_range_is_refused_naming_the_key(key, value):
    # coverage is shown in percent (the subject QC figure, the report), so 70 for 70 %
    # passed, flagged every subject, and with qc.exclude_failed left no training subject
    with pytest.raises(ConfigError, match=rf"'qc\.{key}'.*(maximum|minimum)"):
        validate_config({"qc": {key: value}})
    assert validate_config({"qc": {key: 1}})["qc"][key] == 1


def test_a_cell_setting_outside_the_cell_sections_is_refused_naming_it():
    """A notebook's or test's cell settings with a misspelt section ('trian') would train
    with the defaults of the section it meant, without a word."""
    with pytest.raises(ConfigError, match=r"unknown key\(s\) trian"):
        resolve_cell({"trian": {"epochs": 3}})


def test_deep_merge_overrides_leaf_by_leaf_and_replaces_lists():
    """A variant overriding one key of a section keeps the config's other keys of that
    section (not the schema's defaults); a list is replaced, not extended."""
    from brainage.config import deep_merge

    base = {"train": {"epochs": 7, "batch_size": 4, "nested": {"a": 1, "b": 2}},
            "alphas": [1, 2, 3]}
    merged = deep_merge(base, {"train": {"batch_size": 8, "nested": {"b": 5}}, "alphas": [9]})
    assert merged == {"train": {"epochs": 7, "batch_size": 8, "nested": {"a": 1, "b": 5}},
                      "alphas": [9]}
    assert base["train"]["batch_size"] == 4  # the base is left as it was
    config = validate_config({"train": {"epochs": 70, "batch_size": 16}, "experiments": {
        "x": {"seeds": [0], "variants": {"a": {"train": {"batch_size": 32}}}}}})
    cell = cell_settings(config, "x", "a", 0)
    assert (cell["train"]["epochs"], cell["train"]["batch_size"]) == (70, 32)


def test_a_later_config_file_overrides_an_earlier_one(tmp_path):
    """``--configfile base.yaml site.yaml``: the site's values win, key by key; the base's
    other keys stay."""
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 60\n  batch_size: 16\n")
    (tmp_path / "site.yaml").write_text("train:\n  epochs: 70\n")
    config = load_config(tmp_path / "base.yaml", tmp_path / "site.yaml")
    assert (config["train"]["epochs"], config["train"]["batch_size"]) == (70, 16)


def test_a_preprocessing_record_without_a_section_is_refused_naming_it():
    """A bundle's record of how its training maps were preprocessed must hold each section:
    one without its qc section would be read with the schema's default thresholds, not
    those the model was trained with."""
    from brainage.config import check_preprocessing_record

    with pytest.raises(ConfigError, match=r"bundle x: the preprocessing record lacks the "
                                          r"section\(s\) qc\."):
        check_preprocessing_record({"preprocess": {}, "template": {}}, source="bundle x")
    check_preprocessing_record({"preprocess": {}, "qc": {}, "template": {}}, source="bundle x")


def test_a_cell_reading_a_map_the_dataset_does_not_provide_is_refused():
    """model.modalities must be among dataset.modalities: no subject is checked for any
    other map, so the cell would fail in its training job after hours of preprocessing."""
    with pytest.raises(ConfigError, match=r"'experiments\.x\.variants\.a\.model\.modalities' "
                                          r"lists damping_ratio, which config key "
                                          r"dataset\.modalities \(stiffness\)"):
        validate_config({"dataset": {"modalities": ["stiffness"]}, "experiments": {
            "x": {"variants": {"a": {"model": {"modalities": ["damping_ratio"]}}}}}})


def test_training_settings_leave_out_what_only_the_readout_uses():
    """Editing the read-out (readout.*, model.features) re-evaluates encoders and must not
    retrain them (hours per cell); a training setting does change them."""
    base = resolve_cell({"train": {"epochs": 3}})
    readout = resolve_cell({"train": {"epochs": 3}, "readout": {"method": "l1"},
                            "model": {"features": "encoder"}})
    assert base["readout"] != readout["readout"]
    assert base["model"]["features"] != readout["model"]["features"]
    assert training_settings(base) == training_settings(readout)
    assert training_settings(base) != training_settings(resolve_cell({"train": {"epochs": 4}}))


def test_the_supervised_loss_needs_the_projection_head_it_reads_the_age_from():
    """The supervised loss's regression head is the projection head; without it the cell
    trained with nothing to output an age."""
    supervised = {"loss": {"name": "supervised"}, "model": {
        "head": "regression", "projection_dim": 1, "features": "encoder"}}
    validate_config({"experiments": {"x": {"variants": {"a": supervised}}}})
    supervised["model"]["projection_head"] = False
    with pytest.raises(ConfigError, match=r"'experiments\.x\.variants\.a\.model\.projection_dim'"
                                          r".*set model\.projection_dim: 1 \(and "
                                          r"model\.projection_head: true\)"):
        validate_config({"experiments": {"x": {"variants": {"a": supervised}}}})


def test_a_pretraining_run_needs_output_folders_a_shell_command_takes_as_one_word():
    """A pretraining run's job starts through a shell command: output.results '/data/lab
    results' wrote its settings to a file /data/lab and the run failed (found by a
    review). Such a folder is refused at validation, named by its key; without a pretrain
    section (every other job runs Python, not a shell) it is accepted."""
    spaced = {"output": {"results": "lab results", "logs": "logs;rm"}}
    with pytest.raises(ConfigError) as refused:
        validate_config({**_with_pretraining(), **spaced})
    message = str(refused.value)
    assert "config key 'output.results' is 'lab results'" in message
    assert "config key 'output.logs' is 'logs;rm'" in message
    assert validate_config(spaced)["output"]["results"] == "lab results"
    # any alphabet's letters are one word (they were refused while the message said letters)
    fine = {"output": {"results": "/scratch/lab-1/run_2.0/Ergebnisse_Müller", "logs": "logs"}}
    assert validate_config({**_with_pretraining(), **fine})["output"] == {
        **fine["output"], "benchmarks": "benchmarks"}
    # a leading '-': the command read '--split-dir -out/...' as two options, after the
    # pretraining cohort was prepared (a review); './-out' is the same folder, accepted
    with pytest.raises(ConfigError, match=r"'output\.results' is '-out'.*not starting with -"):
        validate_config({**_with_pretraining(), "output": {"results": "-out"}})
    assert validate_config({**_with_pretraining(), "output": {"results": "./-out"}})


@pytest.mark.parametrize("top_level, named", [
    # every variant overrides what the search's trials take as it stands
    ({"loss": {"name": "supervised"}, "model": {"head": "regression", "projection_dim": 1},
      "train": {"views": 1}}, r"'loss.name' \(adaptive\) and 'model.head' \(regression\)"),
    ({"model": {"modalities": ["damping_ratio"]}}, r"'model.modalities' lists damping_ratio"),
    ({"model": {"init": "pretrained:missing"}}, r"'model.init' is 'pretrained:missing'"),
])
def test_the_searchs_own_settings_are_checked_before_any_job(top_level, named):
    """The search's trials train with the top-level sections as they stand (loss.name
    adaptive); a config whose variants all override a top-level section that cannot train
    passed validation, and the search job failed on its node after the preprocessing
    (found by a review)."""
    variant = {"loss": {"name": "adaptive"},
               "model": {"head": "projection", "projection_dim": 128, "modalities": None,
                         "init": "scratch"},
               "train": {"views": 2}}
    config = {**top_level, "search": {"enabled": True},
              "experiments": {"e": {"seeds": [0], "variants": {"an": variant}}}}
    with pytest.raises(ConfigError, match=named) as refused:
        validate_config(config)
    assert "the random search's trials train with the top-level" in str(refused.value)
    validate_config({**config, "search": {"enabled": False}})  # no search: nothing to check


def test_a_simulated_training_cohort_takes_no_accelerated_ageing_group():
    """Its subjects' stiffness looks older than they are, and the training cohort's every
    age is the model's target: the group was split, trained on and tested as healthy
    subjects, without a word (loso even gained a split of them)."""
    with pytest.raises(ConfigError, match=r"dataset\.simulate\.accelerated_group_n is 2, but "
                                          r"the training cohort is taken as healthy .*"
                                          r"\(predict\.simulate\.accelerated_group_n\)"):
        validate_config({"dataset": {"simulate": {"enabled": True, "accelerated_group_n": 2}}})
    validate_config({"dataset": {"simulate": {"enabled": False, "accelerated_group_n": 2}}})
    validate_config({"predict": {"simulate": {"accelerated_group_n": 4}}})


def test_a_retried_job_asks_for_more_memory():
    """The SLURM profile's two retries: a job stopped for its memory failed the same way
    twice more with the same request."""
    assert [resource_for_attempt(2000, attempt) for attempt in (1, 2, 3)] == [2000, 3000, 4000]


def test_a_training_job_books_at_most_the_one_gpu_it_uses():
    """A grid cell trains in one process on cuda:0: resources.train.gpu 2 booked an idle
    second card (and a longer queue wait) without a word."""
    config = load_config(REPO / "config" / "config.yaml")
    config["resources"]["train"]["gpu"] = 2
    with pytest.raises(ConfigError, match=r"resources\.train\.gpu.*maximum"):
        validate_config(config)



def test_the_schema_names_what_the_registries_know():
    """The schema's enums and the package's registries are kept by hand (the plan reads the
    schema without importing torch): a loss in the enum but not in LOSS_CLASSES passed the
    plan and failed in its training job, after SLURM queued and retried it (found by a
    review)."""
    from brainage.losses.registry import DISPLAY_NAMES, LOSS_NAMES
    from brainage.modalities import MODALITIES
    from brainage.readout import READOUT_METHODS

    schema = _shared_schema()["properties"]
    assert schema["loss"]["properties"]["name"]["enum"] == list(LOSS_NAMES)
    assert schema["readout"]["properties"]["method"]["enum"] == list(READOUT_METHODS)
    for section in ("dataset", "model"):
        assert schema[section]["properties"]["modalities"]["items"]["enum"] == list(MODALITIES)
    assert schema["model"]["properties"]["encoder"]["enum"] == ["resnet18", "none"]
    # two losses under one name made two identical rows of Table 3
    assert len(set(DISPLAY_NAMES.values())) == len(DISPLAY_NAMES)


def test_a_template_whose_files_and_space_label_disagree_is_warned_of():
    """template.source file kept the label MNI152NLin2009aSym unless template.space was set
    too: an FSL template's files were named as nilearn's, and atlas tools pick a template
    by that label (found by a review). The other way round, files given under the nilearn
    source were not read, and another label named nilearn's template wrongly. A label
    chosen on purpose is no mistake. Warnings at planning, before the first run."""
    from brainage.config import template_space_warnings

    def warnings(written):
        return template_space_warnings(validate_config({"template": written})["template"],
                                       written)

    files = {"source": "file", "t1": "/t/MNI152_T1_2mm.nii.gz", "mask": "/t/mask.nii.gz"}
    (warned,) = warnings(files)
    assert ("template.space is not set, so it is 'MNI152NLin2009aSym', nilearn's template"
            in warned and "MNI152NLin6Asym" in warned)
    assert warnings({**files, "space": "MNI152NLin6Asym"}) == []
    assert warnings({**files, "space": "MNI152NLin2009aSym"}) == []  # TemplateFlow's files
    assert template_space_warnings(validate_config({})["template"], None) == []
    forgot_the_source = {"t1": files["t1"], "mask": files["mask"], "space": "MNI152NLin6Asym"}
    unread, mislabelled = warnings(forgot_the_source)
    assert "template.t1 and template.mask are set but template.source is 'nilearn'" in unread
    assert ("template.space is 'MNI152NLin6Asym' but template.source is 'nilearn', whose "
            "template is MNI152NLin2009aSym") in mislabelled


def test_the_readmes_first_cpu_run_config_is_accepted():
    # README, own data: "take config/config.yaml's <keys> keys for a first run on a CPU"
    # (it named test.yaml's, whose 2 epochs mean nothing, and a lab exported that model);
    # with normalise, train and model alone, the paper's loss.nn_final 14 refused a small
    # batch (found in a review); and the example of a few cells, with the exported one
    readme = (REPO / "README.md").read_text()
    text = " ".join(readme.split())
    named = re.search(r"take `config/config\.yaml`'s (.*?) keys for a first run on a CPU", text)
    sections = re.findall(r"`(\w+)`", named.group(1))
    assert {"train", "model", "loss", "normalise"} <= set(sections)
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    few_cells = yaml.safe_load(re.search(r"```yaml\n(experiments:.*?)```", readme,
                                         re.S).group(1))
    config = validate_config({"dataset": {"root": "/data/my_study", "simulate": {"enabled": False}},
                              **{section: demo[section] for section in sections}, **few_cells},
                             template_files=False)
    from brainage.config import exported_cell, grid_cells
    assert exported_cell(config) == ("table3", "adaptive", 0)
    assert len(grid_cells(config)) == 2
