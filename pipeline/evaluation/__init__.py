"""Evaluation: the competition score and its Betti-matching kernels, metric reports, tune."""
