"""Utilities every stage may use: errors, paths, distributed helpers, file writes, memory, AMP."""
