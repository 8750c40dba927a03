"""denoiser."""
