"""Tests of the DiffiT networks: shapes, NumPy oracles, TMSA invariants, parameter counts."""

import glob
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffit_jax import config_lib, models
from diffit_jax.config_lib import load_config
from diffit_jax.models import cpu_kernels, embeddings, latent, tmsa
from helpers import REPO, run_module, subprocess_env

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def tiny_latent(**kw):
  args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
              num_classes=10, rngs=nnx.Rngs(0))
  args.update(kw)
  return latent.LatentDiffiT(**args)


def tiny_image(**kw):
  args = dict(image_size=16, in_channels=3, out_channels=3, channels=(16, 32), num_blocks=(1, 1),
              window_size=4, time_dim=32, frequency_size=16, head_dim=8, num_groups=4,
              rngs=nnx.Rngs(0))
  args.update(kw)
  return models.ImageDiffiT(**args)


def jitted(model):
  """The model's forward as one compiled function (eager NNX calls compile op by op)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x, t, y, rng: nnx.merge(graphdef, state)(x, t, y, rng=rng))
  return lambda x, t, y=None, rng=None: forward(state, x, t, y, rng)


def randomize(model, seed=1, scale=0.05):
  """Replaces every parameter by noise so zero-initialised layers cannot hide bugs."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)  # NumPy: no per-shape compilation
  leaves = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


# ---------------------------------------------------------------------------- NumPy oracles


def test_timestep_embedding_matches_numpy():
  t = np.array([0, 1, 17.5, 999], np.float32)
  dim = 256
  half = dim // 2
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  got = embeddings.timestep_embedding(jnp.asarray(t), dim)
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4)  # float32 args up to ~1e3


def test_sincos_pos_embed_matches_formula():
  dim, grid = 16, 3
  q = dim // 4
  omega = 10000.0 ** (-np.arange(q) / q)
  got = embeddings.sincos_pos_embed_2d(dim, grid)
  for r in range(grid):
    for c in range(grid):
      expected = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega),
                                 np.cos(r * omega)])
      np.testing.assert_allclose(got[r * grid + c], expected, atol=1e-6)


def test_relative_position_index_matches_formula():
  w = 3
  got = tmsa.relative_position_index(w)
  assert got.shape == (w * w, w * w)
  for m in range(w * w):
    for n in range(w * w):
      (r1, c1), (r2, c2) = divmod(m, w), divmod(n, w)
      assert got[m, n] == (r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1)
  assert got.min() == 0 and got.max() == (2 * w - 1) ** 2 - 1


def test_unpatchify_matches_loop():
  b, h, p, c = 2, 3, 2, 5
  x = np.random.default_rng(0).normal(size=(b, h * h, p * p * c)).astype(np.float32)
  expected = np.zeros((b, h * p, h * p, c), np.float32)
  for i in range(h):
    for j in range(h):
      expected[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = x[:, i * h + j].reshape(b, p, p, c)
  np.testing.assert_array_equal(np.asarray(latent.unpatchify(jnp.asarray(x), p, c)), expected)


def test_window_partition_and_merge_are_inverses():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  windows = tmsa.window_partition(x, 4)
  assert windows.shape == (2, 6, 16, 3)
  np.testing.assert_array_equal(windows[0, 1].reshape(4, 4, 3), x[0, 0:4, 4:8])  # row-major
  np.testing.assert_array_equal(tmsa.window_merge(windows, 8, 12), x)
  with pytest.raises(ValueError, match="cannot be split"):
    tmsa.window_partition(x, 5)


# ---------------------------------------------------------------------------- TMSA


def numpy_tmsa(attn, x, c):
  """Global TMSA written independently in NumPy from Eqs. 3-6."""
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(attn, nnx.Param)))
  b, h, w, dim = x.shape
  heads = attn.num_heads
  hd = dim // heads
  tokens = np.asarray(x).reshape(b, h * w, dim)
  qkv = tokens @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  qkv = qkv + (np.asarray(c) @ p["qkv_temb"]["kernel"] + p["qkv_temb"]["bias"])[:, None]
  qkv = qkv.reshape(b, h * w, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
  q, k, v = qkv
  index = tmsa.relative_position_index(h)
  bias = p["relative_position_bias_table"][index].transpose(2, 0, 1)  # (heads, N, N)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, h * w, dim)
  out = out @ p["proj"]["kernel"] + p["proj"]["bias"]
  return out.reshape(b, h, w, dim)


@pytest.mark.parametrize("implementation", ["einsum", "xla"])
def test_tmsa_global_window_matches_numpy_attention(implementation):
  attn = tmsa.TMSA(16, 4, time_dim=8, window_size=4, attention=implementation, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
  c = jax.random.normal(jax.random.key(2), (2, 8))
  np.testing.assert_allclose(np.asarray(attn(x, c)), numpy_tmsa(attn, x, c), rtol=1e-5, atol=1e-5)


def test_tmsa_windows_attend_only_within_themselves():
  attn = tmsa.TMSA(16, 2, time_dim=8, window_size=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 16))
  c = jax.random.normal(jax.random.key(2), (1, 8))
  out = attn(x, c)
  x2 = x.at[:, :4, :4].add(1.0)  # perturb the top-left window only
  out2 = attn(x2, c)
  changed = np.abs(np.asarray(out2 - out)).max(axis=-1)[0]  # (8, 8)
  assert changed[:4, :4].min() > 0
  np.testing.assert_array_equal(changed[4:, :], 0)
  np.testing.assert_array_equal(changed[:, 4:], 0)
  # Each window on its own equals global attention over that window.
  window = attn(x[:, 4:, 4:], c)
  np.testing.assert_allclose(np.asarray(out[:, 4:, 4:]), np.asarray(window), atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_implementations_agree_with_gradients(dtype, tol):
  """jax.nn.dot_product_attention ("xla") and the heads-major einsums: values and gradients."""
  def make(implementation):
    return randomize(tmsa.TMSA(16, 2, time_dim=8, window_size=4, attention=implementation,
                               dtype=dtype, rngs=nnx.Rngs(0)), scale=0.3)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))  # four 4x4 windows per image
  c = jax.random.normal(jax.random.key(2), (2, 8))
  def loss_and_grads(attn):
    graphdef, params = nnx.split(attn, nnx.Param)
    def loss(params, x):
      out = nnx.merge(graphdef, params)(x, c).astype(jnp.float32)
      return jnp.sum(out * jnp.cos(out)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, jax.tree.leaves(grads)
  out_e, grads_e = loss_and_grads(make("einsum"))
  out_x, grads_x = loss_and_grads(make("xla"))
  np.testing.assert_allclose(np.asarray(out_x), np.asarray(out_e), rtol=tol, atol=tol)
  assert len(grads_e) == 8  # 3 linears x (kernel, bias), the bias table, and the input
  for ge, gx in zip(grads_e, grads_x):
    scale = float(jnp.abs(ge.astype(jnp.float32)).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(gx, np.float32) / scale, np.asarray(ge, np.float32) / scale,
                               atol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_einsum_attention_backward_matches_autodiff(dtype, tol):
  """The hand-written attention backward against autodiff of the plain formula."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 16, 8)), dtype) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((1, 2, 16, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 2, 16, 8)), jnp.float32)
  def plain(q, k, v, bias):
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / np.sqrt(8) + bias, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)
  ours = lambda q, k, v, bias: cpu_kernels.einsum_attention(q, k, v, bias, 8 ** -0.5)
  np.testing.assert_allclose(np.asarray(ours(q, k, v, bias), np.float32),
                             np.asarray(plain(q, k, v, bias), np.float32), atol=tol)
  loss = lambda fn: lambda *a: jnp.sum(w * fn(*a).astype(jnp.float32) ** 2)
  grads_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  grads_plain = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for name, a, b in zip("qkvb", grads_ours, grads_plain):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    scale = float(jnp.abs(b.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b, np.float32) / scale,
                               atol=tol, err_msg=name)


@pytest.mark.parametrize("k,n", [(16, 48), (48, 16)])
def test_dense_weight_gradient_matches_autodiff(k, n):
  """The Linear layers' CPU-friendly backward (both transpose choices) against autodiff."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 40, k)), jnp.float32)  # 80 rows: the custom path
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  dims = (((2,), (0,)), ((), ()))
  def loss(dot):
    return lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims)))
  ours = jax.jit(jax.value_and_grad(loss(cpu_kernels.dense_dot_general), argnums=(0, 1)))(x, w)
  plain = jax.jit(jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(float(ours[0]), float(plain[0]), rtol=1e-5)
  for a, b in zip(ours[1], plain[1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  # The custom backward is in the traced gradient (an optimization barrier guards the
  # transpose), so this test exercises it rather than autodiff.
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(cpu_kernels.dense_dot_general), argnums=1))(x, w))
  assert "optimization_barrier" in jaxpr


def test_remat_saves_memory_and_needs_scanned_blocks():
  """XLA's memory analysis of a gradient: rematerialised blocks keep fewer activations."""
  def temp_bytes(**kw):
    model = tiny_latent(input_size=16, depth=4, **kw)
    graphdef, params = nnx.split(model)
    x = jnp.zeros((8, 16, 16, 4))
    t, y = jnp.zeros((8,), jnp.int32), jnp.zeros((8,), jnp.int32)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp_bytes(remat=True) < 0.7 * temp_bytes(remat=False)
  with pytest.raises(ValueError, match="scan_blocks=True"):
    tiny_latent(remat=True, scan_blocks=False)
  with pytest.raises(ValueError, match="scan_unroll"):
    tiny_latent(scan_unroll=True)


def test_attention_choice_is_checked():
  backend = jax.default_backend()
  assert tmsa.resolve_attention("auto") == ("einsum" if backend == "cpu" else "xla")
  if backend != "gpu":  # cuDNN only where an NVIDIA GPU is present
    assert tmsa.resolve_attention("auto", jnp.bfloat16) == ("einsum" if backend == "cpu" else "xla")
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    tmsa.resolve_attention("flash")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      tiny_latent(attention="cudnn")


def test_tmsa_time_token_changes_output():
  attn = tmsa.TMSA(16, 2, time_dim=8, window_size=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 4, 4, 16))
  c = jax.random.normal(jax.random.key(2), (1, 8))
  assert float(jnp.abs(attn(x, c) - attn(x, c + 1.0)).max()) > 1e-3


def test_block_is_pre_norm_with_affine_free_layernorm():
  block = tmsa.DiffiTBlock(16, 2, time_dim=8, window_size=4, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
  assert set(params) == {"attn", "mlp"}  # the LayerNorms own no parameters
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
  c = jax.random.normal(jax.random.key(2), (2, 8))
  def ln(v):
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)
  h = np.asarray(x) + np.asarray(block.attn(jnp.asarray(ln(np.asarray(x))), c))
  m = block.mlp
  u = ln(h) @ np.asarray(m.fc1.kernel[...]) + np.asarray(m.fc1.bias[...])
  gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  expected = h + gelu @ np.asarray(m.fc2.kernel[...]) + np.asarray(m.fc2.bias[...])
  np.testing.assert_allclose(np.asarray(block(x, c)), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- networks


@pytest.mark.parametrize("learn_sigma,num_classes", [(True, 10), (False, 0)])
def test_latent_shapes_and_zero_head(learn_sigma, num_classes):
  model = tiny_latent(learn_sigma=learn_sigma, num_classes=num_classes)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
  t = jnp.array([0, 500, 999])
  y = jnp.array([1, 2, 10]) if num_classes else None
  out = jitted(model)(x, t, y)
  assert out.shape == (3, 8, 8, 8 if learn_sigma else 4) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0)  # zero-initialised final layer
  out = jitted(randomize(model))(x, t, y)
  assert float(jnp.abs(out).min()) >= 0 and float(jnp.abs(out).max()) > 0
  with pytest.raises(ValueError, match="labels"):
    jitted(model)(x, t, None if num_classes else jnp.array([0, 0, 0]))


def test_latent_labels_and_timesteps_matter_and_bf16():
  model = randomize(tiny_latent())
  forward = jitted(model)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  base = forward(x, jnp.array([10, 10]), jnp.array([1, 1]))
  assert float(jnp.abs(base - forward(x, jnp.array([11, 11]), jnp.array([1, 1]))).max()) > 1e-4
  assert float(jnp.abs(base - forward(x, jnp.array([10, 10]), jnp.array([10, 10]))).max()) > 1e-4
  bf16 = tiny_latent(dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(model, nnx.Param))
  out = jitted(bf16)(x, jnp.array([10, 10]), jnp.array([1, 1]))
  assert out.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(base), atol=0.1)


def test_latent_windowed_patch4_and_remat_grad():
  model = randomize(tiny_latent(input_size=16, patch_size=4, window_size=2, remat=True))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  t, y = jnp.array([3, 4]), jnp.array([0, 1])
  graphdef, params = nnx.split(model)
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, y) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  norms = jax.tree.leaves(jax.tree.map(lambda g: jnp.abs(g).max(), grads))
  assert all(np.isfinite(float(n)) for n in norms) and max(float(n) for n in norms) > 0


@pytest.mark.parametrize("remat", [False, True])
def test_latent_scan_matches_unrolled(remat):
  model = randomize(tiny_latent(remat=remat))
  unrolled = tiny_latent(scan_blocks=False)
  nnx.update(unrolled, nnx.state(model, nnx.Param))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t, y = jnp.array([3, 4]), jnp.array([0, 1])
  np.testing.assert_allclose(np.asarray(jitted(model)(x, t, y)), np.asarray(jitted(unrolled)(x, t, y)),
                             atol=1e-5)
  # The unrolled stack is a Python loop over per-block slices: its gradient must land in
  # the same stacked parameters.
  grads = []
  for m in (model, unrolled):
    graphdef, params = nnx.split(m)
    grads.append(jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_image_shapes_zero_head_dropout_and_labels():
  model = tiny_image(num_classes=5, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  t, y = jnp.array([-1.0, 0.5]), jnp.array([0, 5])
  out = jitted(model)(x, t, y)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0)
  forward = jitted(randomize(model))
  det = forward(x, t, y)
  np.testing.assert_array_equal(np.asarray(det), np.asarray(forward(x, t, y)))  # no rng: no dropout
  dropped = forward(x, t, y, rng=jax.random.key(3))
  assert float(jnp.abs(dropped - det).max()) > 1e-4
  assert float(jnp.abs(det - forward(x, t, jnp.array([1, 5]))).max()) > 1e-4


def test_image_resblock_is_residual_with_projection():
  block = models.DiffiTResBlock(8, 16, time_dim=4, num_heads=2, window_size=4, num_groups=4,
                                mlp_ratio=4.0, dropout_rate=0.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
  c = jax.random.normal(jax.random.key(1), (1, 4))
  @nnx.jit
  def both(block, x, c):
    h = block.conv(nnx.silu(block.norm(x)))
    return block(x, c), block.block(h, c) + block.skip(x)
  got, expected = both(block, x, c)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
  assert models.DiffiTResBlock(8, 8, time_dim=4, num_heads=2, window_size=4, num_groups=4,
                               mlp_ratio=4.0, dropout_rate=0.0, rngs=nnx.Rngs(0)).skip is None


def test_image_skip_connections_carry_fine_detail():
  """A perturbation in one corner reaches the output through the skips at full resolution."""
  model = randomize(tiny_image(channels=(16, 32, 32), num_blocks=(1, 1, 1)))
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  t = jnp.array([0.3])
  forward = jitted(model)
  delta = forward(x.at[:, 0, 0].add(1.0), t) - forward(x, t)
  assert float(jnp.abs(delta[:, :2, :2]).max()) > 1e-3


# ---------------------------------------------------------------------------- configs and counts


def analytic_latent_params(depth, d, heads, p, c_in, input_size, num_classes, learn_sigma=True):
  w = input_size // p
  block = 2 * (d * 3 * d + 3 * d) + (d * d + d) + (2 * w - 1) ** 2 * heads + 2 * 4 * d * d + 5 * d
  c_out = 2 * c_in if learn_sigma else c_in
  embed = (c_in * p * p * d + d) + (256 * d + d + d * d + d) + (num_classes + 1) * d
  final = d * p * p * c_out + p * p * c_out
  return depth * block + embed + final


@pytest.mark.parametrize("variant", ["S/2", "B/2", "L/2", "XL/2", "XL/4", "B/8"])
def test_latent_param_counts_match_analytic(variant):
  cfg = load_config(os.path.join(REPO, "configs", "imagenet256_latent.py"))
  cfg.model.variant = variant
  model = nnx.eval_shape(lambda: models.build_model(cfg.model, rngs=nnx.Rngs(0)))
  v = latent.latent_variant(variant)
  assert models.count_params(model) == analytic_latent_params(
      v["depth"], v["hidden_size"], v["num_heads"], v["patch_size"], 4, 32, 1000)


def test_exact_official_param_counts():
  for name, expected in [("imagenet256_latent.py", 561_035_232), ("imagenet512_latent.py", 562_382_816)]:
    cfg = load_config(os.path.join(REPO, "configs", name))
    model = nnx.eval_shape(lambda: models.build_model(cfg.model, rngs=nnx.Rngs(0)))
    assert models.count_params(model) == expected


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_loads_and_builds(path):
  cfg = load_config(path)
  assert cfg.model.name in ("latent", "image")
  config_lib.fill_from_data(cfg, (32, 32, 3), num_classes=10)  # what it leaves to the data
  model = nnx.eval_shape(lambda: models.build_model(cfg.model, rngs=nnx.Rngs(0)))
  assert models.count_params(model) > 0
  local = load_config(path + ":runlocal")  # the laptop variant builds for real and runs
  config_lib.fill_from_data(local, (32, 32, 3), num_classes=10)
  model = models.build_model(local.model, rngs=nnx.Rngs(0))
  x = jnp.zeros(models.input_shape(local.model, 2))
  y = jnp.zeros((2,), jnp.int32) if local.model.get("num_classes", 0) else None
  assert jitted(model)(x, jnp.ones((2,)), y).shape[:3] == x.shape[:3]


def test_unknown_variant_and_model_name_errors():
  with pytest.raises(ValueError, match="unknown latent DiffiT variant"):
    latent.latent_variant("XXL/2")
  cfg = load_config(os.path.join(REPO, "configs", "cifar10.py"))
  cfg.model.name = "unet"
  with pytest.raises(ValueError, match="use 'latent' or 'image'"):
    models.model_kwargs(cfg.model)


def test_dry_run_cli_prints_exact_count():
  out = run_module("diffit_jax.main", "--config=configs/imagenet256_latent.py", "--dry_run",
                   "--nodry_run_memory", check=True).stdout
  assert "trainable_params: 561035232" in out
  gflops = float(out.split("gflops_per_forward:")[1].split()[0])
  assert 230 < gflops < 245  # 28 blocks ~ 118.4 GMACs (docs/paper_notes.md) = ~237 GFLOPs


def test_dry_run_estimates_memory_per_device_over_a_virtual_mesh():
  """`--dry_run_devices=8`: FSDP shards the state, and the batch is split 8 ways."""
  def start(*overrides):  # the two dry runs share the CPU instead of waiting in line
    return subprocess.Popen(
        [sys.executable, "-m", "diffit_jax.main", "--config=configs/mnist_demo.py",
         "--dry_run", "--dry_run_devices=8", "--config.batch_size=16",
         "--config.mesh.fsdp_min_size=1024", *overrides], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def estimate(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    line = out.split("train_step_memory_per_device:")[1].splitlines()
    assert "over mesh" in line[1] and "8 virtual CPU devices" in line[1], line
    fields = line[0].split()
    return float(fields[0]), float(fields[6])  # total GiB, state and batch GiB

  replicated, sharded = start(), start("--config.mesh.fsdp=8", "--config.mesh.data=-1")
  total, state = estimate(replicated)
  fsdp_total, fsdp_state = estimate(sharded)
  # Weights, EMA and Adam moments: 4 copies of the parameters, replicated on every device.
  params = 4 * 4 * models.count_params(nnx.eval_shape(lambda: models.build_model(
      load_config(os.path.join(REPO, "configs", "mnist_demo.py")).model,
      rngs=nnx.Rngs(0)))) / 2 ** 30
  assert state >= 0.99 * params  # (printed to 3 decimals)
  assert fsdp_state < 0.5 * state and fsdp_total < total
