"""Tests of the Flax SD VAE (`diffit_jax.models.vae`) and its converter (`diffit_jax.convert.vae`).

The reference is diffusers' PyTorch `AutoencoderKL`, built offline from a config dict with
seeded random weights (every 1-D parameter, GroupNorm affine included, gets noise so that
a swapped scale/bias or a missed tensor cannot go unnoticed). Its state dict goes through
the real CLI (`diffit_jax.convert.__main__.main`) and the result is compared in float32.

Relative error throughout: rel(a, b) = max|a - b| / max|b|, b the PyTorch reference.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from diffit_jax import checkpoint
from diffit_jax.convert.__main__ import main as convert_main
from diffit_jax.convert.safetensors_io import ConversionError, check_keys, read_safetensors, strip_prefixes
from diffit_jax.convert.vae import load_vae
from diffit_jax.models.vae import LATENT_SCALE, AutoencoderKL, VAEConfig, from_latent
from helpers import assert_trees_equal, nhwc, rel

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8)
SD = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
TOL = 1e-4


def torch_vae(arch: dict, seed: int = 0):
  """diffusers AutoencoderKL with seeded random weights, 1-D parameters perturbed too."""
  n = len(arch["block_out_channels"])
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(latent_channels=4, down_block_types=["DownEncoderBlock2D"] * n,
                                  up_block_types=["UpDecoderBlock2D"] * n, **arch).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:  # GroupNorm scale (init 1) and every bias (GroupNorm's init 0).
        p.add_(0.1 * torch.randn_like(p))
  return model


def state_np(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def convert(src, dst, *extra) -> None:
  assert convert_main(["vae", f"--src={src}", f"--out={dst}", *extra]) == 0


def reference(model, image_size: int, batch: int):
  """Random images and the PyTorch posterior / decoding, NHWC."""
  x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    posterior = model.encode(x).latent_dist
    decoded = model.decode(posterior.mean).sample
  return nhwc(x), nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(decoded)


def jitted(vae):
  """encode(x) and decode(z) of `vae` as one jitted pure function of (x, z) (one compile)."""
  graphdef, state = nnx.split(vae)

  @jax.jit
  def run(state, x, z):
    model = nnx.merge(graphdef, state)
    mean, logvar = model.encode(x)
    return mean, logvar, model.decode(z)

  return lambda x, z: run(state, x, z)


def assert_parity(model, vae, image_size: int, batch: int) -> None:
  x, mean, logvar, decoded = reference(model, image_size, batch)
  got = jitted(vae)(jnp.asarray(x), jnp.asarray(mean))
  errs = {name: rel(a, b) for name, a, b in zip(("mean", "logvar", "decoded"), got, (mean, logvar, decoded))}
  print(errs)
  assert all(e <= TOL for e in errs.values()), errs


def to_ldm(state: dict[str, np.ndarray], n_levels: int) -> dict[str, np.ndarray]:
  """diffusers -> original LDM/CompVis names, written independently of the converter."""
  out = {}
  for key, value in state.items():
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
               lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.", k)
    k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    k = k.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    m = re.match(r"(.*)mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
    if m:
      name = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
      k = f"{m[1]}mid.attn_1.{name}.{m[3]}"
      if m[3] == "weight":
        value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
    out["first_stage_model." + k] = value
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch model, diffusers folder, converted checkpoint) for the tiny config."""
  root = tmp_path_factory.mktemp("tiny")
  model = torch_vae(TINY)
  model.save_pretrained(root / "diffusers")
  convert(root / "diffusers", root / "converted")
  return model, root / "diffusers", root / "converted"


# --- Shapes and dtypes of the Flax model on its own ------------------------------------------

def test_shapes_and_dtypes():
  """Traced abstractly (no compile): output shapes, float32 outputs and params for both compute dtypes."""
  config = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8)
  assert config.downsample_factor == 4

  def run(dtype):
    vae = AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0))
    mean, logvar = vae.encode(jnp.zeros((2, 16, 24, 3)))
    return mean, logvar, vae.decode(mean), nnx.state(vae, nnx.Param)

  for dtype in (jnp.float32, jnp.bfloat16):
    mean, logvar, out, params = jax.eval_shape(lambda: run(dtype))
    assert mean.shape == logvar.shape == (2, 4, 6, 4)
    assert mean.dtype == logvar.dtype == jnp.float32
    assert out.shape == (2, 16, 24, 3) and out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_config_validation_and_round_trip():
  config = VAEConfig(block_out_channels=(32, 64), norm_num_groups=8)
  assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  with pytest.raises(ValueError, match="does not divide"):
    VAEConfig(block_out_channels=(32, 48), norm_num_groups=32)
  with pytest.raises(ValueError, match="unknown VAEConfig fields"):
    VAEConfig.from_dict({"block_out_chanels": [32]})


def test_latent_scaling_round_trip():
  mean = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  np.testing.assert_allclose(from_latent(mean * LATENT_SCALE), mean, atol=1e-6)
  assert LATENT_SCALE == 0.18215


# --- Parity with diffusers through the real CLI ----------------------------------------------

def test_parity_tiny_diffusers_folder(tiny):
  model, _, converted = tiny
  metadata = checkpoint.load_metadata(converted)
  assert metadata["kind"] == "vae" and metadata["naming"] == "diffusers"
  assert metadata["config"] == VAEConfig(block_out_channels=(32, 64), layers_per_block=1,
                                         norm_num_groups=8).to_dict()
  assert_parity(model, load_vae(converted), image_size=32, batch=2)


def test_parity_full_sd_config(tmp_path):
  """The 83.65 M-parameter SD VAE from a bare safetensors file (config inferred from shapes)."""
  model = torch_vae(SD, seed=1)
  safetensors.numpy.save_file(state_np(model), tmp_path / "sd_vae.safetensors")
  convert(tmp_path / "sd_vae.safetensors", tmp_path / "converted")
  vae = load_vae(tmp_path / "converted")
  assert vae.config == VAEConfig()
  assert sum(p.size for p in jax.tree.leaves(nnx.state(vae, nnx.Param))) == 83_653_863
  assert_parity(model, vae, image_size=32, batch=1)


def test_ldm_names_give_the_same_weights(tiny, tmp_path):
  model, _, converted = tiny
  state = to_ldm(state_np(model), n_levels=2)
  # A full SD checkpoint also holds the UNet and text encoder; only first_stage_model.* is the VAE.
  state["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((2, 2), np.float32)
  state["cond_stage_model.transformer.x"] = np.zeros((3,), np.float32)
  safetensors.numpy.save_file(state, tmp_path / "sd.safetensors")
  convert(tmp_path / "sd.safetensors", tmp_path / "ldm", "--norm_num_groups=8")
  assert checkpoint.load_metadata(tmp_path / "ldm")["naming"] == "ldm"
  got = nnx.to_pure_dict(nnx.state(load_vae(tmp_path / "ldm"), nnx.Param))
  want = nnx.to_pure_dict(nnx.state(load_vae(converted), nnx.Param))
  assert_trees_equal(got, want)


# --- Bad sources fail before anything is written ---------------------------------------------

def test_truncated_file_fails_cleanly(tiny, tmp_path, reported_error):
  _, folder, _ = tiny
  data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
  bad = tmp_path / "vae.safetensors"
  bad.write_bytes(data[: len(data) // 2])
  error = reported_error(convert_main, ["vae", f"--src={bad}", f"--out={tmp_path / 'out'}"])
  assert isinstance(error, ConversionError), error
  assert re.search(r"vae\.safetensors.*truncated", str(error)), error
  assert os.listdir(tmp_path) == ["vae.safetensors"]  # no dst, no partial folder


def test_mismatched_file_lists_every_problem(tiny, tmp_path, reported_error):
  model, _, _ = tiny
  state = state_np(model)
  del state["decoder.conv_out.bias"]
  state["encoder.extra.weight"] = np.zeros((1,), np.float32)
  state["quant_conv.weight"] = state["quant_conv.weight"][:, :4]
  safetensors.numpy.save_file(state, tmp_path / "vae.safetensors")
  error = reported_error(convert_main, ["vae", f"--src={tmp_path / 'vae.safetensors'}",
                                        f"--out={tmp_path / 'out'}", "--norm_num_groups=8"])
  assert isinstance(error, ConversionError), error
  msg = str(error)
  print(msg)
  assert "missing (1):\n    decoder.conv_out.bias" in msg
  assert "unexpected (1):\n    encoder.extra.weight" in msg
  assert "quant_conv.weight: file (8, 4, 1, 1), expected (8, 8, 1, 1)" in msg
  assert os.listdir(tmp_path) == ["vae.safetensors"]


def test_existing_destination_is_refused(tiny, tmp_path, reported_error):
  _, folder, _ = tiny
  (tmp_path / "out").mkdir()
  error = reported_error(convert_main, ["vae", f"--src={folder}", f"--out={tmp_path / 'out'}"])
  assert isinstance(error, ConversionError) and "already exists" in str(error), error


def test_load_vae_rejects_other_checkpoints(tmp_path):
  checkpoint.save_weights(str(tmp_path / "c"), {"w": np.zeros(2)}, metadata={"kind": "diffit"})
  with pytest.raises(ValueError, match="not a VAE"):
    load_vae(tmp_path / "c")


# --- Shared safetensors helpers --------------------------------------------------------------

def test_strip_prefixes_only_strips_shared_prefixes():
  x = np.zeros(1)
  assert list(strip_prefixes({"module.ema.a": x, "module.ema.b": x})) == ["a", "b"]
  assert list(strip_prefixes({"model.a": x, "b": x})) == ["model.a", "b"]


def test_check_keys_truncates_long_lists():
  expected = {f"k{i:03d}": (2,) for i in range(40)}
  with pytest.raises(ConversionError, match=r"(?s)missing \(40\):.*\.\.\. and 28 more"):
    check_keys(expected, {}, source="f.safetensors")


def test_read_safetensors_select_and_bfloat16(tmp_path):
  torch_st = pytest.importorskip("safetensors.torch")
  torch_st.save_file({"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.zeros(2)},
                     tmp_path / "x.safetensors")
  state = read_safetensors(str(tmp_path / "x.safetensors"))
  np.testing.assert_array_equal(state["a"].astype(np.float32), np.ones(3))
  assert list(read_safetensors(str(tmp_path / "x.safetensors"), select=lambda k: k == "b")) == ["b"]


# --- jit and data-parallel sharding ----------------------------------------------------------

def test_jit_and_data_parallel_sharding(tiny):
  """Parameters replicated, batch split over 8 devices: still equal to PyTorch, output stays sharded."""
  model, _, converted = tiny
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  vae = load_vae(converted, sharding=NamedSharding(mesh, P()))
  assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(nnx.state(vae, nnx.Param)))
  x, mean, logvar, decoded = reference(model, image_size=16, batch=jax.device_count())
  batch_sharded = NamedSharding(mesh, P("data"))
  got = jitted(vae)(jax.device_put(x, batch_sharded), jax.device_put(mean, batch_sharded))
  for a, b in zip(got, (mean, logvar, decoded)):
    assert a.sharding.spec[0] == "data"
    assert rel(a, b) <= TOL
