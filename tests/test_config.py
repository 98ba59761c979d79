"""The config schema is the documentation: every key described, defaulted, typos rejected."""

from pathlib import Path

import pytest

from brainage.config import (
    ConfigError,
    cell_settings,
    grid_cells,
    load_config,
    load_schema,
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
    schema = load_schema()
    undocumented = [key for key, sub in _properties(schema)
                    if "description" not in sub and "$ref" not in sub]
    undefaulted = [key for key, sub in _properties(schema) if "default" not in sub]
    assert undocumented == []
    assert undefaulted == []


def test_every_object_rejects_unknown_keys():
    schema = load_schema()
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


def test_variant_overrides_are_validated():
    bad = {"experiments": {"x": {"variants": {"a": {"loss": {"sigmaa": 1.0}}}}}}
    with pytest.raises(ConfigError, match="sigmaa"):
        validate_config(bad)


@pytest.mark.parametrize("bad", [
    {"predict": {"model": {"name": ".."}}},
    {"experiments": {"table3": {"variants": {"..": {"loss": {"name": "yaware"}}}}}},
], ids=["bundle", "variant"])
def test_names_that_would_leave_their_folder_are_rejected(bad):
    with pytest.raises(ConfigError, match=r"\.\."):
        validate_config(bad)


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


def test_disabled_experiment_adds_no_cells():
    config = validate_config({"experiments": {"off": {"enabled": False,
                                                      "variants": {"a": {}}}}})
    assert grid_cells(config) == []


def test_unknown_cell_is_reported():
    config = validate_config({"experiments": {"e": {"variants": {"a": {}}}}})
    with pytest.raises(ConfigError, match="no variant 'b'"):
        cell_settings(config, "e", "b", 0)
