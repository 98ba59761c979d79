"""The benchmark helpers read the workflow as it is: every rule that writes a benchmark
table has a stage in tests/benchmarks/summarise_run.py."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_summarise_run():
    path = REPO / "tests" / "benchmarks" / "summarise_run.py"
    spec = importlib.util.spec_from_file_location("summarise_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmarked_rule_has_a_stage():
    """prepare_openbhb (the paper run's 12-hour data job) was summed under "other"."""
    stems = set()
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        text = rules.read_text()
        # LAYOUT.benchmark("<stage folder>", "[<wildcards>/]<rule>[_<wildcard>]"), or the
        # per-subject step_benchmark("<rule>")
        for name in re.findall(r'LAYOUT\.benchmark\(\s*"[^"]+",\s*f?"(?:[^"]*/)?([a-z_]+)',
                               text) + re.findall(r'step_benchmark\("([a-z_]+)"\)', text):
            stems.add(name.rstrip("_"))
    assert {"prepare_openbhb", "strip_skull", "export_model", "train_encoder"} <= stems
    stages = load_summarise_run().STAGES
    assert sorted(stems - set(stages)) == []
