"""Training a run: the pipeline (``engine``), the trainer it builds (``trainer``), processes and ranks
(``processes``), the output folder (``outputs``), checkpoints, signals, callbacks, speedups and trackers."""
