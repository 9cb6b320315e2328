"""Image-space DiffiT on your own folder of images, EDM formulation; sized for one GPU or a laptop.

Build:   python -m diffit_jax.data build --src=MY_IMAGES --out=data/my_images --resolution=32
Train:   python -m diffit_jax.main --config=configs/custom_folder.py --workdir=runs/my_images
Classes: python -m diffit_jax.main --config=configs/custom_folder.py:classes --workdir=runs/my_images
Summary: python -m diffit_jax.main --config=configs/custom_folder.py --dry_run
Sample:  python -m diffit_jax.sample --workdir=runs/my_images --num_samples=64 --out=runs/my_images/eval
Smoke:   python -m diffit_jax.main --config=configs/custom_folder.py:runlocal --workdir=runs/smoke

MY_IMAGES is a folder of images, or of class sub-folders of images (`data build` maps
sorted sub-folder names to labels 0, 1, ...). A dataset elsewhere: add
`--config.data.name=folder:PATH` (PATH as given to `data build --out`).

The resolution, channels and classes are not set here: the run takes them from the
built dataset when it starts (`config_lib.FROM_DATA`: `config.data.image_size=0` and
`channels=0`, the model's `image_size=0`, `in_channels=0`, `out_channels=0`), and
`WORKDIR/config.json` records the values it took, so `sample --workdir` needs no more.
Without `--resolution`, `data build` keeps the images' own size (they must share one).
The model has 3 stages (side, side/2, side/4): the side must be a multiple of 4; 16-64 px
is what it is sized for (larger images: build at 64, or train a latent model on VAE
latents, configs/imagenet256_latent.py).

Variants (`:arg`):
  (none)    unconditional; class sub-folders, if any, are ignored.
  classes   class-conditional with as many classes as the dataset has
            (`config.model.num_classes=-1`), labels dropped with probability 0.1 in
            training and sample grids guided with scale 2 (classifier-free guidance).
  runlocal  a smoke run: a 0.53 M-parameter network, 20 steps of batch 8.

Sizes: a 3.98 M-parameter DiffiT (widths 64/128/128, two DiffiT ResBlocks per stage,
window 4; a quarter of configs/cifar10.py's 15.9 M) at batch 64; one forward pass is
2.14 GFLOPs per image at 32 px (x4 at 64 px). 100 K steps see 6.4 M images (640 epochs
of 10 K images); the EMA half-life (20 K images, ramped up over the first 5% of images
seen) scales EDM's to this length. Every other choice follows configs/cifar10.py (EDM
loss, Adam with warm-up, Heun sampling, random flips); dropout 0.1 and gradient clipping
because one's own datasets are often small and the batch is.
"""

from diffit_jax.config_lib import load_config

ARGS = ("classes", "runlocal")  # the `:arg` variants (see above)


def get_config(arg=None):
  config = load_config("cifar10.py", relative_to=__file__)
  # 0: taken from the dataset when the run starts (config_lib.FROM_DATA).
  config.model.update(image_size=0, in_channels=0, out_channels=0, channels=(64, 128, 128),
                      num_blocks=(2, 2, 2), window_size=4, time_dim=256, frequency_size=64,
                      head_dim=32, num_groups=16, dropout_rate=0.1, num_classes=0)
  config.data.update(name="folder:data/my_images", image_size=0, channels=0, random_flip=True,
                     allow_resize=False, num_workers=2)
  config.batch_size = 64
  config.num_train_steps = 100_000
  config.optimizer.update(learning_rate=5e-4, warmup_steps=1_000, grad_clip_norm=1.0)
  config.ema.update(halflife_kimg=20.0, rampup_ratio=0.05)
  config.sampler.update(num_steps=18)
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2_500
  config.sample_every_steps = 5_000
  config.sample_grid.update(per_class=8, num_images=64, scale=2)

  if arg == "classes":
    config.model.num_classes = -1  # the dataset's
    config.diffusion.class_dropout_prob = 0.1
    config.sampler.guidance.update(scale=2.0, schedule="constant")
  if arg == "runlocal":
    config.model.update(channels=(32, 64, 64), num_blocks=(1, 1, 1), time_dim=64,
                        frequency_size=32, head_dim=32, num_groups=8, dropout_rate=0.0)
    config.data.num_workers = 0
    config.batch_size = 8
    config.num_train_steps = 20
    config.optimizer.warmup_steps = 0
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
    config.sample_every_steps = 20
    config.sample_grid.num_steps = 4  # quick grids; config.sampler stays what `sample` uses
  return config
