"""Image-space DiffiT on CIFAR-10 32x32, EDM formulation (paper Table 2: FID 1.95).

Data:    python -m diffit_jax.data build --src=cifar-10-python.tar.gz --out=data/cifar10
         (once, from the official tarball; no TensorFlow needed. The config reads
         folder:data/cifar10, relative to where you run; elsewhere pass
         --config.data.name=folder:DIR, or tfds:cifar10 for a tfds-prepared copy.)
Train:   python -m diffit_jax.main --config=configs/cifar10.py --workdir=runs/cifar10
Summary: python -m diffit_jax.main --config=configs/cifar10.py --dry_run
TPU:     python -m diffit_jax.main --config=configs/cifar10.py --dry_run_tpu=v5e-8 (the TPU
         compiler's plan: 3.64 of 16 GiB per chip at batch 512, fp32; memory-bound)
Laptop:  python -m diffit_jax.main --config=configs/cifar10.py:runlocal --workdir=runs/local
Target:  FID 1.95 on 50K samples against the training set, 18-step EDM Heun (35 NFE).

Stated by the paper (App. I.1): 3 stages at 32/16/8, 2 DiffiT ResBlocks per stage,
window 4, time token 512 (Table 3), positional time embedding (Table 8); EDM
training "strictly followed": Adam, lr 1e-3, batch 512, 200K iterations, EDM's
deterministic sampler with 18 steps; unconditional.

Where the paper is silent, the choices and why: docs/paper_notes.md, "Image-space DiffiT".
"""

from diffit_jax import config_lib

ARGS = ("runlocal",)  # the `:arg` variants: a laptop-sized run


def get_config(arg=None):
  config = config_lib.base_config("image")
  config.model.update(
      image_size=32, in_channels=3, out_channels=3, channels=(128, 256, 256),
      num_blocks=(2, 2, 2), window_size=4, time_dim=512, frequency_size=128, head_dim=64,
      num_groups=32, mlp_ratio=4.0, dropout_rate=0.13, num_classes=0)
  config.diffusion.update(name="edm", sigma_data=0.5, p_mean=-1.2, p_std=1.2,
                          class_dropout_prob=0.0)
  config.data.update(name="folder:data/cifar10", split="train", image_size=32, channels=3,
                     random_flip=True, num_workers=4)

  config.batch_size = 512
  config.num_train_steps = 200_000
  config.optimizer.update(name="adam", learning_rate=1e-3, warmup_steps=19_531)
  config.ema.update(halflife_kimg=500.0, rampup_ratio=0.05)
  config.sampler.update(name="heun", num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0)

  config.log_every_steps = 100
  config.checkpoint_every_steps = 5_000
  config.sample_every_steps = 10_000
  # Periodic FID (config.eval) needs a converted Inception (python -m diffit_jax.convert
  # inception) and reference statistics or images (see python -m diffit_jax.evaluate).
  # Parallelism (config.mesh, config.step_impl, config.distributed): the schema's defaults,
  # data parallel over every device; see diffit_jax/config_lib.py.

  if arg == "runlocal":
    config.model.update(channels=(32, 64, 64), num_blocks=(1, 1, 1), time_dim=64,
                        frequency_size=32, head_dim=32, num_groups=8, dropout_rate=0.0)
    config.batch_size = 8
    config.num_train_steps = 20
    config.optimizer.warmup_steps = 0
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
    config.sample_every_steps = 20
    config.sample_grid.num_steps = 4  # quick grids; config.sampler stays what `sample` uses
  return config
