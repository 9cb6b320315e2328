"""Fine-tune NVIDIA's released DiffiT-XL/2-256 on your own class-labelled images (latent space).

Convert: python -m diffit_jax.convert diffit --src=diffit_256.safetensors --out=ckpt/diffit_256
         python -m diffit_jax.convert vae --src=sd-vae-ft-ema --out=ckpt/sd_vae_ema
Data:    python -m diffit_jax.data build --src=my_images --out=data/my_images --resolution=256
         python -m diffit_jax.encode --vae=ckpt/sd_vae_ema --data=folder:data/my_images \
             --resolution=256 --out=data/my_latents
Train:   python -m diffit_jax.main --config=configs/finetune_latent.py --workdir=runs/my_ft \
             --config.init_from=ckpt/diffit_256 --config.data.name=latents:data/my_latents \
             --config.model.num_classes=N --config.vae=ckpt/sd_vae_ema
Sample:  python -m diffit_jax.sample --workdir=runs/my_ft --vae=ckpt/sd_vae_ema
Export:  python -m diffit_jax.convert export --src=runs/my_ft --out=my_diffit.safetensors
Smoke:   python -m diffit_jax.main --config=configs/finetune_latent.py:runlocal ...
         (the S/2 network of configs/imagenet256_latent.py:runlocal; init_from a run of it)

`my_images/` holds one sub-folder per class (`data build` names the classes); N is their
number. `config.init_from` may also be `diffit_256.safetensors` itself, or a training
workdir (`runs/x`, `runs/x@STEP`). The official weights start both the trained weights
and the EMA; the 1000-row ImageNet label table becomes N fresh rows plus the released
null-class row, so classifier-free guidance keeps working from the first step (see
diffit_jax/finetune.py). Everything else is the released network: what else the config
changes in config.model must match the file, or the run is refused at start.

Settings (ours; neither the paper nor the release fine-tunes): the pre-training recipe of
configs/imagenet256_latent.py (ADM hybrid loss, label dropout 0.1, the released sampler)
with what a short run on a small dataset needs:
  * learning rate 1e-4 (a third of pre-training's 3e-4) after a 500-step linear warm-up,
    and gradient clipping at 1: the optimizer starts without moments, and Adam's first
    updates move every weight by about the learning rate whatever its gradient;
  * batch 64 on one GPU, computing in bfloat16: the H200 planned 25.7 GiB for the XL/2
    bf16 step at batch 32 (configs/imagenet256_latent.py), so about 42 GiB at 64 (an
    estimate; `--dry_run` prints your card's plan); 20 K steps are 1.3 M images, many
    epochs of a few-thousand-image dataset: watch the sample grids for memorisation;
  * EMA decay 0.999 (a half-life of ~700 steps) instead of 0.9999, whose ~7 K-step
    half-life would keep the EMA near the released weights for most of the run;
  * checkpoints every 2 K steps, sample grids every 5 K.
Fine-tuning to an unconditional model (`--config.model.num_classes=0`) also needs
`--config.diffusion.class_dropout_prob=0 --config.sampler.guidance.scale=1`.
"""

from diffit_jax.config_lib import load_config

ARGS = ("runlocal",)  # the `:arg` variants: a laptop-sized run


def get_config(arg=None):
  config = load_config("imagenet256_latent.py" + (f":{arg}" if arg else ""), relative_to=__file__)
  config.init_from = ""  # set on the command line: the converted official weights
  config.init_from_params = "ema"
  config.model.dtype = "bfloat16"  # weights, gradients and Adam moments stay float32
  config.data.name = "latents:data/my_latents"
  config.vae = ""  # a converted SD VAE, to decode the sample grids
  config.batch_size = 64
  config.num_train_steps = 20_000
  config.optimizer.update(name="adamw", learning_rate=1e-4, weight_decay=0.0, warmup_steps=500,
                          grad_clip_norm=1.0)
  config.ema.update(decay=0.999)
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2_000
  config.sample_every_steps = 5_000
  config.sample_grid.classes = ()  # one row for each of the first 10 classes
  if arg == "runlocal":  # imagenet256_latent.py:runlocal's S/2 network, a few steps on a CPU
    config.model.dtype = "float32"
    config.batch_size = 8
    config.num_train_steps = 20
    config.optimizer.warmup_steps = 5
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
    config.sample_every_steps = 20
  return config
