"""moetrain: train sparse Mixture-of-Experts language models with JAX and Flax."""

__version__ = '0.1.0'
