"""Latent DiffiT-XL/2 on ImageNet-256 SD-VAE latents (paper Table 1: FID 1.73, IS 276.49).

Encode:  python -m diffit_jax.encode --vae=VAE_DIR --data=tfds:imagenet2012 --resolution=256 --out=data/in256_latents
Train:   python -m diffit_jax.main --config=configs/imagenet256_latent.py --workdir=runs/in256
Summary: python -m diffit_jax.main --config=configs/imagenet256_latent.py --dry_run
Sample:  python -m diffit_jax.sample --config=configs/imagenet256_latent.py --workdir=runs/in256
Target:  FID-50K 1.73 / sFID 4.54 / IS 276.49 / P 0.80 / R 0.62 (ADM evaluator against
         VIRTUAL_imagenet256_labeled.npz), 250-step DDPM, power-cosine guidance.

Own images: build them (`python -m diffit_jax.data build --src=MY_IMAGES --out=data/my_images
--resolution=256`), encode with `--data=folder:data/my_images --out=data/my_latents`, train
with `--config.data.name=latents:data/my_latents --config.model.num_classes=-1` (-1: the
dataset's classes) and a smaller model, e.g. `--config.model.variant=B/2`. Without class
sub-folders the model is unconditional: `--config.model.num_classes=0
--config.diffusion.class_dropout_prob=0 --config.sampler.guidance.scale=1` (a run is refused
at start, naming these fields, until they agree with the data).

Official (release + paper App. I.2): XL/2 with depth 28 (the paper's "30" contradicts
the released code and the 561 M count), global-window TMSA, label dropout 0.1, ADM
diffusion with 1000 linear steps, eps prediction and learned-range variance trained
with the hybrid MSE + VLB loss; lr 3e-4, batch 256, EMA 0.9999; sampling with 250
DDPM steps and guidance on the first 3 latent channels, power-cosine schedule with
exponent 4 and scale 4.4 (the released scripts; the paper's best was 4.6).
Not reported (our choices): AdamW with weight decay 0 (the DiT/MDT lineage), no
warm-up, no clipping, fp32, uniform timesteps, 1M steps (the length of the paper's
TMSA ablation, Fig. 7b), center crop + random flip (DiT), sd-vae-ft-ema.
Speed, measured on one H200 (bf16, batch 32; experiments/results/accelerator_nvidia_h200.md):
the blocks run unrolled (`scan_blocks=False`): 446 img/s and 25.7 GiB against 314 img/s and
34.1 GiB scanned, for a 20 s compile instead of 10 s; the same holds on CPU (about 20%
faster). `--config.model.scan_blocks=True --config.model.remat=True` trades speed for
memory (340 img/s in 12.2 GiB): the way to larger per-device batches.
`--config.model.dtype=bfloat16` computes in bf16 (weights stay float32), and then
`attention="auto"` uses cuDNN's fused attention on NVIDIA GPUs (16% faster than XLA's).
How much memory a run needs per device: `--dry_run` (docs/performance.md, "Will it fit").
On TPU (the TPU compiler's own plans, `--dry_run_tpu=SLICE` from any machine; all figures in
experiments/results/tpu_plans.md): `attention="auto"` is XLA's attention, and the defaults
stay as they are. At batch 256 this step fits a v4-8 (29.2 of 32 GiB per chip) and a v5e-64
(11.7 of 16); on a v5e-8 the compiler refuses it (16.6 GiB of temporaries, 15.75 usable),
and `--config.model.remat=True --config.model.scan_blocks=True` (14.9 GiB), FSDP
(`--config.mesh.fsdp=8 --config.mesh.data=1`, 15.3 GiB) or bf16 (14.9 GiB) each make it fit.
"""

from diffit_jax import config_lib

ARGS = ("runlocal",)  # the `:arg` variants: a laptop-sized run


def get_config(arg=None):
  config = config_lib.base_config("latent")
  config.model.update(variant="XL/2", input_size=32, in_channels=4, num_classes=1000,
                      learn_sigma=True, window_size=0, mlp_ratio=4.0, scan_blocks=False)
  config.diffusion.update(name="adm", num_timesteps=1000, beta_schedule="linear",
                          prediction="eps", learn_sigma=True, class_dropout_prob=0.1)
  config.data.update(name="latents:data/in256_latents", image_size=256, channels=4,
                     random_flip=True, num_workers=4)
  config.vae = ""  # a converted SD VAE (python -m diffit_jax.convert vae), for decoding

  config.batch_size = 256
  config.num_train_steps = 1_000_000
  config.optimizer.update(name="adamw", learning_rate=3e-4, weight_decay=0.0, warmup_steps=0,
                          grad_clip_norm=0.0)
  config.ema.update(decay=0.9999)

  config.sampler.update(name="ddpm", num_steps=250, eta=0.0, clip_denoised=False)
  config.sampler.guidance.update(scale=4.4, schedule="power_cosine", power=4.0, channels=3)

  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 50_000
  # EMA sample grids (decoded with config.vae when set): one row per class, DiT's classes.
  config.sample_grid.update(classes=(88, 207, 279, 360, 387, 417, 974, 979), per_class=8)
  # Periodic FID (config.eval) needs a converted Inception (python -m diffit_jax.convert
  # inception), the ADM reference batch and config.vae.
  # Parallelism (config.mesh, config.step_impl, config.distributed): the schema's defaults,
  # data parallel over every device; see diffit_jax/config_lib.py.

  if arg == "runlocal":
    config.model.update(variant="S/2", input_size=8)
    config.batch_size = 8
    config.num_train_steps = 20
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
    config.sample_every_steps = 20
    config.sample_grid.num_steps = 10  # quick grids; config.sampler stays what `sample` uses
  return config
