"""Rule make_figures: every figure of the configuration but the UMAPs, which rules
plot_embeddings and plot_pretraining_embeddings draw (brainage.report.figures.make_figures)."""

from brainage.logs import log_to_file
from brainage.report.figures import by_participant, make_figures

log_to_file(snakemake.log[0])
stiffness, t1w = (by_participant(snakemake.input[name]) for name in ("stiffness_maps", "T1w_maps"))
make_figures(metrics=list(snakemake.input.metrics), participants=snakemake.input.participants,
             qc=snakemake.input.qc, maps=by_participant(snakemake.input.maps),
             predictions=list(snakemake.input.predictions),
             settings=snakemake.params.settings, focus=snakemake.params.focus,
             qc_thresholds=snakemake.params.qc_thresholds, outputs=snakemake.params.paths,
             search=list(snakemake.input.search), histories=snakemake.params.histories,
             modality_maps={participant: {"stiffness": path, "T1w": t1w[participant]}
                            for participant, path in stiffness.items()},
             pretraining=snakemake.params.pretraining, map_name=snakemake.params.map_name)
