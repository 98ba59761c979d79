"""The exported model bundle: everything another lab needs to predict brain age.

A bundle is a folder (``results/models/<name>/``)::

    manifest.json   format and software versions, sha256 of encoder.pt and readout.pt,
                    the grid cell's settings, the template id, the preprocessing/QC
                    settings, the TRAINING normalisation statistics, the read-out
                    description, the age-bias correction (a, b), a training summary, and
                    the sha256 of all of that (``manifest_sha256``)
    encoder.pt      the encoder's state dict (tensors only)
    readout.pt      the read-out as tensors only: Ridge ``coef`` [D] and ``intercept``, or
                    the small predictor's state dict with its feature scaling (and DEX
                    bin centres)
    README.md       how to run it (informative, not checksummed)

No scikit-learn object is pickled: both ``.pt`` files hold tensors only and are read with
``torch.load(..., weights_only=True)``, which refuses anything else, so a bundle from an
untrusted source cannot run code when loaded. Reading checks the format version first (a
clear error for a bundle written by an incompatible brainage), then the manifest's own
digest (its numbers set the predictions too: normalisation statistics, a small
predictor's age scaling, the bias correction), then both files' sha256, each error naming
what changed. The digests catch damage and edits; they cannot stop someone who rewrites
the digests as well, so take bundles from sources you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from brainage import brainage_version
from brainage.io import atomic_path, save_tensors, sha256_file, staged_folder, write_json
from brainage.modalities import MODALITIES, grid_modality, modalities_to_predict

log = logging.getLogger(__name__)

#: Identifies a brainage model bundle in manifest.json (guards against reading some other
#: JSON file as a manifest).
BUNDLE_KIND = "brainage-model-bundle"
#: Bumped whenever the meaning or layout of a bundle's files changes; readers accept only
#: the versions in SUPPORTED_FORMAT_VERSIONS.
#: Format 2 adds ``manifest_sha256``; format 1 bundles are read with a warning that their
#: manifest is not verified.
BUNDLE_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
#: Manifest key holding the sha256 of the rest of the manifest (:func:`manifest_digest`).
MANIFEST_DIGEST_KEY = "manifest_sha256"

MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.pt"
READOUT_FILE = "readout.pt"
README_FILE = "README.md"
#: Files whose checksums the manifest lists; the manifest itself and the README are not.
PAYLOAD_FILES = (ENCODER_FILE, READOUT_FILE)


class BundleError(ValueError):
    """A model bundle is missing, corrupt, tampered with, or from an incompatible version."""


def software_versions() -> dict[str, str]:
    """Versions recorded in a bundle (and compared, for information, when it is read)."""
    import sklearn
    import torch

    return {"brainage": brainage_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


@dataclass(frozen=True)
class ModelBundle:
    """A bundle read from disk and verified.

    Attributes
    ----------
    path : Path
        The bundle folder.
    manifest : dict
        ``manifest.json`` (see :func:`write_bundle` for its keys).
    encoder_state : dict[str, torch.Tensor]
        Encoder state dict, on the CPU.
    readout_state : dict[str, torch.Tensor]
        Read-out tensors, on the CPU (see ``manifest["readout"]["method"]``).
    """

    path: Path
    manifest: dict
    encoder_state: dict
    readout_state: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def settings(self) -> dict:
        """The grid cell's settings (``brainage.config.cell_settings``)."""
        return self.manifest["settings"]

    @property
    def normalisation(self) -> dict:
        """TRAINING normalisation statistics (the split's stats.json)."""
        return self.manifest["normalisation"]

    @property
    def cohort_modalities(self) -> tuple[str, ...]:
        """The maps a cohort gives and is preprocessed for: the model's channels, led by
        the map the training cohort's preprocessing was built around
        (:func:`brainage.modalities.modalities_to_predict`; a bundle exported before
        ``training.grid_modality`` was recorded: the channels' own)."""
        channels = self.normalisation["modalities"]
        grid = self.manifest.get("training", {}).get("grid_modality")
        return modalities_to_predict(channels, grid or grid_modality(channels))

    @property
    def bias_correction(self) -> dict:
        """``{"intercept": a (years), "slope": b (years of gap per year of age, no unit),
        ...}``."""
        return self.manifest["bias_correction"]


def write_bundle(directory: str | Path, *, name: str, encoder_state: Mapping[str, Any],
                 readout_state: Mapping[str, Any], manifest_fields: Mapping[str, Any],
                 readme: str | None = None) -> Path:
    """Write a bundle folder atomically (a crash leaves the previous bundle or none).

    Parameters
    ----------
    directory : path
        The bundle folder, e.g. ``results/models/brainage``; replaced if it exists.
    name : str
        Bundle name recorded in the manifest.
    encoder_state, readout_state : mapping of str to torch.Tensor
        Tensors only (checked: anything else could not be read with weights_only=True).
    manifest_fields : mapping
        Everything else the manifest records; must contain ``settings``,
        ``normalisation``, ``readout``, ``bias_correction``, ``template`` (JSON-able).
        ``kind``, ``format_version``, ``name``, ``created_utc``, ``versions`` and
        ``files`` are added here.
    readme : str, optional
        Text of README.md.

    Returns
    -------
    Path
        The bundle folder.
    """
    import torch

    required = ("settings", "normalisation", "readout", "bias_correction", "template")
    missing = [key for key in required if key not in manifest_fields]
    if missing:
        raise ValueError(f"manifest_fields lacks {', '.join(missing)}")
    for label, state in (("encoder", encoder_state), ("read-out", readout_state)):
        bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
        if bad:
            raise TypeError(f"{label} state must hold tensors only; {', '.join(bad)} are not")

    directory = Path(directory)
    with staged_folder(directory, what="an export") as staging:
        for file, state in ((ENCODER_FILE, encoder_state), (READOUT_FILE, readout_state)):
            # room checked first; a failure is named by the bundle's file (staged_folder)
            save_tensors(staging / file, {key: value.detach().cpu().contiguous()
                                          for key, value in state.items()})
        manifest = {
            "kind": BUNDLE_KIND,
            "format_version": BUNDLE_FORMAT_VERSION,
            "name": name,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": software_versions(),
            "files": {file: sha256_file(staging / file) for file in PAYLOAD_FILES},
            **{key: value for key, value in manifest_fields.items()
               if key not in ("kind", "format_version", "name", "created_utc", "versions",
                              "files")},
        }
        # the digest of the manifest as it reads back (the JSON's own numbers and types)
        write_json(staging / MANIFEST_FILE, manifest)
        written = json.loads((staging / MANIFEST_FILE).read_text())
        write_json(staging / MANIFEST_FILE,
                   {**written, MANIFEST_DIGEST_KEY: manifest_digest(written)})
        if readme is not None:
            with atomic_path(staging / README_FILE) as temp:
                temp.write_text(readme)
    log.info("wrote model bundle %s (%s)", directory, ", ".join(
        f"{file} {manifest['files'][file][:12]}" for file in PAYLOAD_FILES))
    return directory


#: The manifest's sections every bundle has (``training`` and ``versions`` came later).
MANIFEST_SECTIONS = ("files", "settings", "normalisation", "readout", "bias_correction",
                     "template", "source")


def read_manifest(directory: str | Path) -> dict:
    """Read and check a bundle's manifest: kind and format version (no checksums)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if directory.is_file():  # e.g. its manifest.json or encoder.pt
        raise BundleError(
            f"model bundle {directory} is a file, not a folder. Pass the bundle folder "
            f"(results/models/<name>, holding {MANIFEST_FILE}, {', '.join(PAYLOAD_FILES)}).")
    if not directory.is_dir():
        raise BundleError(
            f"model bundle {directory} does not exist. Export one with `snakemake "
            f"export_model` (config key predict.model) or pass the folder another lab sent you.")
    if not manifest_path.is_file():
        raise BundleError(
            f"{manifest_path} is missing: {directory} is not a brainage model bundle (a bundle "
            f"holds {MANIFEST_FILE}, {', '.join(PAYLOAD_FILES)}). Re-export or re-copy it.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON ({error}); the bundle is "
                          f"damaged. Re-export or re-copy it.") from None
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind != BUNDLE_KIND:
        raise BundleError(f"{manifest_path} is not a brainage model bundle manifest (its "
                          f"'kind' is {kind!r}, expected {BUNDLE_KIND!r}).")
    version = manifest.get("format_version")
    # the type matters: JSON true equals 1 in Python and passed as format 1 (no digest check)
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        versions = manifest.get("versions")
        written_by = (versions.get("brainage", "an unknown version")
                      if isinstance(versions, dict) else "an unknown version")
        raise BundleError(
            f"model bundle {directory} has format version {version!r} (written by brainage "
            f"{written_by}); this brainage {brainage_version()} reads format version(s) "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. Install brainage "
            f"{written_by} to use this bundle, or re-export the model with this version "
            f"(`snakemake export_model`).")
    for key in MANIFEST_SECTIONS:
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks the key {key!r}; the bundle is "
                              f"incomplete. Re-export it.")
    # the optional sections (bundles exported before them lack them) are objects too:
    # read with .get, a list ended predict run in an AttributeError
    for key in (*MANIFEST_SECTIONS, "training", "versions"):
        if key in manifest and not isinstance(manifest[key], dict):  # format 1: no digest
            raise BundleError(f"{manifest_path}: its {key!r} is a "
                              f"{type(manifest[key]).__name__}, not an object; the bundle is "
                              f"damaged. Re-copy or re-export it.")
    channels = manifest["normalisation"].get("modalities")
    if not isinstance(channels, list) or not channels or not all(
            name in MODALITIES for name in channels):
        raise BundleError(f"{manifest_path}: its normalisation modalities {channels!r} are not "
                          f"a list of the maps brainage knows ({', '.join(MODALITIES)}); the "
                          f"bundle is damaged. Re-copy or re-export it.")
    _require_finite_numbers(manifest, manifest_path)
    return manifest


#: Manifest numbers every prediction applies (section, key). Export writes them finite
#: (the bias fit refuses an undefined line); a NaN intercept, which Python's json reads,
#: gave gaps without corrected gaps and a summary of no gaps, naming nothing.
APPLIED_NUMBERS = (("bias_correction", "intercept"), ("bias_correction", "slope"),
                   ("normalisation", "mean"), ("normalisation", "sd"),
                   ("normalisation", "affine"), ("normalisation", "template_affine"))


def _require_finite_numbers(manifest: Mapping[str, Any], manifest_path: Path) -> None:
    for section, key in APPLIED_NUMBERS:
        if manifest[section].get(key) is None:
            continue  # a missing key is named where it is read
        values = np.asarray(manifest[section][key], dtype=object).ravel()
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                   and np.isfinite(value) for value in values):
            raise BundleError(f"{manifest_path}: its {section}.{key} ({manifest[section][key]!r}) "
                              f"is not a finite number, as export writes it; the bundle is "
                              f"damaged or edited. Re-copy or re-export it.")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, no spaces), its digest key left
    out."""
    content = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST_KEY}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify_checksums(directory: str | Path, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """Raise :class:`BundleError` when the manifest's own digest differs (format 2; format
    1 has none: warned) or naming the first payload file whose sha256 differs.

    Returns the bytes of each listed file as they were checked: each file is read once,
    and a reader loads these bytes, not the file again by name. A bundle re-exported or
    re-copied into the same folder meanwhile (``write_bundle`` swaps the whole folder)
    would otherwise give the new tensors under the old manifest's normalisation and bias
    correction, unverified.
    """
    directory = Path(directory)
    if manifest["format_version"] >= 2:
        recorded = manifest.get(MANIFEST_DIGEST_KEY)
        if recorded != manifest_digest(manifest):
            raise BundleError(
                f"{directory / MANIFEST_FILE} was modified or damaged after export: its "
                f"content does not match its {MANIFEST_DIGEST_KEY} "
                f"({'missing' if recorded is None else recorded}). Its settings, "
                f"normalisation and read-out numbers set the predictions; re-copy the bundle "
                f"or re-export it.")
    else:
        log.warning("model bundle %s has format version 1: its manifest (settings, "
                    "normalisation, read-out scaling, bias correction) carries no digest and "
                    "is not verified. Re-export it with this brainage to verify it.", directory)
    listed = manifest["files"]
    for file in PAYLOAD_FILES:
        if file not in listed:
            raise BundleError(f"{directory / MANIFEST_FILE} lists no checksum for {file}; "
                              f"the bundle is incomplete. Re-export it.")
    contents = {}
    for file, expected in listed.items():
        path = directory / file
        if Path(file).name != file:
            raise BundleError(f"{directory / MANIFEST_FILE} lists {file!r}, which is not a "
                              f"file name inside the bundle.")
        if not path.is_file():
            raise BundleError(f"model bundle file {path} is missing. Re-copy the whole "
                              f"bundle folder.")
        content = path.read_bytes()
        actual = hashlib.sha256(content).hexdigest()
        if actual != expected:
            raise BundleError(
                f"checksum mismatch for {path}: sha256 {actual} but the manifest says "
                f"{expected}. The file was modified or damaged after export; re-copy the "
                f"bundle or re-export it.")
        contents[file] = content
    return contents


#: How often :func:`read_bundle` reads a bundle again that was replaced while it read it.
REREADS = 2


def read_bundle(directory: str | Path) -> ModelBundle:
    """Read a bundle: manifest (kind, format version), checksums, then the tensors.

    Raises
    ------
    BundleError
        Missing folder or file, not a bundle, incompatible format version, a checksum
        mismatch (naming the file), or a file that is not a plain tensor dict.
    """
    import torch

    directory = Path(directory)
    manifest = read_manifest(directory)
    for attempt in range(REREADS + 1):
        try:
            contents = verify_checksums(directory, manifest)
            break
        except BundleError:
            # a re-export replaced the folder between the manifest and the files (a lab
            # re-exports while a colleague's run starts): not damage, so read it again
            current = read_manifest(directory)
            if current == manifest or attempt == REREADS:
                raise
            log.info("model bundle %s was re-exported while it was read; reading it again",
                     directory)
            manifest = current
    states = {}
    for file in PAYLOAD_FILES:
        try:  # the bytes checked, not the file again: it may have been replaced since
            state = torch.load(io.BytesIO(contents.pop(file)), map_location="cpu",
                               weights_only=True)
        except Exception as error:  # torch raises several types for refused/broken files
            raise BundleError(f"{directory / file} cannot be read as a tensor state dict "
                              f"with weights_only=True ({error}).") from None
        if not isinstance(state, dict) or not all(
                isinstance(value, torch.Tensor) for value in state.values()):
            raise BundleError(f"{directory / file} is not a dict of tensors.")
        states[file] = state
    _log_version_differences(directory, manifest)
    return ModelBundle(path=directory, manifest=manifest, encoder_state=states[ENCODER_FILE],
                       readout_state=states[READOUT_FILE])


def _log_version_differences(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Different library versions are allowed (the format version guards the layout) but
    can shift predictions in the last digits, so they are logged."""
    recorded = manifest.get("versions", {})
    current = software_versions()
    for package in ("brainage", "torch", "numpy", "scikit-learn"):
        if recorded.get(package) not in (None, current[package]):
            log.warning("model bundle %s was written with %s %s; running with %s",
                        directory, package, recorded[package], current[package])
