"""ditmesh: a gRPC mesh for serving Diffusion Transformers."""

__version__ = "0.1.0"
