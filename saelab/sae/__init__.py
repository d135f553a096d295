"""Sparse autoencoders: architectures, one trainer, metrics and the SAELens-compatible saved format."""
