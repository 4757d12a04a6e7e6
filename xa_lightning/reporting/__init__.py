"""Paper tables as data (``evaluation/tables/*.yaml``), their sweeps, and the table / plot builder.

* :mod:`~xa_lightning.reporting.schema`: the table files and their loader (one-line errors).
* :mod:`~xa_lightning.reporting.sweeps`: ``xa-train -m +table=<name>``: one Hydra config option per run.
* :mod:`~xa_lightning.reporting.runs`: what a finished (or failed) run directory holds.
* :mod:`~xa_lightning.reporting.build`: cells from runs (mean ± std over seeds), Markdown and CSV.
* :mod:`~xa_lightning.reporting.plots`: curves, labelled image grids, loss curves (matplotlib, Agg).
* :mod:`~xa_lightning.reporting.wandb_offline`: reads an offline W&B run back.
"""
