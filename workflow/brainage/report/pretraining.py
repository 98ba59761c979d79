"""The numbers of the report's pretraining section (tables.py and figures.py draw them):
what each pretraining run learnt (its training loss, the validation MAE of the grid's
read-out on its held-out T1w subjects), and what fine-tuning its encoder gains over
training the same cell from scratch, per loss, paired over seeds (MAE in years)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from brainage.config import pretrained_run
from brainage.report.results import cell_label, read_history
from brainage.report.targets import LOSS_EXPERIMENT

#: Columns of :func:`pretraining_runs`.
RUN_COLUMNS = ("run", "loss", "epochs", "n_train", "n_validation", "first_loss", "last_loss",
               "loss_epochs_averaged", "validation_mae", "validation_pearson_r")


def epochs_averaged(epochs: int) -> int:
    """How many epochs at each end of a run :func:`pretraining_runs` averages its training
    loss over: a tenth of them, 1 to 10. One epoch's contrastive loss varies by more than
    the fall (the demo's 150-epoch run: between 0.02 and 1.2; its last epoch, 0.66, the
    highest of the last ten)."""
    return max(1, min(10, epochs // 10))

#: Columns of :func:`pretraining_gains`.
GAIN_COLUMNS = ("label", "run", "scratch_variant", "pretrained_variant", "n_pairs",
                "mae_scratch_mean", "mae_pretrained_mean", "gain_mean", "gain_std",
                "pretrained_wins")


def pretraining_runs(files: Mapping[str, Mapping[str, str | Path]]) -> pd.DataFrame:
    """One row per pretraining run (:data:`RUN_COLUMNS`) of ``{run: {"metrics": metrics.json
    (the validation read-out), "history": history.tsv}}``: ``first_loss`` and ``last_loss``
    are the mean training loss of the first and of the last ``loss_epochs_averaged``
    epochs (:func:`epochs_averaged`). A run of ``train.epochs`` 0 (an untrained encoder,
    which the config allows) has epochs 0 and no loss (NaN)."""
    rows = []
    for run, paths in files.items():
        values = json.loads(Path(paths["metrics"]).read_text())
        history = read_history(paths["history"])
        trained = not history.empty  # pretrain.<run>.train.epochs 0: the untrained encoder
        averaged = epochs_averaged(len(history)) if trained else 0
        rows.append({"run": run, "loss": values["loss"],
                     "epochs": int(history["epoch"].max()) if trained else 0,
                     "n_train": values["n_train"], "n_validation": values["n_test"],
                     "first_loss": float(history["loss"].head(averaged).mean())
                     if trained else np.nan,
                     "last_loss": float(history["loss"].tail(averaged).mean())
                     if trained else np.nan,
                     "loss_epochs_averaged": averaged,
                     "validation_mae": values["mae"],
                     "validation_pearson_r": values.get("pearson_r")})
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def _without_init(settings: Mapping[str, Any]) -> str:
    model = {key: value for key, value in settings["model"].items() if key != "init"}
    rest = {key: value for key, value in settings.items()
            if key not in ("experiment", "variant", "model")}
    return json.dumps({**rest, "model": model}, sort_keys=True, default=str)


def pretraining_pairs(settings: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(scratch variant, pretrained variant, run) of the loss experiment: each variant that
    fine-tunes a pretraining run beside the variant with the same settings from scratch. A
    variant that starts from a run but trains no epoch (``config/paper.yaml``'s frozen
    baseline) fine-tunes nothing: its pair with the untrained baseline is no gain of
    fine-tuning, and is left out."""
    scratch = {_without_init(cell): variant for variant, cell in settings.items()
               if pretrained_run(cell["model"]) is None}
    pairs = []
    for variant, cell in settings.items():
        run = pretrained_run(cell["model"])
        if run is not None and cell["train"]["epochs"] > 0 and _without_init(cell) in scratch:
            pairs.append((scratch[_without_init(cell)], variant, run))
    return pairs


def pretraining_gains(seeds: pd.DataFrame, settings: Mapping[str, Mapping[str, Any]], *,
                      experiment: str = LOSS_EXPERIMENT) -> pd.DataFrame:
    """Per pair of :func:`pretraining_pairs`: test MAE from scratch and fine-tuned, and the
    gain (scratch − pretrained, years; positive = pretraining helps) paired over the seeds
    both have (:data:`GAIN_COLUMNS`)."""
    cells = seeds[seeds["experiment"] == experiment]
    rows = []
    for scratch, pretrained, run in pretraining_pairs(settings):
        mae = {variant: cells[cells["variant"] == variant].set_index("seed")["mae"]
               for variant in (scratch, pretrained)}
        common = sorted(set(mae[scratch].index) & set(mae[pretrained].index))
        if not common:
            continue
        gain = mae[scratch].loc[common].to_numpy(float) - mae[pretrained].loc[common].to_numpy(
            float)
        rows.append({"label": cell_label(settings[scratch]), "run": run,
                     "scratch_variant": scratch, "pretrained_variant": pretrained,
                     "n_pairs": len(common),
                     "mae_scratch_mean": float(mae[scratch].loc[common].mean()),
                     "mae_pretrained_mean": float(mae[pretrained].loc[common].mean()),
                     "gain_mean": float(gain.mean()),
                     "gain_std": float(gain.std(ddof=1)) if len(gain) > 1 else np.nan,
                     "pretrained_wins": int(np.sum(gain > 0))})
    return pd.DataFrame(rows, columns=list(GAIN_COLUMNS))
