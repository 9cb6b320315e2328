"""Tests of the official latent DiffiT converter, its export and loading the result.

The reference is `tests/torch_reference.py`, a PyTorch latent DiffiT written from
docs/official_checkpoint.md alone (official key names, NCHW). Small models (depth 3, width 64,
4 heads, 16x16 latents = 8x8 tokens) get random values in EVERY parameter (the final
layer too: a zero-initialised head would hide any error upstream), once with global
attention and once with 4x4 windows; their state dicts go through the real CLI
(`diffit_jax.convert.__main__.main`), and the result is compared in float32.

Relative error throughout: rel(a, b) = max|a - b| / max|b|, b the PyTorch reference.
Full-size (XL/2) key tables are checked on shapes only (PyTorch's meta device), since
building 561 M random parameters is too slow for a unit test.
"""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from diffit_jax import checkpoint, inference
from diffit_jax.convert.__main__ import main as convert_main
from diffit_jax.convert.diffit import (config_for, convert_diffit, detect_model,
                                       expected_tensors, official_buffers)
from diffit_jax.convert.export import export_params
from diffit_jax.convert.safetensors_io import ConversionError, read_safetensors
from diffit_jax.diffusion.guidance import (Guidance, cfg_forward, forward_with_cfg,
                                           guidance_weight)
from diffit_jax.inference import nnx_apply_fn
from helpers import REPO, nhwc, rel, subprocess_env

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402  (tests/ is on sys.path under pytest)

TOL = 1e-5
NUM_CLASSES = 10
SMALL = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
             mlp_ratio=4.0, num_classes=NUM_CLASSES, learn_sigma=True)


def randomize_(model, seed: int = 0):
  """Every parameter random, scaled so activations stay O(1) and attention is not saturated."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "relative_position_bias_table" in name:
        std = 0.5  # large enough that a mis-indexed bias shows
      elif "embedding_table" in name:
        std = 1.0
      elif p.ndim == 1:
        std = 0.1  # biases
      else:
        std = float(np.prod(p.shape[1:])) ** -0.5  # weights: 1 / sqrt(fan_in)
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return model


def state_np(model, prefix: str = "") -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def convert(*argv: str) -> None:
  assert convert_main(list(argv)) == 0


def save(state: dict[str, np.ndarray], path) -> str:
  safetensors.numpy.save_file(state, str(path))
  return str(path)


class Converted:
  """A random reference, its safetensors file, the converted checkpoint and the loaded model."""

  def __init__(self, tmp, window, prefix):
    self.torch = randomize_(torch_reference.LatentDiffiT(**SMALL, window_size=window).eval(),
                            seed=window or 0)
    self.state = state_np(self.torch)
    self.src = save(state_np(self.torch, prefix), tmp / "official.safetensors")
    self.dst = str(tmp / "converted")
    convert("diffit", f"--src={self.src}", f"--out={self.dst}")
    pipeline, params, _ = inference.load(checkpoint=self.dst, require_vae=False)
    self.model, self.config = nnx.merge(pipeline.graphdef, params), pipeline.config
    apply_fn, self.params = nnx_apply_fn(self.model)
    self.apply = jax.jit(apply_fn)

  def __call__(self, x, t, y) -> np.ndarray:
    return np.asarray(self.apply(self.params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))


@pytest.fixture(scope="module", params=[None, 4], ids=["global", "window4"])
def converted(request, tmp_path_factory):
  # The windowed file also carries a DataParallel `module.` prefix.
  prefix = "module." if request.param else ""
  return Converted(tmp_path_factory.mktemp(f"diffit_{request.param}"), request.param, prefix)


def inputs(batch: int, t: list[int], seed: int = 1):
  gen = torch.Generator().manual_seed(seed)
  x = torch.randn(batch, SMALL["in_channels"], SMALL["input_size"], SMALL["input_size"],
                  generator=gen)
  y = torch.tensor([(3 * i) % (NUM_CLASSES + 1) for i in range(batch)])  # includes the null class
  y[-1] = NUM_CLASSES
  return x, torch.tensor(t), y


# ----------------------------------------------------------------------------------------------
# Parity.
# ----------------------------------------------------------------------------------------------


def test_forward_matches_reference(converted):
  x, t, y = inputs(6, [0, 0, 500, 500, 999, 999])
  with torch.no_grad():
    ref = nhwc(converted.torch(x, t, y))  # (B, H, W, 8)
  out = converted(nhwc(x), t.numpy(), y.numpy())
  assert out.shape == ref.shape == (6, 16, 16, 8)
  assert rel(out, ref) < TOL
  for i in range(6):  # per t and label (0: t=0, 5: t=999 with the null class)
    assert rel(out[i], ref[i]) < TOL, (i, int(t[i]), int(y[i]))


@pytest.mark.parametrize("scale,schedule", [(4.4, "power_cosine"), (1.49, "constant")])
def test_guided_forward_matches_reference(converted, scale, schedule):
  x, t, y = inputs(3, [999, 500, 10], seed=2)
  y[-1] = 7  # the null class goes in the unconditional half
  null = torch.full_like(y, NUM_CLASSES)
  with torch.no_grad():
    ref = converted.torch.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]),
                                           torch.cat([y, null]), scale, schedule=schedule)
  ref = nhwc(ref)  # (2B, H, W, 8): [cond half; uncond half]
  guidance = Guidance(scale=scale, schedule=schedule, power=4.0, channels=3, interval=None,
                      null_class=NUM_CLASSES, num_timesteps=1000)
  w = guidance_weight(guidance, t=jnp.asarray(t.numpy()))
  out = np.asarray(cfg_forward(converted.apply, converted.params, jnp.asarray(nhwc(x)),
                               jnp.asarray(t.numpy()), jnp.asarray(y.numpy()), w,
                               channels=guidance.channels, null_class=guidance.null_class,
                               prediction_channels=SMALL["in_channels"]))
  # Our sampler keeps the conditional half: guided eps 0..2, the conditional rest.
  assert rel(out, ref[:3]) < TOL
  assert rel(out[..., :3], ref[3:, ..., :3]) < TOL  # both halves share the guided eps


@pytest.mark.parametrize("scale,schedule", [(4.4, "power_cosine"), (1.49, "constant")])
def test_forward_with_cfg_has_the_official_calling_convention(converted, scale, schedule):
  """`diffusion.forward_with_cfg(model, x, t, y, cfg_scale)` is the release's method: the
  same [cond; uncond] batch in, the same (2B, ...) output (NHWC instead of NCHW)."""
  x, t, y = inputs(3, [999, 500, 10], seed=3)
  x2, t2 = torch.cat([x, x]), torch.cat([t, t])
  y2 = torch.cat([y.clamp(max=NUM_CLASSES - 1), torch.full_like(y, NUM_CLASSES)])
  with torch.no_grad():
    ref = nhwc(converted.torch.forward_with_cfg(x2, t2, y2, scale, schedule=schedule))
  out = np.asarray(forward_with_cfg(
      lambda *a: converted.apply(converted.params, *a), jnp.asarray(nhwc(x2)),
      jnp.asarray(t2.numpy()), jnp.asarray(y2.numpy()), scale, schedule=schedule))
  assert out.shape == ref.shape == (6, 16, 16, 8)
  assert rel(out, ref) < TOL


def test_load_sharded_and_config(converted):
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  pipeline, params, step = inference.load(checkpoint=converted.dst, mesh=mesh, require_vae=False)
  model, config = nnx.merge(pipeline.graphdef, params), pipeline.config
  assert step is None
  kernel = model.blocks.attn.qkv.kernel[...]
  assert kernel.shape == (3, 64, 192) and kernel.sharding == replicated
  assert config.model.variant == "custom" and config.model.depth == 3
  assert config.model.window_size == (0 if converted.torch.blocks[0].attn.window == 8 else 4)
  metadata = checkpoint.load_metadata(converted.dst)
  assert metadata["kind"] == "diffit" and metadata["source"] == os.path.abspath(converted.src)
  assert metadata["num_params"] == sum(p.numel() for p in converted.torch.parameters())


# ----------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------


def test_export_then_import_is_identity(converted, tmp_path):
  exported = str(tmp_path / "exported.safetensors")
  convert("export", f"--src={converted.dst}", f"--out={exported}")
  assert [f for f in os.listdir(tmp_path)] == ["exported.safetensors"]  # no temporary left
  tensors = read_safetensors(exported)
  assert tensors.keys() == converted.state.keys()  # parameters and buffers, prefix removed
  for key, value in converted.state.items():
    assert tensors[key].dtype == value.dtype, key
    if key == "pos_embed":  # regenerated by each side in float64 -> float32
      np.testing.assert_allclose(tensors[key], value, rtol=0, atol=1e-6)
    else:
      np.testing.assert_array_equal(tensors[key], value, err_msg=key)  # bitwise

  again = str(tmp_path / "again")
  convert("diffit", f"--src={exported}", f"--out={again}")
  first, _ = checkpoint.load_weights(converted.dst)
  second, _ = checkpoint.load_weights(again)
  flat1, flat2 = traverse_util.flatten_dict(first), traverse_util.flatten_dict(second)
  assert flat1.keys() == flat2.keys()
  for path in flat1:
    np.testing.assert_array_equal(np.asarray(flat1[path]), np.asarray(flat2[path]), str(path))

  # The official-layout module loads the export strictly and computes the same outputs.
  window = converted.torch.blocks[0].attn.window
  reloaded = torch_reference.LatentDiffiT(**SMALL, window_size=window).eval()
  reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
  x, t, y = inputs(3, [0, 500, 999], seed=3)
  with torch.no_grad():
    assert rel(reloaded(x, t, y), converted.torch(x, t, y)) < 1e-6


def test_export_from_training_workdir(converted, tmp_path, reported_error):
  # A training run's checkpoint (as the trainer writes it) exports its EMA params.
  params, _ = checkpoint.load_weights(converted.dst)
  workdir = str(tmp_path / "run")
  ckpt = checkpoint.TrainCheckpointer(workdir, async_save=False)
  ckpt.save(7, {"step": np.int32(7), "ema_params": params}, config=converted.config.to_dict())
  ckpt.close()
  dst = str(tmp_path / "ema.safetensors")
  convert("export", f"--src={workdir}", f"--out={dst}")
  tensors = read_safetensors(dst)
  assert tensors.keys() == converted.state.keys()
  for key, value in converted.state.items():
    if key != "pos_embed":
      np.testing.assert_array_equal(tensors[key], value, err_msg=key)
  error = reported_error(convert_main, ["export", f"--src={workdir}",
                                        f"--out={tmp_path}/ema8.safetensors", "--step=8"])
  assert isinstance(error, FileNotFoundError) and "step 8" in str(error), error


def test_export_params_checks_the_config(converted):
  params = traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
          checkpoint.load_weights(converted.dst)[0]).items()})
  other = converted.config.model.copy_and_resolve_references()
  other.depth = 2
  with pytest.raises(ConversionError, match=r"(?s)wrong shape.*blocks\.attn\.qkv\.kernel"):
    export_params(params, other)
  del params["final_layer"]
  with pytest.raises(ConversionError, match=r"(?s)missing.*final_layer\.linear\.bias"):
    export_params(params, converted.config.model)


# ----------------------------------------------------------------------------------------------
# Files that do not fit: one clear error, nothing written.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state():
  model = randomize_(torch_reference.LatentDiffiT(**SMALL).eval(), seed=5)
  return state_np(model)


def assert_nothing_written(tmp_path, dst):
  assert not os.path.exists(dst)
  assert not [f for f in os.listdir(tmp_path) if "partial" in f]


def test_truncated_file_fails_cleanly(small_state, tmp_path, reported_error):
  src = save(small_state, tmp_path / "full.safetensors")
  with open(src, "rb") as f:
    data = f.read()
  with open(src, "wb") as f:
    f.write(data[: len(data) // 2])
  dst = str(tmp_path / "out")
  error = reported_error(convert_main, ["diffit", f"--src={src}", f"--out={dst}"])
  assert isinstance(error, ConversionError) and "truncated" in str(error), error
  assert_nothing_written(tmp_path, dst)


def test_mismatched_file_lists_every_problem(small_state, tmp_path, reported_error):
  state = dict(small_state)
  del state["blocks.1.attn.proj.bias"]
  state["blocks.0.attn.extra.weight"] = np.zeros((3,), np.float32)
  state["blocks.2.mlp.fc1.weight"] = np.zeros((128, 64), np.float32)
  src = save(state, tmp_path / "bad.safetensors")
  dst = str(tmp_path / "out")
  error = reported_error(convert_main, ["diffit", f"--src={src}", f"--out={dst}"])
  assert isinstance(error, ConversionError), error
  message = str(error)
  assert "missing (1):\n    blocks.1.attn.proj.bias" in message
  assert "unexpected (1):\n    blocks.0.attn.extra.weight" in message
  assert ("wrong shape (1):\n    blocks.2.mlp.fc1.weight: file (128, 64), expected (256, 64)"
          in message)
  assert "depth 3, width 64, 4 heads" in message  # what the file was read as
  assert_nothing_written(tmp_path, dst)


def test_bad_buffers_are_reported(small_state, tmp_path, reported_error):
  state = dict(small_state)
  index = state["blocks.1.attn.relative_position_index"].copy()
  state["blocks.1.attn.relative_position_index"] = index.T.copy()  # a different bias ordering
  pos = state["pos_embed"]  # (1, 64, D) -> row-first (token (r, c) gets (c, r)'s embedding)
  state["pos_embed"] = pos.reshape(8, 8, -1).transpose(1, 0, 2).reshape(pos.shape).copy()
  src = save(state, tmp_path / "bad.safetensors")
  dst = str(tmp_path / "out")
  error = reported_error(convert_main, ["diffit", f"--src={src}", f"--out={dst}"])
  assert isinstance(error, ConversionError), error
  assert "blocks.1.attn.relative_position_index" in str(error)
  assert "row-first" in str(error)
  assert_nothing_written(tmp_path, dst)


def test_buffers_are_optional(small_state, tmp_path):
  state = {k: v for k, v in small_state.items()
           if k != "pos_embed" and not k.endswith("relative_position_index")}
  params, config, _ = convert_diffit(save(state, tmp_path / "no_buffers.safetensors"))
  assert config.model.input_size == 16 and config.model.window_size == 0
  assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 64, 192)


def test_config_that_does_not_fit_is_refused(small_state, tmp_path, reported_error):
  src = save(small_state, tmp_path / "small.safetensors")
  dst = str(tmp_path / "out")
  error = reported_error(convert_main, ["diffit", f"--src={src}", f"--out={dst}",
                                        f"--config={REPO}/configs/imagenet512_latent.py"])
  assert isinstance(error, ConversionError), error
  assert re.search(r"(?s)input_size: file 16, config 64.*Drop --config", str(error)), error
  assert_nothing_written(tmp_path, dst)
  os.makedirs(dst)
  error = reported_error(convert_main, ["diffit", f"--src={src}", f"--out={dst}"])
  assert isinstance(error, ConversionError) and "already exists" in str(error), error


# ----------------------------------------------------------------------------------------------
# Detection.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_size,pixels,schedule,scale",
                         [(32, 256, "power_cosine", 4.4), (64, 512, "constant", 1.49)])
def test_resolution_is_detected(tmp_path, input_size, pixels, schedule, scale):
  model = randomize_(torch_reference.LatentDiffiT(
      input_size=input_size, hidden_size=32, depth=1, num_heads=2, num_classes=1000).eval())
  _, config, info = convert_diffit(save(state_np(model), tmp_path / "x.safetensors"))
  assert config.model.input_size == input_size and config.data.image_size == pixels
  assert config.sampler.guidance.schedule == schedule and config.sampler.guidance.scale == scale
  assert info["detected"]["num_classes"] == 1000
  # The stored config is plain JSON and rebuilds the same model.
  stored = json.loads(json.dumps(config.to_dict()))
  assert stored["model"] == json.loads(json.dumps(config.model.to_dict()))
  assert ml_collections.ConfigDict(stored["model"]) == config.model


def meta_state(**kwargs) -> dict[str, np.ndarray]:
  """The official state dict's shapes for any size, without allocating (PyTorch meta device)."""
  with torch.device("meta"):
    model = torch_reference.LatentDiffiT(**kwargs)
  dtype = {torch.float32: np.float32, torch.int64: np.int64}
  return {k: np.broadcast_to(np.zeros((), dtype[v.dtype]), tuple(v.shape))
          for k, v in model.state_dict().items()}


@pytest.mark.parametrize("input_size,tokens,table", [(32, 256, 961), (64, 1024, 3969)])
def test_full_size_official_layout(input_size, tokens, table):
  state = meta_state(input_size=input_size)  # the released XL/2
  assert state["pos_embed"].shape == (1, tokens, 1152)
  assert state["blocks.27.attn.relative_position_bias_table"].shape == (table, 16)
  detected, guessed = detect_model(state)
  assert not guessed
  config = config_for(detected, guessed)
  assert config.model.variant == "XL/2" and config.model.input_size == input_size
  expected = expected_tensors(config.model)
  params = {k for k in state if k != "pos_embed" and not k.endswith("relative_position_index")}
  assert set(expected) == params
  assert all(tuple(state[k].shape) == shape for k, (_, _, shape) in expected.items())
  buffers = official_buffers(config.model)
  assert {k: v.shape for k, v in buffers.items()} == {
      k: state[k].shape for k in state.keys() - params}
  if input_size == 32:
    assert sum(state[k].size for k in params) == 561_035_232  # docs/official_checkpoint.md


def test_unconditional_fixed_variance_detected():
  state = meta_state(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=0,
                     learn_sigma=False, window_size=2, mlp_ratio=2.0)
  detected, guessed = detect_model(state)
  assert not guessed
  assert detected == dict(input_size=8, in_channels=4, num_classes=0, learn_sigma=False,
                          mlp_ratio=2.0, window_size=2, depth=2, hidden_size=32, num_heads=2,
                          patch_size=2)
  config = config_for(detected, guessed)
  assert config.sampler.guidance.scale == 1.0 and not config.diffusion.learn_sigma


def test_a_full_disk_stops_the_conversion_with_one_line(small_state, tmp_path, run_on_small_disk):
  """`convert diffit --out` on a real tmpfs with 64 KB free: one line naming --out and the
  space the weights need, exit 2, no partial folder."""
  if run_on_small_disk is None:
    pytest.skip("no mount namespace here (unshare -m needs root or user namespaces)")
  src = save(small_state, tmp_path / "small.safetensors")
  script = ('fill 64\n"$PYTHON" -m diffit_jax.convert diffit --src="$SRC" --out="$MNT/ckpt" '
            '> "$OUT/full.txt" 2>&1; echo "rc=$?"; ls -a "$MNT"')
  env = subprocess_env(PYTHON=sys.executable, SRC=src, OUT=str(tmp_path))
  proc = run_on_small_disk(script, tmp_path / "mnt", 4096, env, timeout=300)
  full = (tmp_path / "full.txt").read_text()
  assert "rc=2" in proc.stdout and "Traceback" not in full, (proc.stdout, full)
  (error,) = [line for line in full.splitlines() if line.startswith("error:")]
  needed = sum(v.nbytes for v in small_state.values())
  assert f"out of space writing {tmp_path / 'mnt' / 'ckpt'}: the write needs about" in error
  assert needed > 64_000, needed  # the check has something to refuse
  assert proc.stdout.split("rc=2")[1].split() == [".", "..", "filler"], proc.stdout
