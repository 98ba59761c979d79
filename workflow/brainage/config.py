"""Configuration: schema validation with defaults, and the settings of one grid cell.

The JSON schema in ``workflow/brainage/schemas/config.schema.yaml`` is the documentation of the
config: every key has a description and a default, unknown keys are rejected. The workflow
(``common.smk``) and the package's command lines both validate through
:func:`validate_config`, which fills the defaults from it, so a setting means the same thing
in both places.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from brainage.paths import names_sharing_a_folder

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"  # package data (pyproject.toml)
CONFIG_SCHEMA = SCHEMA_DIR / "config.schema.yaml"
PARTICIPANTS_SCHEMA = SCHEMA_DIR / "participants.schema.yaml"

#: Config sections a grid cell may override (experiments.<name>.variants.<variant>).
CELL_SECTIONS = ("loss", "train", "model", "readout")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


#: libyaml's safe loader where PyYAML has it: the 35 kB config schema in 0.01 s instead of
#: 0.07 s, in every job that resolves a cell and at every Snakemake start
SCHEMA_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=4)
def _parsed_schema(path: str) -> dict:
    with open(path) as handle:
        return yaml.load(handle, Loader=SCHEMA_LOADER)


def _shared_schema() -> dict:
    """The schema parsed once per process, shared: read it, never modify it (resolving
    a cell without copying the schema is what keeps planning the grid quick)."""
    return _parsed_schema(str(CONFIG_SCHEMA))


def _validator_filling_defaults(schema: Mapping) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator of ``schema`` that writes each property's default into the
    instance (:func:`_defaults_filling_validator_class`)."""
    return _defaults_filling_validator_class()(schema)


def _number_as_the_default(value: Any, default: Any) -> Any:
    """A number written as the key's schema default is: ``sigma: 2`` as 2.0 where the default
    is 2.0, ``cutout_size_mm: 64.0`` as 64 where it is 64 (a list of numbers element by
    element). Snakemake compares params by their repr, where 2 and 2.0 differ, so writing a
    default, or any whole number, the other way would rerun every job that takes it."""
    def is_number(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if isinstance(value, list) and isinstance(default, list) and default:
        return [_number_as_the_default(item, default[0]) for item in value]
    if not (is_number(value) and is_number(default)):
        return value
    if isinstance(default, float):
        return float(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


@lru_cache(maxsize=1)
def _defaults_filling_validator_class() -> type:
    """Draft 2020-12 with defaults filled before the other keywords run, so that nested
    objects declared with ``default: {}`` receive their own defaults too.

    Built once per process: ``jsonschema.validators.extend`` compiles a new class each
    call, and resolving the paper grid calls this once per cell.
    """
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def pattern_to_the_end(validator, pattern, instance, schema_node):
        # JSON Schema patterns are ECMA-262 regular expressions, whose "$" matches at the
        # end of the string only; Python's also matches before a final newline, which a
        # YAML block scalar (| or >) adds: "space: >" would name files "space-MNI...\n".
        if validator.is_type(instance, "string") and not re.search(
                _anchored_at_the_end(pattern), instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")

    def fill_then_validate(validator, properties, instance, schema_node):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if name not in instance and "default" in subschema:
                    instance[name] = copy.deepcopy(subschema["default"])
                elif name in instance:
                    instance[name] = _number_as_the_default(instance[name],
                                                            subschema.get("default"))
            # Declared keys in the schema's order, whatever order the file wrote them in
            # (a default written out included): Snakemake compares params by their repr,
            # where a dict's key order shows, so another order would rerun every job that
            # takes these settings. Names the user chooses (experiments, variants, runs)
            # are no declared properties and keep the user's order.
            ordered = [(name, instance[name]) for name in properties if name in instance]
            ordered += [(name, value) for name, value in instance.items()
                        if name not in properties]
            instance.clear()
            instance.update(ordered)
        yield from validate_properties(validator, properties, instance, schema_node)

    return jsonschema.validators.extend(base, {"properties": fill_then_validate,
                                               "pattern": pattern_to_the_end})


@lru_cache(maxsize=64)
def _anchored_at_the_end(pattern: str) -> str:
    """``pattern`` with a final ``$`` meaning the end of the string, as in JSON Schema."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


#: Why a number or a boolean arrived as text: quotes in a file, or Snakemake's --config,
#: which reads every value inside a section as text (YAML's BaseLoader).
_QUOTED_OR_COMMAND_LINE = (
    "text, not {what}: in a config file, remove its quotes; a value given inside a section "
    "with snakemake --config (--config 'split={{seed: 7}}') always arrives as text, so give it "
    "in a YAML file with --configfile instead")


#: Experiment names of the pipeline's own cells (the random search's, a pretraining run's),
#: which the schema refuses for the user's experiments.
RESERVED_EXPERIMENTS = ("search", "pretrain")


def _describe(error: jsonschema.ValidationError, source: str, prefix: str = "") -> str:
    """One line per schema error: the full dotted key path, what is wrong, and for an
    unknown key the nearest known spelling."""
    path = [part for part in (prefix,) if part] + [str(part) for part in error.absolute_path]
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = list(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        if len(unknown) == 1:
            path.append(unknown[0])
        hints = [f"'{name}' -> did you mean '{match[0]}'?" for name in unknown
                 for match in [difflib.get_close_matches(name, known, n=1)] if match]
        message += (f" (unknown key: {'; '.join(hints) or 'check its spelling'}; every key "
                    f"is listed in workflow/brainage/schemas/config.schema.yaml)")
    if (error.validator == "pattern" and isinstance(error.instance, str)
            and error.instance.endswith("\n")):
        message += (" (it ends in a newline, as a YAML block scalar, | or >, writes one: "
                    "put the value on its key's line)")
    elif (error.validator == "pattern" and isinstance(error.instance, str)
          and error.validator_value.startswith("^[A-Za-z0-9_")):
        # a name the user chose (a cohort, an experiment, a run): the regex said nothing
        # of which character to change
        allowed = ("ASCII letters, digits, '_', '-' and '.' (not first)"
                   if re.search(error.validator_value, "a-b.c")
                   else "ASCII letters, digits and '_'")
        ascii_name = unicodedata.normalize("NFKD", error.instance).encode("ascii", "ignore")
        renamed = re.sub(r"[^A-Za-z0-9_]+", "_", ascii_name.decode()).strip("_") or "name1"
        if renamed in RESERVED_EXPERIMENTS:  # refused next: suggest a name that passes
            renamed += "_1"
        # predict.simulate.cohort names a cohort of predict.cohorts, renamed with it
        rename = ("Rename the cohort in predict.cohorts and here" if path[-3:] == [
            "predict", "simulate", "cohort"] else "Rename it")
        message = (f"the name {error.instance!r} may hold only {allowed}: it names folders "
                   f"and Snakemake wildcards. {rename}, e.g. {renamed!r}")
    if error.validator == "not" and error.instance in RESERVED_EXPERIMENTS:
        message = (f"the name {error.instance!r} is the pipeline's own (the random search's "
                   f"and the pretraining runs' cells): rename the experiment, e.g. "
                   f"{error.instance + '_1'!r}")
    if error.validator == "type" and error.instance is None and "object" in (
            error.validator_value if isinstance(error.validator_value, list)
            else [error.validator_value]):
        message += " (an empty section: write {} for one that sets nothing)"
    types = error.validator_value if isinstance(error.validator_value, list) else [
        error.validator_value]
    if error.validator == "type" and isinstance(error.instance, str):
        text = error.instance.strip()
        number = {"number", "integer"} & set(types)
        if number and re.fullmatch(r"[+-]?(\d+|(\d+\.\d*|\.\d+)([eE][+-]\d+)?)", text):
            message += f" ({_QUOTED_OR_COMMAND_LINE.format(what='a number')})"
        elif number and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", text):
            message += (f" (YAML reads {text} as text: a number with an exponent needs a "
                        f"decimal point and a sign, e.g. 1.0e-3, or write 0.001; with "
                        f"snakemake --config inside a section any value arrives as text: give "
                        f"it in a YAML file with --configfile)")
        elif "boolean" in types and text.lower() in ("true", "false", "yes", "no", "on", "off"):
            message += f" ({_QUOTED_OR_COMMAND_LINE.format(what='true or false')})"
    # a list or a section written as one value, the YAML shapes a first config gets wrong
    scalar = isinstance(error.instance, (bool, str, int, float))
    if (error.validator == "type" and types == ["array"] and scalar  # names or numbers
            and re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", str(error.instance))):
        message += f" (write a list: [{error.instance}])"
    elif error.validator == "type" and types == ["object"] and scalar:
        properties = error.schema.get("properties")
        named = properties is None and isinstance(error.schema.get("additionalProperties"), dict)
        if named and not error.schema.get("minProperties"):  # pretraining runs, cohorts
            message += " (it holds named entries: write {} for none)"
        elif (isinstance(error.instance, bool) and "enabled" in (properties or {})
              and set(error.schema.get("required", [])) <= {"enabled"}):
            message += f" (it is a section: write {{enabled: {str(error.instance).lower()}}})"
        else:
            message += " (it is a section: write its keys under it, indented)"
    return f"{source}: config key '{'.'.join(path) or '(top level)'}': {message}"


def validate_config(config: Mapping[str, Any], *, source: str = "config",
                    template_files: bool = True) -> dict:
    """Return a deep copy of ``config`` validated against the schema, defaults filled in.

    Every variant of every experiment is resolved too (:func:`cell_settings`), so a typo
    in an override stops the run here, named by its full path; the variants of the
    enabled experiments must also give Adaptive Neighborhoods a schedule it can run
    (:func:`check_adaptive_schedule`), and those taking it from the random search
    (``loss.nn_from_search``) need the search and every value it can choose
    (:func:`check_search_source`); an enabled search needs a value to draw in each range
    (:func:`search_bounds`). With ``template_files`` a template from files needs both
    (:func:`check_template_files`); a model bundle's preprocessing record need not name
    them, since its user gives the files again (``--template-t1``, ``--template-mask``).

    Raises
    ------
    ConfigError
        Naming the offending key, e.g. ``config key 'train.epocs': Additional properties
        are not allowed ('epocs' was unexpected) (unknown key: 'epocs' -> did you mean
        'epochs'?; ...)``.
    """
    filled = copy.deepcopy(dict(config))
    unquoted = _names_not_text(filled)
    if unquoted:
        raise ConfigError("\n".join(
            f"{source}: config key '{where}': the name {name!r} is read as a "
            f"{type(name).__name__}, not as text (YAML reads an unquoted 1, 0.5, yes or on "
            f"so), and the workflow, which finds names in file paths, would not find it. "
            f"Quote the name as written in the file (e.g. '0.5': instead of 0.5:)."
            for where, name in unquoted))
    validator = _validator_filling_defaults(_shared_schema())
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("\n".join(_describe(error, source) for error in errors))
    problems = (check_template_files(filled["template"], source=source) if template_files
                else [])
    problems += check_names_differing_in_case(filled, source=source)
    simulation = filled["dataset"]["simulate"]
    if simulation["enabled"] and simulation["accelerated_group_n"] > 0:
        # every training subject's age is the model's target: subjects whose stiffness
        # looks older than they are would bias the model and its test MAE, unannounced
        problems.append(
            f"{source}: config key dataset.simulate.accelerated_group_n is "
            f"{simulation['accelerated_group_n']}, but the training cohort is taken as "
            f"healthy (each subject's age is what the model learns). Set it to 0, and give "
            f"the accelerated-ageing group to the cohort to predict "
            f"(predict.simulate.accelerated_group_n).")
    pretrained_models = {}
    for name in filled.get("pretrain", {}):
        run_settings = pretrain_settings(filled, name, source=source)
        pretrained_models[name] = run_settings["model"]
        problems += check_adaptive_schedule(run_settings, source=source)
        problems += check_pretraining_source(filled, name, source=source)
        problems += check_head(filled, "pretrain", name, run_settings, source=source)
    for experiment, definition in filled.get("experiments", {}).items():
        for variant in definition["variants"]:
            settings = cell_settings(filled, experiment, variant, 0, source=source)
            if definition.get("enabled", True):
                problems += check_adaptive_schedule(settings, source=source)
                problems += check_search_source(filled, experiment, variant, settings,
                                                source=source)
                problems += check_pretrained_encoder_fits(
                    filled, experiment, variant, settings, pretrained_models, source=source)
                problems += check_head(filled, experiment, variant, settings, source=source)
    if filled["search"]["enabled"]:  # its job draws from the ranges cut to the train section
        problems += check_search_settings(filled, source=source)
        # its trials fine-tune the top-level model.init's run with the top-level model
        problems += check_pretrained_encoder_fits(filled, "search", "adaptive",
                                                  search_settings(filled), pretrained_models,
                                                  source=source)
        problems += check_head(filled, "search", "adaptive", search_settings(filled),
                               source=source)
        try:
            bounds = search_bounds(filled["search"], batch_size=filled["train"]["batch_size"],
                                   epochs=filled["train"]["epochs"])
        except ConfigError as error:
            problems.append(f"{source}: {error}")
        else:
            if lone_anchor(filled["train"]["views"], bounds["nn_final"][0]):
                problems.append(
                    f"{source}: the random search's trials train with config key train.views "
                    f"1 and may draw nn_final 1 (config key search.nn_final_range "
                    f"{list(filled['search']['nn_final_range'])}): {LONE_ANCHOR} Fix: set "
                    f"train.views: 2 or raise the lower end of search.nn_final_range to 2.")
    if filled.get("pretrain"):
        problems += check_shell_safe_outputs(filled, source=source)
    problems += check_bias_fit(filled, source=source)
    if problems:
        raise ConfigError("\n".join(problems))
    return filled


def check_bias_fit(config: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """Messages (none when fine) for ``predict.bias_fit: test`` under split scheme ``loso``:
    the exported model's split tests one whole study, so the bundle's age-bias line would
    be fitted on that study's ages and site alone and applied to every new subject."""
    if config["predict"]["bias_fit"] != "test" or config["split"]["scheme"] != "loso":
        return []
    return [f"{source}: config key predict.bias_fit is 'test', but split.scheme is 'loso': "
            f"the exported model's split tests one whole study, so the bundle's age-bias "
            f"line would be fitted on that study's age range and site alone, then applied "
            f"to every new subject. Set predict.bias_fit: training (out-of-fold predictions "
            f"of the training subjects, all other studies), or fit it on each new cohort's "
            f"controls (predict.bias_reference_group)."]


def check_search_settings(config: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """Messages (none when fine) for the random search's own settings: its trials train
    with the top-level ``loss`` (as Adaptive Neighborhoods), ``train`` and ``model``
    sections (:func:`search_settings`), which no cell may use as they stand when every
    variant overrides them, so they were checked first by the search job, on a GPU node
    after the preprocessing."""
    try:
        _checked_cell(config, search_settings(config), where="", source=source)
    except ConfigError as error:
        return [f"{error} (the random search's trials train with the top-level loss, train "
                f"and model sections, with loss.name adaptive; search.enabled is true)"]
    return []


#: Characters a path may hold and still pass a shell command as one word, unquoted: the
#: letters of any alphabet (Ergebnisse_Müller; a shell splits and expands on ASCII
#: characters only), digits and / . _ + , : @ % = -, but not a leading - (the command's
#: parser would take ``--split-dir -out/...`` for two options).
_SHELL_WORD = re.compile(r"(?!-)[\w/.+,:@%=-]+")


def check_shell_safe_outputs(config: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """Messages (none when fine) for output folders a pretraining run's job cannot be given.

    That job starts its processes through a shell command (``rule pretrain_encoder``),
    where a path with a space or a shell character splits or expands: ``output.results:
    /data/lab results`` wrote the run's settings to a file ``/data/lab``. Quoting them in
    the command would rerun every finished pretraining run and every cell fine-tuned from
    it, since Snakemake reruns a job whose shell command changed.
    """
    return [f"{source}: config key 'output.{key}' is {config['output'][key]!r}: a pretraining "
            f"run's job passes its paths through a shell command, where a space or any of "
            f"\"'$`;&|<>()*?[]{{}}~!# splits or expands them. Choose a folder of letters, "
            f"digits and / . _ + , : @ % = -, not starting with - (./ before such a name, or "
            f"a symbolic link to the folder you want, works), "
            f"or remove the pretrain section."
            for key in ("results", "logs") if not _SHELL_WORD.fullmatch(config["output"][key])]


def _names_not_text(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """``(dotted config key, name)`` of every mapping key in ``node`` that is not a string.

    The schema's name patterns (``propertyNames``) check strings only, so a variant named
    ``0.5`` or an experiment named ``2024`` passed; its cells' paths hold the name as text
    and every job's lookup by that text failed ("no variant '0.5'").
    """
    found = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = (*path, str(key))
            if not isinstance(key, str):
                found.append((".".join(where), key))
            found += _names_not_text(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _names_not_text(value, (*path, str(index)))
    return found


def check_names_differing_in_case(config: Mapping[str, Any], *,
                                  source: str = "config") -> list[str]:
    """Messages (none when fine) for names the user chooses that differ only in case within
    one mapping: experiments, an experiment's variants, pretraining runs, predict cohorts.

    Each names a folder under results/ (``train/<split>/<experiment>/<variant>``,
    ``pretrain/<run>``, ``predict/<cohort>``): on a case-insensitive file system (macOS,
    Windows shares) two such folders are one, and the jobs of one name overwrite the
    other's results without an error, as participant ids differing in case would.
    """
    named = [("experiments", config.get("experiments", {})),
             *[(f"experiments.{name}.variants", experiment.get("variants", {}))
               for name, experiment in config.get("experiments", {}).items()],
             ("pretrain", config.get("pretrain", {})),
             ("predict.cohorts", config.get("predict", {}).get("cohorts", {}))]
    return [f"{source}: config key {key} names {' and '.join(map(repr, clashing))}, which "
            f"differ only in case: their folders under results/ would be one on a "
            f"case-insensitive file system (macOS, Windows shares), where one's results "
            f"would overwrite the other's. Rename one of them."
            for key, names in named for clashing in names_sharing_a_folder(names)]


def check_template_files(template: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """With ``template.source: file`` both ``template.t1`` and ``template.mask`` name a file
    (without them the workflow's template rule has no input, and Snakemake stopped the
    plan with an InputFunctionException that named neither key)."""
    if template["source"] != "file":
        return []
    unset = [f"'template.{key}'" for key in ("t1", "mask") if not template[key]]
    if not unset:
        return []
    return [f"{source}: config key{'s' if len(unset) > 1 else ''} {' and '.join(unset)} "
            f"{'are' if len(unset) > 1 else 'is'} not set, but template.source is 'file' "
            f"(your own template). Give both template.t1 (a T1 template at 2 mm) and "
            f"template.mask (its brain mask on the same grid), or set template.source: "
            f"nilearn."]


def template_space_warnings(template: Mapping[str, Any],
                            written: Mapping[str, Any] | None) -> list[str]:
    """Warnings (none when fine) for a template whose files and space label disagree.

    ``template``: the validated section; ``written``: the section as the config files give
    it (None without one), to tell a label left out from one chosen. With ``source: file``
    and no ``space`` written, every registered file, the template folder and the sidecars
    name nilearn's ``MNI152NLin2009aSym`` for the user's own template (an FSL template is
    MNI152NLin6Asym), which atlas tools read by that label. With ``source: nilearn``, a
    ``t1``/``mask`` is not read and another ``space`` mislabels nilearn's template.
    Warnings, not refusals: a finished run keeps its files, and a new label renames every
    output and reruns the whole pipeline.
    """
    written = written or {}
    later = "changing it later renames every output and reruns the pipeline"
    default = _shared_schema()["properties"]["template"]["properties"]["space"]["default"]
    if template["source"] == "file":
        if "space" in written:
            return []
        return [f"Warning: template.source is 'file' (your own template) but template.space "
                f"is not set, so it is {default!r}, nilearn's template: every registered "
                f"file and sidecar will name that template. Set template.space to your "
                f"template's TemplateFlow name (e.g. MNI152NLin6Asym for FSL's "
                f"MNI152_T1_2mm) before the first run; {later}."]
    warnings = []
    given = [f"template.{key}" for key in ("t1", "mask") if template.get(key)]
    if given:
        warnings.append(f"Warning: {' and '.join(given)} {'are' if len(given) > 1 else 'is'} "
                        f"set but template.source is 'nilearn': the files are not read, "
                        f"nilearn's template is. Set template.source: file to register to "
                        f"them.")
    if template["space"] != default:
        warnings.append(f"Warning: template.space is {template['space']!r} but "
                        f"template.source is 'nilearn', whose template is {default}: every "
                        f"registered file would be labelled with the wrong template. Set "
                        f"template.source: file with your template's files, or remove "
                        f"template.space; {later}.")
    return warnings


def check_pretraining_source(config: Mapping[str, Any], name: str, *,
                             source: str = "config") -> list[str]:
    """A pretraining run must not read the training cohort itself (``dataset.root``).

    Its subjects would include the test subjects, and the pretraining loss sees their images
    and ages (the kernel losses weigh pairs by age), so every cell fine-tuned from it would
    report an optimistic test MAE. Only the folder is compared here, from the config; a
    separate T1w cohort holding some of the test subjects is refused by their ids once its
    table is read (:func:`brainage.normalise.check_pretraining_cohort`).
    """
    run_source = config["pretrain"][name]["source"]
    if run_source["kind"] != "bids" or run_source.get("root") is None:
        return []
    if Path(run_source["root"]).resolve() != Path(config["dataset"]["root"]).resolve():
        return []
    return [f"{source}: config key 'pretrain.{name}.source.root' ({run_source['root']}) is "
            f"the training cohort's folder (dataset.root): pretraining on it would show the "
            f"encoder the test subjects' images and ages before they are tested. Pretrain on "
            f"a separate T1w cohort (source.kind bids with another root, or openbhb)."]


def cohort_folders(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """Every cohort folder the config names: ``(config key, folder, simulated)`` for the
    training cohort (``dataset.root``), each predict cohort and each bids pretraining
    source (a simulated pretraining cohort lives under the results folder)."""
    predict = config["predict"]
    simulated_cohort = predict["simulate"]["cohort"] if predict["simulate"]["enabled"] else None
    return [("dataset.root", config["dataset"]["root"],
             config["dataset"]["simulate"]["enabled"]),
            *[(f"predict.cohorts.{name}", root, name == simulated_cohort)
              for name, root in predict["cohorts"].items()],
            *[(f"pretrain.{name}.source.root", run["source"]["root"], False)
              for name, run in config.get("pretrain", {}).items()
              if run["source"]["kind"] == "bids" and run["source"].get("root")]]


def simulated_beside_real_data(config: Mapping[str, Any]) -> list[str]:
    """Warnings for simulated cohorts in a config whose training cohort is real data
    (``dataset.simulate.enabled`` false): a copy of the demo config with only the dataset
    changed still pretrained on simulated T1w brains and predicted simulated subjects,
    and its tables said nothing of it."""
    if config["dataset"]["simulate"]["enabled"]:
        return []
    warnings = [
        f"Warning: config key pretrain.{name}.source.kind is 'simulate' while the training "
        f"cohort is real data (dataset.simulate.enabled: false): pretraining run {name} "
        f"trains on simulated T1w brains, and so do the cells that start from it "
        f"(model.init: pretrained:{name}) and the pretraining tables. Point it at a T1w "
        f"cohort (source.kind: bids or openbhb), or remove the run and its cells, unless "
        f"that is meant."
        for name, run in (config.get("pretrain") or {}).items()
        if run["source"]["kind"] == "simulate"]
    if config["predict"]["simulate"]["enabled"]:
        cohort = config["predict"]["simulate"]["cohort"]
        warnings.append(
            f"Warning: config key predict.simulate.enabled is true while the training cohort "
            f"is real data (dataset.simulate.enabled: false): cohort {cohort} "
            f"(predict.cohorts.{cohort}) holds simulated subjects, whose predictions say "
            f"nothing about real ones. Set predict.simulate.enabled: false and point "
            f"predict.cohorts at your scans, unless that is meant.")
    return warnings


def check_simulated_folders(config: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """Messages (none when fine) for a simulated cohort whose folder is another cohort's.

    The simulation writes its whole dataset there: two simulations into one folder left
    Snakemake with two rules for one participants.tsv (an AmbiguousRuleException), and a
    simulation into a folder another cohort reads from would stop at its first job or
    feed that cohort the simulated subjects. Folders are compared once resolved.
    """
    folders = cohort_folders(config)
    problems = []
    for index, (key, folder, simulated) in enumerate(folders):
        for other_key, other_folder, other_simulated in folders[index + 1:]:
            if not (simulated or other_simulated):
                continue
            if Path(folder).resolve() != Path(other_folder).resolve():
                continue
            writers = [("dataset.simulate" if name == "dataset.root" else "predict.simulate")
                       for name, writes in ((key, simulated), (other_key, other_simulated))
                       if writes]
            problems.append(
                f"{source}: config keys '{key}' and '{other_key}' are the same folder "
                f"({folder}), into which {' and '.join(writers)} "
                f"{'write their simulated cohorts' if len(writers) > 1 else 'writes its simulated cohort'}. "
                f"Give each cohort a folder of its own (a simulation an empty one).")
    return problems


#: model keys that shape the encoder's tensors. A cell fine-tuning a pretraining run of the
#: same config needs the run's values: a different width loads no tensor at all, and
#: bias_downsample leaves the shortcut biases at random, so the error comes before the run.
#: The input channels (model.modalities) are adapted instead (docs/method.md §3), and the
#: head may differ (the supervised baseline fine-tunes a regression head).
ENCODER_SHAPE_KEYS = ("width", "bias_downsample")
#: A head's sizes: an untrained cell's head loads from a pretraining run only where equal.
HEAD_SHAPE_KEYS = ("projection_head", "head", "hidden_dim", "projection_dim")


def check_pretrained_encoder_fits(config: Mapping[str, Any], experiment: str, variant: str,
                                  settings: Mapping[str, Any],
                                  pretrained_models: Mapping[str, Mapping[str, Any]], *,
                                  source: str = "config") -> list[str]:
    """Messages (none when fine) for a cell with ``model.init: pretrained:<run>`` whose
    encoder would not take the run's weights whole (:data:`ENCODER_SHAPE_KEYS`).
    ``experiment`` ``search``: the random search's trials (:func:`search_settings`, the
    top-level model section)."""
    run = pretrained_run(settings["model"])
    if run not in pretrained_models or settings["model"]["encoder"] == "none":
        return []  # from scratch, an unknown run (check_init says so), or no network
    problems = []
    for key in ENCODER_SHAPE_KEYS:
        cell_value, run_value = settings["model"][key], pretrained_models[run][key]
        if cell_value != run_value:
            run_key = _run_model_key(config, run, key)
            if experiment == "search":
                cell_key, whose = f"model.{key}", "the random search's trials fine-tune"
            else:
                cell_key = variant_key(config, experiment, variant, f"model.{key}")
                whose = "it fine-tunes"
            problems.append(
                f"{source}: config key '{cell_key}' is {cell_value!r}, but the encoder {whose} "
                f"(model.init {settings['model']['init']}) is pretrained with "
                f"'{run_key}' {run_value!r}: its weights would not load whole. Give both the "
                f"same value.")
    model = settings["model"]
    if (experiment != "search" and settings["train"]["epochs"] == 0
            and model["features"] == "projection" and model["projection_head"]):
        # a cell that trains nothing reads its features through the head as loaded: one
        # of other sizes stays at random initialisation (models.load_init_checkpoint)
        differing = [key for key in HEAD_SHAPE_KEYS
                     if model[key] != pretrained_models[run][key]]
        if differing:
            cell = f"experiments.{experiment}.variants.{variant}"
            pairs = ", ".join(
                f"'{variant_key(config, experiment, variant, f'model.{key}')}' {model[key]!r} "
                f"against '{_run_model_key(config, run, key)}' {pretrained_models[run][key]!r}"
                for key in differing)
            problems.append(
                f"{source}: the cell {cell} trains nothing (train.epochs 0, model.init "
                f"{model['init']}) and reads its features through the projection head "
                f"(model.features 'projection'), but its head differs from the run's ({pairs}): "
                f"the head would stay at random initialisation. Add model: {{features: "
                f"encoder}} to {cell} (the pretrained encoder's own features), or give it the "
                f"run's head.")
    return problems


def check_head(config: Mapping[str, Any], experiment: str, variant: str,
               settings: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """Messages (none when fine) for a cell, or pretraining run ``variant`` (``experiment``
    ``pretrain``), whose features cannot say anything: a projection head of one dimension
    (its unit vectors are +1 or -1, so no gradient reaches the encoder), or a cell that
    trains nothing and reads the regression head's one random output. Each names the key
    that sets the value, a variant's override or the top-level key it inherits."""
    model, problems = settings["model"], []
    if model["encoder"] == "none":  # a baseline without a network: no head to read
        return []
    if experiment == "pretrain":
        cell, where = f"pretraining run {variant}", f"pretrain.{variant}"

        def key_of(key):
            return _run_model_key(config, variant, key)
    elif experiment == "search":  # its trials train the top-level model (search_settings)
        cell, where = "random search's trials", ""

        def key_of(key):
            return f"model.{key}"
    else:
        cell = where = f"experiments.{experiment}.variants.{variant}"

        def key_of(key):
            return variant_key(config, experiment, variant, f"model.{key}")
    if model["head"] == "projection" and model["projection_head"] and model["projection_dim"] < 2:
        key = key_of("projection_dim")
        problems.append(
            f"{source}: config key '{key}' is {model['projection_dim']} for the {cell}, whose "
            f"projection head outputs unit vectors: in one dimension each is +1 or -1, so no "
            f"gradient reaches the encoder and its features say nothing. Set "
            f"{_under(where, 'model.projection_dim')} to 2 or more (the paper's 128)"
            + ("" if key.startswith(where) else f", or '{key}' for every cell that inherits it")
            + "; 1 is the regression head's (model.head: regression, loss.name: supervised).")
    # from a checkpoint the regression head may load (a supervised pretraining's: its one
    # output is that network's predicted age)
    if (experiment not in ("pretrain", "search") and settings["train"]["epochs"] == 0
            and model["features"] == "projection" and model["projection_head"]
            and model["head"] == "regression" and model["init"] == "scratch"
            and not model["init_checkpoint"]):
        problems.append(
            f"{source}: the {cell} trains nothing (train.epochs 0) and reads its features "
            f"through the regression head ('{key_of('head')}' regression, "
            f"'{key_of('features')}' projection): one random number per subject, from which "
            f"its read-out predicts about the training mean. Add model: {{features: encoder}} "
            f"to {cell} (the untrained encoder's own features).")
    return problems


def _run_model_key(config: Mapping[str, Any], run: str, key: str) -> str:
    """The config key that sets ``model.<key>`` for pretraining run ``run``."""
    return (f"pretrain.{run}.model.{key}" if key in (config["pretrain"][run].get("model") or {})
            else f"model.{key}")



def variant_key(config: Mapping[str, Any], experiment: str, variant: str, key: str) -> str:
    """The config key that sets ``key`` (``section.name``) for a variant: its override
    when it has one, else the top-level key."""
    section, name = key.split(".")
    overrides = config["experiments"][experiment]["variants"][variant].get(section) or {}
    return (f"experiments.{experiment}.variants.{variant}.{key}" if name in overrides
            else key)


#: Why a single view with a neighbourhood of one subject cannot train (:func:`lone_anchor`).
LONE_ANCHOR = ("train.views 1 with loss.nn_final 1 leaves each anchor's neighbourhood "
               "holding the anchor alone once the schedule reaches 1: nothing is repelled, the "
               "loss is 0 and the encoder stops learning.")


def lone_anchor(views: int, nn_final: int) -> bool:
    """Whether Adaptive Neighborhoods' last neighbourhoods (``nn_final`` subjects x
    ``views`` rows) hold no row besides the anchor, so that every pair is dropped."""
    return int(views) * int(nn_final) < 2


def check_adaptive_schedule(settings: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """Messages (none when fine) for a cell whose Adaptive Neighborhoods schedule
    (paper Algorithm 1, :func:`brainage.losses.schedule.check_schedule`) cannot run:
    ``loss.nn_step`` must be at most ``train.epochs // 2`` and ``loss.nn_final`` at most
    ``train.batch_size``. Other losses have no schedule, and an untrained encoder
    (``train.epochs`` 0) or a cell without one (``model.encoder`` none) no loss. With
    ``loss.nn_from_search`` the configured nn_final and nn_step are replaced by the
    search's before training, so they are not checked here; :func:`check_search_source`
    checks every value the search can choose instead."""
    from brainage.losses.schedule import check_schedule

    loss, train = settings["loss"], settings["train"]
    if (loss["name"] != "adaptive" or train["epochs"] == 0  # an untrained encoder: no loss
            or settings["model"]["encoder"] == "none"):  # no encoder, nothing trained
        return []
    if loss.get("nn_from_search"):  # replaced by the search's choice (check_search_source)
        return []
    epochs, batch_size = int(train["epochs"]), int(train["batch_size"])
    nn_final, nn_step = int(loss["nn_final"]), int(loss["nn_step"])
    where = (f"pretrain.{settings['variant']}" if settings["experiment"] == "pretrain"
             else f"experiments.{settings['experiment']}.variants.{settings['variant']}")
    if lone_anchor(train["views"], nn_final):
        return [f"{source}: config key {where} (loss.name adaptive): {LONE_ANCHOR} Fix: set "
                f"train.views: 2 (the paper's) or loss.nn_final to at least 2."]
    try:
        check_schedule(max_epochs=epochs, batch_size=batch_size, nn_final=nn_final,
                       step_size=nn_step, step_name="loss.nn_step")
    except ValueError:
        if nn_final > batch_size:
            why = ("loss.nn_final must not exceed train.batch_size (the neighbourhood shrinks "
                   "from the batch size down to nn_final)")
            fix = f"lower loss.nn_final to at most {batch_size} or raise train.batch_size"
        else:
            why = (f"loss.nn_step must be at most train.epochs // 2 = {epochs // 2}, so that "
                   f"the neighbourhood shrinks in at least two steps")
            fix = f"raise train.epochs to at least {2 * nn_step}" + (
                f" or lower loss.nn_step to at most {epochs // 2}" if epochs >= 2 else "")
        return [f"{source}: config key {where} (loss.name adaptive): Adaptive Neighborhoods "
                f"cannot run with train.epochs {epochs}, train.batch_size {batch_size}, "
                f"loss.nn_final {nn_final}, loss.nn_step {nn_step}: {why}. Fix: {fix}."]
    return []


def search_bounds(search: Mapping[str, Any], *, batch_size: int, epochs: int
                  ) -> dict[str, tuple[int, int]]:
    """The inclusive ranges the random search draws ``nn_final`` and ``nn_step`` from:
    ``search.nn_final_range`` and ``search.nn_step_range`` cut to what Algorithm 1 allows
    with the search's training settings, 1 <= nn_final <= ``train.batch_size`` and
    1 <= nn_step <= ``train.epochs // 2``. Every value the search can choose (and a cell
    with ``loss.nn_from_search`` can train with) lies within them.

    Raises
    ------
    ConfigError
        When a range is empty after that cut, naming the config key.
    """
    bounds = {}
    for key, cap, why in (("nn_final", int(batch_size), "train.batch_size"),
                          ("nn_step", int(epochs) // 2, "train.epochs // 2")):
        low, high = (int(value) for value in search[f"{key}_range"])
        high = min(high, cap)
        low = max(low, 1)
        if low > high:
            raise ConfigError(f"config key search.{key}_range {list(search[f'{key}_range'])} "
                              f"leaves no value between 1 and {why} ({cap}). Widen the range "
                              f"or change {why.split(' ')[0]}.")
        bounds[key] = (low, high)
    return bounds


def search_settings(config: Mapping) -> dict:
    """Cell settings of the search trials: the base sections with the Adaptive loss (whose
    nn_final and nn_step each trial sets, so never ``loss.nn_from_search``)."""
    return {"experiment": "search", "variant": "adaptive", "seed": int(config["search"]["seed"]),
            "loss": {**config["loss"], "name": "adaptive", "nn_from_search": False},
            "train": dict(config["train"]),
            "model": dict(config["model"]), "readout": dict(config["readout"])}


def uses_search_result(settings: Mapping[str, Any]) -> bool:
    """Whether a cell trains with the random search's nn_final and nn_step
    (``loss.nn_from_search``): only a cell that trains an encoder with a loss; an untrained
    encoder (``train.epochs`` 0) or a cell without one has no schedule to take."""
    loss, model, train = (settings.get(section) or {} for section in ("loss", "model", "train"))
    return (bool(loss.get("nn_from_search")) and model.get("encoder") != "none"
            and train.get("epochs") != 0)


def check_search_source(config: Mapping[str, Any], experiment: str, variant: str,
                        settings: Mapping[str, Any], *, source: str = "config") -> list[str]:
    """Messages (none when fine) for a cell with ``loss.nn_from_search`` that cannot take
    nn_final and nn_step from the random search: the search must be enabled, the loss must
    be Adaptive Neighborhoods, and every value the search can choose
    (:func:`search_bounds`, with the config's train section, which the search trains with)
    must fit the cell's schedule: nn_final <= its ``train.batch_size`` and nn_step <= its
    ``train.epochs // 2``. Each message names the config key to change."""
    if not uses_search_result(settings):
        return []
    where = f"experiments.{experiment}.variants.{variant}"
    flag = variant_key(config, experiment, variant, "loss.nn_from_search")
    inherited = "" if flag.startswith("experiments.") else f" (inherited by {where})"
    intro = f"{source}: config key {flag} is true{inherited}"
    loss_name = settings["loss"]["name"]
    if loss_name != "adaptive":
        name_key = variant_key(config, experiment, variant, "loss.name")
        return [f"{intro} but config key {name_key} is {loss_name}: only Adaptive "
                f"Neighborhoods (loss.name: adaptive) has the nn_final and nn_step the random "
                f"search chooses. Set {where}.loss.nn_from_search: false, or set "
                f"nn_from_search only on the Adaptive Neighborhoods variants."]
    if not config["search"]["enabled"]:
        return [f"{intro} but config key search.enabled is false: {where} would take "
                f"nn_final and nn_step from the random search's results/search/<split>/"
                f"best.json. Set search.enabled: true, or set {flag}: false to train with "
                f"loss.nn_final and loss.nn_step."]
    search, searched = config["search"], config["train"]
    try:
        bounds = search_bounds(search, batch_size=searched["batch_size"],
                               epochs=searched["epochs"])
    except ConfigError as error:
        return [f"{intro}, but the random search cannot run: {error}"]
    problems = []
    if lone_anchor(settings["train"]["views"], bounds["nn_final"][0]):
        views_key = variant_key(config, experiment, variant, "train.views")
        problems.append(
            f"{intro}, and the random search may choose nn_final 1 (config key "
            f"search.nn_final_range {list(search['nn_final_range'])}) while config key "
            f"{views_key} is 1: {LONE_ANCHOR} Fix: set {views_key}: 2 or raise the lower end "
            f"of search.nn_final_range to 2.")
    batch_size, epochs = int(settings["train"]["batch_size"]), int(settings["train"]["epochs"])
    highest = bounds["nn_final"][1]
    if highest > batch_size:
        batch_key = variant_key(config, experiment, variant, "train.batch_size")
        problems.append(
            f"{intro}, so {where} trains with the nn_final the random search chooses, up to "
            f"{highest} (config key search.nn_final_range {list(search['nn_final_range'])}, "
            f"cut to the search's train.batch_size {searched['batch_size']}), but config key "
            f"{batch_key} is {batch_size}: Adaptive Neighborhoods needs nn_final <= "
            f"train.batch_size. Fix: lower the upper end of search.nn_final_range to at most "
            f"{batch_size}, or raise {batch_key} to at least {highest}.")
    highest = bounds["nn_step"][1]
    if highest > epochs // 2:
        epochs_key = variant_key(config, experiment, variant, "train.epochs")
        lower = (f"lower the upper end of search.nn_step_range to at most {epochs // 2}, or "
                 if epochs >= 2 else "")
        problems.append(
            f"{intro}, so {where} trains with the nn_step the random search chooses, up to "
            f"{highest} (config key search.nn_step_range {list(search['nn_step_range'])}, "
            f"cut to the search's train.epochs // 2 = {int(searched['epochs']) // 2}), but "
            f"config key {epochs_key} is {epochs}: Adaptive Neighborhoods needs nn_step <= "
            f"train.epochs // 2 = {epochs // 2}. Fix: {lower}raise {epochs_key} to at least "
            f"{2 * highest}.")
    return problems


#: How the plan's batch checks count training subjects, unless told otherwise.
BEFORE_QC_EXCLUSIONS = "before QC exclusions, which can only remove more"


def check_batch_sizes(config: Mapping[str, Any], training_counts: Mapping[str, int], *,
                      source: str = "config",
                      counted: str = BEFORE_QC_EXCLUSIONS) -> None:
    """Stop before any job when a grid cell's batch is larger than a split's training set.

    Parameters
    ----------
    config
        A validated config (:func:`validate_config`).
    training_counts
        Training subjects per split name (:func:`brainage.normalise.training_counts`),
        counted as ``counted`` says: before QC exclusions by default (exclusions can only
        lower them, so a batch larger than one of these fails in training for certain), or
        after them (a warning's counts: the run may redo those subjects).
    counted
        How they were counted, as the message says it.

    Raises
    ------
    ConfigError
        Naming the config key that sets the batch size (the top-level ``train.batch_size``
        or a variant's override), its value, the variants using it, the split and its
        training subjects.
    """
    if not training_counts:
        return
    smallest_split = min(training_counts, key=lambda split: training_counts[split])
    smallest = training_counts[smallest_split]
    too_large: dict[tuple[str, int], list[str]] = {}
    for experiment, variant in dict.fromkeys(cell[:2] for cell in grid_cells(config)):
        settings = cell_settings(config, experiment, variant, 0)
        if not trains_an_encoder(settings) or settings["train"]["epochs"] == 0:
            continue  # nothing is trained in batches
        batch_size = int(settings["train"]["batch_size"])
        if batch_size > smallest:
            key = variant_key(config, experiment, variant, "train.batch_size")
            too_large.setdefault((key, batch_size), []).append(
                f"experiments.{experiment}.variants.{variant}")
    if too_large:
        raise ConfigError("\n".join(
            f"{source}: config key {key} is {batch_size} (used by {', '.join(users)}) but "
            f"split {smallest_split} has only {smallest} training subjects ({counted}). "
            f"Lower {key} to at most {smallest}"
            + _and_neighbourhoods(_neighbourhoods_over(config, smallest, key))
            for (key, batch_size), users in too_large.items()))


def _neighbourhoods_over(config: Mapping[str, Any], limit: int, batch_key: str) -> list[str]:
    """The ``loss.nn_final`` keys (and values) of the grid's Adaptive Neighborhoods cells
    whose batch ``batch_key`` sets and whose last neighbourhood exceeds ``limit``: lowering
    the batch to ``limit`` as told would stop the next run at their schedule's check."""
    found = set()
    for experiment, variant in dict.fromkeys(cell[:2] for cell in grid_cells(config)):
        if variant_key(config, experiment, variant, "train.batch_size") != batch_key:
            continue
        settings = cell_settings(config, experiment, variant, 0)
        loss = settings["loss"]
        if (loss["name"] == "adaptive" and int(settings["train"]["epochs"]) > 0
                and not loss.get("nn_from_search") and settings["model"]["encoder"] != "none"
                and int(loss["nn_final"]) > limit):
            found.add(f"{variant_key(config, experiment, variant, 'loss.nn_final')} "
                      f"({loss['nn_final']})")
    return sorted(found)


def _and_neighbourhoods(keys: list[str]) -> str:
    """The end of a lower-the-batch message: the nn_final keys to lower with it."""
    return (f", and {', '.join(keys)} to at most the new batch size (Adaptive "
            f"Neighborhoods' last neighbourhood must fit in a batch)." if keys else ".")


def check_search_batch_size(config: Mapping[str, Any], search_training_counts: Mapping[str, int],
                            *, source: str = "config",
                            counted: str = BEFORE_QC_EXCLUSIONS) -> None:
    """Stop before any job when the random search (``search.enabled``) trains with a batch
    larger than the subjects its trials train on: a split's training subjects less the
    search's validation subjects (``search.validation_fraction``), given per split in
    ``search_training_counts`` (:func:`brainage.split_data.subjects_left_for_training`),
    counted as ``counted`` says. The trials train with the config's top-level
    ``train.batch_size`` (:func:`search_settings`).

    Raises
    ------
    ConfigError
        Naming train.batch_size and search.validation_fraction, the split and its count.
    """
    if not config["search"]["enabled"] or not search_training_counts:
        return
    batch_size = int(config["train"]["batch_size"])
    split = min(search_training_counts, key=lambda name: search_training_counts[name])
    left = search_training_counts[split]
    if batch_size > left:
        raise ConfigError(
            f"{source}: config key train.batch_size is {batch_size}, the batch of the random "
            f"search's trials (search.enabled), but split {split} leaves them only {left} "
            f"training subjects once config key search.validation_fraction "
            f"({config['search']['validation_fraction']}) of them are held out for "
            f"validation ({counted}). Lower "
            f"train.batch_size to at most {left} or search.validation_fraction"
            + _and_neighbourhoods(_neighbourhoods_over(config, left, "train.batch_size")))


def check_pretrain_batch_size(config: Mapping[str, Any], name: str, n_train: int, *,
                              source: str = "config") -> None:
    """Stop before any job when pretraining run ``name`` has a larger batch than its
    cohort's training subjects ``n_train`` (the cohort less its validation subjects,
    before QC exclusions, which can only remove more): its pretrain_encoder job would
    fail for certain, after the cohort's preprocessing.

    Raises
    ------
    ConfigError
        Naming ``pretrain.<name>.train.batch_size`` (the run's own, defaulting to 32 and
        never taken from the top-level train section), its value and the training subjects.
    """
    settings = pretrain_settings(config, name, source=source)
    train, loss = settings["train"], settings["loss"]
    batch_size = int(train["batch_size"])
    if int(train["epochs"]) > 0 and batch_size > n_train:
        key = f"pretrain.{name}.train.batch_size"
        neighbourhood = (f" (and pretrain.{name}.loss.nn_final, {loss['nn_final']}, to at "
                         f"most the new batch size)" if loss["name"] == "adaptive"
                         and int(loss["nn_final"]) > n_train else "")
        raise ConfigError(
            f"{source}: config key {key} is {batch_size} but pretraining run {name}'s T1w "
            f"cohort has only {n_train} training subjects (its subjects less the "
            f"validation_fraction held out, before QC exclusions, which can only remove "
            f"more). Lower {key} to at most {n_train}{neighbourhood}, or give the run more "
            f"subjects.")


def load_config(*paths: str | Path) -> dict:
    """Read YAML config files (later ones override earlier ones, section by section)."""
    merged: dict = {}
    for path in paths:
        with open(path) as handle:
            try:
                loaded = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:  # a stray indent, an unclosed bracket
                raise ConfigError(f"{path} is not valid YAML: {error}. Fix the line it "
                                  f"names.") from None
        if not isinstance(loaded, Mapping):  # e.g. a participants.tsv given by mistake
            raise ConfigError(f"{path}: a config file maps section names to settings "
                              f"('train:', 'dataset:', ...), but this file holds a "
                              f"{type(loaded).__name__}. Give the config's YAML file.")
        merged = deep_merge(merged, loaded)
    return validate_config(merged, source=", ".join(str(p) for p in paths))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Recursive dict merge; ``override`` wins, lists are replaced, not concatenated."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_cell(settings: Mapping[str, Any], *, where: str = "", source: str = "settings"
                 ) -> dict:
    """The one resolver of a grid cell's settings: each section validated against its
    schema with every default filled in.

    ``settings`` holds ``experiment``, ``variant``, ``seed`` (optional) and the sections of
    :data:`CELL_SECTIONS`, each possibly partial (a test's or notebook's dict means the
    same as the config). Resolving twice changes nothing, so every job may call it on
    what it is given.

    Parameters
    ----------
    where : str
        Dotted prefix naming where the settings come from in the config, for messages
        (e.g. ``experiments.table3.variants.yaware``).

    Raises
    ------
    ConfigError
        For unknown keys and values of the wrong type or out of range, naming the full
        key path.
    """
    schema = _shared_schema()
    unknown = sorted(set(settings) - {"experiment", "variant", "seed", *CELL_SECTIONS})
    if unknown:
        raise ConfigError(f"{source}: cell settings have unknown key(s) {', '.join(unknown)}; "
                          f"expected experiment, variant, seed and the sections "
                          f"{', '.join(CELL_SECTIONS)}.")
    resolved = {key: settings[key] for key in ("experiment", "variant") if key in settings}
    resolved["seed"] = int(settings.get("seed", 0))
    messages = []
    for section in CELL_SECTIONS:
        values = json.loads(json.dumps(dict(settings.get(section) or {})))
        validator = _validator_filling_defaults(schema["properties"][section])
        prefix = ".".join(part for part in (where, section) if part)
        messages += [_describe(error, source, prefix) for error in validator.iter_errors(values)]
        resolved[section] = values
    if messages:
        raise ConfigError("\n".join(messages))
    # training settings leave out the read-out's model.features (training_settings): the
    # features' check applies to settings that name them; without a head the default is
    # the encoder's (what BrainAgeNet.project gives), so that resolving again, as the
    # export's check and a search trial's training do, does not refuse a default
    named = "features" in (settings.get("model") or {})
    if not named and not resolved["model"]["projection_head"]:
        resolved["model"]["features"] = "encoder"
    check_cell(resolved, where=where, source=source, readout_features=named)
    return resolved


def check_cell(settings: Mapping[str, Any], *, where: str = "", source: str = "settings",
               readout_features: bool = True) -> None:
    """Combinations of keys that each validate alone but cannot train together.

    Raises
    ------
    ConfigError
        Naming both keys and what to set.
    """
    prefix = f"{where}." if where else ""
    model, loss = settings["model"], settings["loss"]
    supervised = loss["name"] == "supervised"
    # an untrained encoder's settings keep no loss (training_settings): resolved again,
    # the default loss must not be paired with its head
    trains = settings["train"]["epochs"] > 0
    if trains and supervised != (model["head"] == "regression"):
        raise ConfigError(
            f"{source}: config keys '{prefix}loss.name' ({loss['name']}) and "
            f"'{prefix}model.head' ({model['head']}) do not fit: the supervised loss needs "
            f"the regression head (model.head: regression, model.projection_dim: 1) and the "
            f"contrastive losses the projection head (model.head: projection, "
            f"model.projection_dim 2 or more).")
    if trains and supervised and (model["projection_dim"] != 1 or not model["projection_head"]):
        raise ConfigError(
            f"{source}: config key '{prefix}model.projection_dim' is "
            f"{model['projection_dim']} but the supervised loss's regression head outputs "
            f"one age: set model.projection_dim: 1 (and model.projection_head: true).")
    if readout_features and model["features"] == "projection" and not model["projection_head"]:
        raise ConfigError(
            f"{source}: config key '{prefix}model.features' is 'projection' but "
            f"'{prefix}model.projection_head' is false: there is no projection to read "
            f"features from. Set model.features: encoder, or model.projection_head: true.")
    views = settings["train"]["views"]
    needed = {"simclr": (2, None), "nnclr": (2, 2)}.get(loss["name"])
    if needed and (views < needed[0] or (needed[1] is not None and views > needed[1])):
        raise ConfigError(
            f"{source}: config key '{prefix}train.views' is {views} but the {loss['name']} "
            f"loss needs {'exactly' if needed[1] else 'at least'} {needed[0]} views per "
            f"subject (its positives are a subject's own other views). Set train.views: 2.")


def cell_modalities(config: Mapping[str, Any], model: Mapping[str, Any], *, where: str,
                    source: str) -> list[str]:
    """A cell's input channels: ``model.modalities``, or all of ``dataset.modalities`` when
    unset; each must be one the subjects provide."""
    provided = list(config["dataset"]["modalities"])
    chosen = list(model.get("modalities") or provided)
    missing = [name for name in chosen if name not in provided]
    if missing:
        raise ConfigError(
            f"{source}: config key '{_under(where, 'model.modalities')}' lists {', '.join(missing)}, "
            f"which config key dataset.modalities ({', '.join(provided)}) does not provide. "
            f"Add it to dataset.modalities (every subject then needs that map) or remove it.")
    return chosen


def cell_settings(config: Mapping[str, Any], experiment: str, variant: str, seed: int, *,
                  source: str = "config") -> dict:
    """Everything that determines one grid cell's result, as plain JSON-able data.

    Returns ``{"experiment", "variant", "seed", "loss", "train", "model", "readout"}``: the
    config's sections with the variant's overrides applied (:func:`resolve_cell`).
    Snakemake passes this as ``params`` so that changing a setting reruns exactly the
    cells it affects.
    """
    try:
        overrides = config["experiments"][experiment]["variants"][variant]
    except KeyError as missing:
        raise ConfigError(
            f"no variant '{variant}' in experiment '{experiment}' (config key "
            f"experiments.{experiment}.variants): {missing}") from None
    merged = {section: deep_merge(config[section], overrides.get(section, {}))
              for section in CELL_SECTIONS}
    return _checked_cell(config, {"experiment": experiment, "variant": variant,
                                  "seed": int(seed), **merged},
                         where=f"experiments.{experiment}.variants.{variant}", source=source)


def _checked_cell(config: Mapping[str, Any], settings: dict, *, where: str,
                  source: str) -> dict:
    """``settings`` (merged sections) resolved and checked against the config: its input
    channels (:func:`cell_modalities`, filled in), the schema (:func:`resolve_cell`) and
    its initialisation (:func:`check_init`)."""
    settings["model"]["modalities"] = cell_modalities(config, settings["model"], where=where,
                                                      source=source)
    resolved = resolve_cell(settings, where=where, source=source)
    check_init(config, resolved["model"], where=where, source=source)
    return resolved


#: The prefix of ``model.init`` that names a pretraining run.
PRETRAINED = "pretrained:"


def pretrained_run(model: Mapping[str, Any]) -> str | None:
    """The pretraining run a cell starts from (``model.init: pretrained:<name>``), or None."""
    init = model.get("init", "scratch")
    return init[len(PRETRAINED):] if init.startswith(PRETRAINED) else None


def _under(where: str, key: str) -> str:
    """``key`` under the dotted prefix ``where`` (the top-level key when it is empty)."""
    return f"{where}.{key}" if where else key


def check_init(config: Mapping[str, Any], model: Mapping[str, Any], *, where: str,
               source: str) -> None:
    """A cell's initialisation names an existing pretraining run, and only one source."""
    run = pretrained_run(model)
    if run is None:
        return
    parts = where.split(".")
    if len(parts) == 4 and parts[0] == "experiments":  # the key that sets it: the variant's
        def key(name: str) -> str:  # override, or the top-level key it inherits
            return variant_key(config, parts[1], parts[3], name)
    else:
        def key(name: str) -> str:
            return _under(where, name)
    if model.get("init_checkpoint"):
        raise ConfigError(
            f"{source}: config keys '{key('model.init')}' ({model['init']}) and "
            f"'{key('model.init_checkpoint')}' ({model['init_checkpoint']}) both "
            f"choose the starting weights; keep one.")
    runs = list(config.get("pretrain", {}))
    if run not in runs:
        raise ConfigError(
            f"{source}: config key '{key('model.init')}' is {model['init']!r} but "
            f"config key pretrain has no run {run!r} (runs: {', '.join(runs) or 'none'}). Add "
            f"pretrain.{run} or set model.init: scratch.")


#: model keys a pretraining run never takes from the config's model section: it trains the
#: ResNet-18 (its job trains one whatever model.encoder says, and with encoder none its
#: validation read-out would see the voxels, not the encoder), starts from scratch, and its
#: input is the one T1w channel.
PRETRAIN_FIXED_MODEL = {"encoder": "resnet18", "init": "scratch", "init_checkpoint": None,
                        "modalities": ["T1w"]}

#: train keys that say where and how a training runs, not what it learns: a pretraining run
#: takes them from the config's train section unless it sets them, and an untrained
#: encoder (train.epochs 0) keeps them, since its job still embeds the split.
RUNTIME_TRAIN_KEYS = ("device", "precision", "threads", "deterministic")


def pretrain_settings(config: Mapping[str, Any], name: str, *, source: str = "config") -> dict:
    """The settings of pretraining run ``name`` as a cell's (:func:`resolve_cell`): the
    config's model section (so the weights fit the cells that fine-tune them) with the run's
    model overrides, the run's own loss and train sections on the schema's defaults, its
    seed; the read-out is the config's (the validation read-out).

    Raises
    ------
    ConfigError
        For an unknown run, an unknown or invalid key (named by its full path), or a source
        without the root its kind needs.
    """
    try:
        run = config["pretrain"][name]
    except KeyError:
        raise ConfigError(f"{source}: config key pretrain has no run {name!r}.") from None
    where = f"pretrain.{name}"
    kind, root = run["source"]["kind"], run["source"].get("root")
    if kind in ("bids", "openbhb") and not root:
        raise ConfigError(f"{source}: config key '{where}.source.root' is not set; a {kind} "
                          f"source needs the folder of the cohort.")
    model = deep_merge(config["model"], run.get("model", {}))
    for key, value in PRETRAIN_FIXED_MODEL.items():
        if key in run.get("model", {}) and run["model"][key] != value:
            raise ConfigError(f"{source}: config key '{where}.model.{key}' cannot be set: a "
                              f"pretraining run always has {key} {value!r}.")
        model[key] = copy.deepcopy(value)
    defaults = _shared_schema()["$defs"]["pretrain_run"]["properties"]
    loss = deep_merge(defaults["loss"]["default"], run.get("loss", {}))
    if loss.get("nn_from_search"):
        raise ConfigError(f"{source}: config key '{where}.loss.nn_from_search' cannot be true: "
                          f"the random search chooses nn_final and nn_step for the grid cells "
                          f"on the training cohort's splits, not for a pretraining run. Set "
                          f"{where}.loss.nn_final and {where}.loss.nn_step instead.")
    train = deep_merge(defaults["train"]["default"], run.get("train", {}))
    for key in RUNTIME_TRAIN_KEYS:  # where and how the config's trainings run
        train.setdefault(key, config["train"][key])
    return resolve_cell({"experiment": "pretrain", "variant": name, "seed": run["seed"],
                         "loss": loss, "train": train, "model": model,
                         "readout": config["readout"]}, where=where, source=source)


def grid_cells(config: Mapping[str, Any], *, include_disabled: bool = False
               ) -> list[tuple[str, str, int]]:
    """All (experiment, variant, seed) cells of the enabled experiments (of every
    experiment with ``include_disabled``), in config order."""
    cells = []
    for name, experiment in config.get("experiments", {}).items():
        if not (include_disabled or experiment.get("enabled", True)):
            continue
        for variant in experiment["variants"]:
            for seed in experiment.get("seeds", [0, 1, 2, 3, 4]):
                cells.append((name, variant, int(seed)))
    return cells


def cell_kind(settings: Mapping[str, Any]) -> str:
    """``contrastive`` for a cell trained with one of the paper's losses, ``baseline`` for
    the comparisons every table sets beside them: no encoder (the read-out sees the voxels,
    or ignores them), an untrained encoder (``train.epochs`` 0), or the supervised network."""
    if (settings["model"]["encoder"] == "none" or settings["train"]["epochs"] == 0
            or settings["loss"]["name"] == "supervised"):
        return "baseline"
    return "contrastive"


def trains_an_encoder(settings: Mapping[str, Any]) -> bool:
    """Whether the cell has an encoder for train_encoder to write (even an untrained one)."""
    return settings["model"]["encoder"] != "none"


#: Keys of a cell's settings that never reach the encoder's training.
NON_TRAINING_KEYS = ("experiment", "variant", "readout")


#: Keys of the model section that only the read-out uses.
READOUT_MODEL_KEYS = ("features",)


def train_key(settings: Mapping[str, Any], name: str, *, section: str = "train") -> str:
    """The config key of setting ``name`` of section ``section`` (``train``, or
    ``resources``) for these settings, for messages: a pretraining run's
    (``pretrain.<run>.<section>.<name>``, never the top-level section) or the grid's
    (``train.<name>``, or the variant's override of it, which the settings alone do not
    tell from the top-level value: :func:`variant_key` with the config; and
    ``resources.train.<name>``, which variants cannot override). The settings a job reads
    from its file (:func:`training_settings`) carry no names: then every key is named."""
    if settings.get("experiment") == "pretrain":
        return f"pretrain.{settings['variant']}.{section}.{name}"
    grids = f"train.{name}" if section == "train" else f"{section}.train.{name}"
    if "experiment" in settings:
        # a search trial's (experiment "search"): the top level, which it cannot override
        if section != "train" or "variant" not in settings or settings["experiment"] == "search":
            return grids
        return (f"{grids} (or experiments.{settings['experiment']}.variants."
                f"{settings['variant']}.train.{name} where that variant sets it)")
    named = [f"a variant's: experiments.<experiment>.variants.<variant>.train.{name}"
             ] if section == "train" else []
    named.append(f"a pretraining run's: pretrain.<run>.{section}.{name}")
    return f"{grids} ({'; '.join(named)})"


def training_rule(settings: Mapping[str, Any], *, search: bool = True) -> str:
    """The rule that trains the encoder of these settings, for messages; ``search``: also
    the random search's, whose trials train in the same code."""
    if settings.get("experiment") == "pretrain":
        return "rule pretrain_encoder"
    return "rule train_encoder" + (", or search_hyperparameters for a search trial"
                                   if search else "")


def training_settings(settings: Mapping[str, Any]) -> dict:
    """What determines a cell's trained encoder: its settings less the names and what only
    the read-out uses (``readout.*``, ``model.features``), so editing those re-evaluates
    encoders without retraining them. An untrained encoder (``train.epochs`` 0) depends on
    the seed, the model and how its features are computed (:data:`RUNTIME_TRAIN_KEYS`:
    bf16 or float32 on CUDA, threads, deterministic kernels), not on the optimiser or loss.
    ``loss.nn_from_search`` stays in: a cell taking nn_final and nn_step from the random
    search never shares the encoder of one that does not."""
    trained = {key: value for key, value in settings.items() if key not in NON_TRAINING_KEYS}
    trained["model"] = {key: value for key, value in settings["model"].items()
                        if key not in READOUT_MODEL_KEYS}
    if settings["train"]["epochs"] == 0:
        trained = {"seed": settings["seed"], "model": trained["model"],
                   "train": {"epochs": 0, **{key: settings["train"][key]
                                            for key in RUNTIME_TRAIN_KEYS}}}
    return trained


def encoder_owners(config: Mapping[str, Any]) -> dict[tuple[str, str, int], tuple[str, str, int]]:
    """For every cell with an encoder, the cell that trains the encoder it evaluates.

    Cells whose training settings are equal (same loss, train, model sections and seed)
    would train the same encoder: in the paper grid the five read-out cells, both
    projection cells, the default cells of the lambda and reduction ablations and the
    modality experiment's stiffness cells evaluate the distance ablation's Manhattan
    encoders: 50 of 205 cells with an encoder train nothing. Each such group trains once,
    in the folder of its first cell in config order; the others keep their own
    metrics.json and predictions.tsv. The order runs over every experiment, disabled ones
    included, so switching an experiment off or on does not move (and retrain) an encoder.
    """
    owners: dict[tuple[str, str, int], tuple[str, str, int]] = {}
    first_with: dict[str, tuple[str, str, int]] = {}
    for cell in grid_cells(config, include_disabled=True):
        settings = cell_settings(config, *cell)
        if not trains_an_encoder(settings):
            continue
        key = json.dumps(training_settings(settings), sort_keys=True)
        owners[cell] = first_with.setdefault(key, cell)
    return owners


#: Read-outs that predict from the training ages alone (baselines), not from features.
FEATURELESS_READOUTS = ("train_mean", "study_mean")


#: Voxels of one channel of a split at 2 mm: the window of the MNI152 brain mask.
WINDOW_VOXELS_2MM = 99 * 117 * 95


def voxel_readout_memory_mb(n_subjects: int, n_channels: int, resolution_mm: int) -> int:
    """Memory (MB) of an evaluate_encoder job whose read-out fits on the voxels (a cell
    without an encoder, e.g. PCA + Ridge): the cell's voxels of every subject of the split
    in float32, held about 1.8 times (the copy it fits on, and the training rows' copies of
    the age-bias correction's out-of-fold refits; measured 7.2 to 7.6 MB per subject of one
    2 mm map), plus 1,000 MB for the process and its libraries."""
    voxels = WINDOW_VOXELS_2MM / (resolution_mm // 2) ** 3
    return int(1.8 * n_subjects * n_channels * voxels * 4 / 1e6) + 1000


#: How much a retried cluster job's memory request grows per attempt: a job that SLURM
#: stopped for its memory (OUT_OF_MEMORY) fails the same way when resubmitted with the
#: same request.
RETRY_GROWTH = 0.5


def resource_for_attempt(amount: int, attempt: int) -> int:
    """A job's memory (MB) at its ``attempt`` (1 for the first): ``amount``, then 1.5 and
    2 times it at the SLURM profile's two retries."""
    return int(amount * (1 + RETRY_GROWTH * (attempt - 1)))


def exported_cell(config: Mapping) -> tuple[str, str, int]:
    """(experiment, variant, seed) of the grid cell ``predict.model`` exports.

    Raises
    ------
    ConfigError
        When no enabled experiment trains that cell, or the cell is a baseline without an
        encoder (training mean, study mean, PCA + Ridge): there is nothing to export; or
        its read-out ignores the features (``readout.method`` train_mean or study_mean):
        a bundle would predict one age per study for any subject, and a new cohort's
        studies are not the training ones.
    """
    model = config["predict"]["model"]
    cell = (model["experiment"], model["variant"], int(model["seed"]))
    cells = grid_cells(config)
    if cell in cells and trains_an_encoder(settings := cell_settings(config, *cell)):
        method = settings["readout"]["method"]
        if method in FEATURELESS_READOUTS:
            raise ConfigError(
                f"config key predict.model names the grid cell {cell[0]}/{cell[1]}/seed "
                f"{cell[2]}, whose read-out (readout.method {method}) ignores the encoder's "
                f"features, so the model would not look at a subject's images. Choose a cell "
                f"with a read-out on the features (ridge, pca_ridge, mse, l1, huber, dex).")
        return cell
    trained = [f"{e}/{v}/seed {s}" for e, v, s in cells
               if trains_an_encoder(cell_settings(config, e, v, s))]
    # no cell with an encoder (every experiment disabled or removed): nothing to choose from
    choices = (f"Choose one of: {', '.join(trained)}." if trained else
               "No enabled experiment trains an encoder: enable one (experiments.<name>."
               "enabled), or leave predict.cohorts empty.")
    if cell not in cells:
        raise ConfigError(
            f"config key predict.model names the grid cell {cell[0]}/{cell[1]}/seed {cell[2]}, "
            f"which no enabled experiment trains. {choices}")
    raise ConfigError(
        f"config key predict.model names the grid cell {cell[0]}/{cell[1]}/seed {cell[2]}, "
        f"a baseline without an encoder (model.encoder: none), so there is no model to "
        f"export. {choices}")


PREPROCESSING_SECTIONS = ("preprocess", "qc", "template")


def preprocessing_record(config: Mapping) -> dict:
    """How the training maps were preprocessed; a new cohort must match (stored in the
    bundle, used by ``python -m brainage.predict run``)."""
    return {section: dict(config[section]) for section in PREPROCESSING_SECTIONS}


def check_preprocessing_record(record: Any, *, source: str) -> dict:
    """A :func:`preprocessing_record` read back from a file another lab may have written:
    each section validated against the config schema, as if it were a config, since its
    values name files (``template.space`` is a path part) and set the preprocessing.

    Raises
    ------
    ConfigError
        A section is missing or breaks the schema, named as ``<source>: config key ...``.
    """
    missing = [section for section in PREPROCESSING_SECTIONS
               if not isinstance(record, Mapping) or not isinstance(record.get(section), Mapping)]
    if missing:
        raise ConfigError(f"{source}: the preprocessing record lacks the section(s) "
                          f"{', '.join(missing)}.")
    filled = validate_config({section: record[section] for section in PREPROCESSING_SECTIONS},
                             source=source, template_files=False)
    return {section: filled[section] for section in PREPROCESSING_SECTIONS}
