"""diffit_jax: DiffiT (Diffusion Vision Transformers, arXiv 2312.02139) in JAX / Flax NNX."""

__version__ = "0.1.0"
