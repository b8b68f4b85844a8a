"""Inference: inferers and TTA, block-wise and streaming prediction, parts, submission."""
