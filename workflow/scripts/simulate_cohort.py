"""Rule simulate_cohort: write the built-in simulated MRE cohort to dataset.root."""

import json
import logging
from pathlib import Path

from brainage.logs import log_to_file
from brainage.simulate import simulate_cohort

log_to_file(snakemake.log[0])
root = Path(snakemake.params.root)
options = {k: v for k, v in snakemake.params.options.items() if k != "enabled"}

# Snakemake removes participants.tsv before a rerun; replace the rest only if it is ours,
# never a user's real dataset that dataset.root happens to point at.
description = root / "dataset_description.json"
ours = description.is_file() and "brainage.simulate" in description.read_text()
if root.is_dir() and any(p.name != "participants.tsv" for p in root.iterdir()) and not ours:
    raise SystemExit(
        f"dataset.root {root} holds files not written by the simulator; refusing to "
        f"overwrite them. Set dataset.simulate.enabled: false to use that dataset, or point "
        f"dataset.root at an empty folder for the demo.")
truth = simulate_cohort(root, overwrite=True, **options)
logging.getLogger("brainage.simulate").info(
    "simulated %d subjects into %s: %s", len(truth), root, json.dumps(options))
