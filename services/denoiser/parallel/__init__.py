"""Parallel strategies of the denoiser gang; `mesh` is the one place that knows the rank layout."""
