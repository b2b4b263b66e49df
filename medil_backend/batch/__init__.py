"""``medil batch``: a task over a whole dataset (BIDS, a folder, a manifest) on a Dask cluster, into a
BIDS-derivatives tree, resumable, with a report. Modules: ``scans`` (what to run), ``derivatives``
(where it goes, what counts as done, per-scan locks), ``worker`` (one scan), ``cluster`` (Dask),
``report`` (JSON + HTML), ``command`` (the command itself)."""
