"""Time-dependent multi-head self-attention (TMSA) and the DiffiT transformer block.

TMSA (paper Eqs. 3-6): every token's queries, keys and values are the sum of a
spatial projection of the token and a temporal projection of the time token,

    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt,

followed by softmax(q k^T / sqrt(d) + B) v with B a learned Swin-style relative
position bias (one table per block, one column per head). Attention runs inside
non-overlapping windows of the 2-D token grid (paper §3.2 "Local Attention"; no
shift); a window as large as the grid is global attention, which is what the
latent model uses. The block (Eqs. 7-8) is pre-norm with affine-free LayerNorms
(eps 1e-6), as in the official release.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffit_jax.models import cpu_kernels

LN_EPS = 1e-6


def relative_position_index(window_size: int) -> np.ndarray:
  """Swin relative position index for a `w x w` window (docs/official_checkpoint.md, step 4).

  For tokens m = (r1, c1), n = (r2, c2) in row-major order,
  index[m, n] = (r1 - r2 + w - 1) * (2w - 1) + (c1 - c2 + w - 1).

  Returns:
    (w*w, w*w) int32 NumPy array with values in [0, (2w-1)^2).
  """
  w = window_size
  rows, cols = np.meshgrid(np.arange(w), np.arange(w), indexing="ij")
  coords = np.stack([rows.reshape(-1), cols.reshape(-1)])  # (2, w*w)
  rel = coords[:, :, None] - coords[:, None, :] + (w - 1)  # (2, w*w, w*w)
  return (rel[0] * (2 * w - 1) + rel[1]).astype(np.int32)


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """Splits a token grid into non-overlapping windows.

  Args:
    x: (B, H, W, C) with H and W multiples of `window_size`.

  Returns:
    (B, num_windows, window_size**2, C), windows in row-major order.
  """
  b, h, w, c = x.shape
  ws = window_size
  if h % ws or w % ws:
    raise ValueError(f"a {h}x{w} token grid cannot be split into {ws}x{ws} windows; "
                     "choose a window size that divides the grid.")
  x = x.reshape(b, h // ws, ws, w // ws, ws, c)  # (B, nH, ws, nW, ws, C)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, nH, nW, ws, ws, C)
  return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)  # (B, nWin, ws*ws, C)


def window_merge(x: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: (B, num_windows, ws*ws, C) -> (B, H, W, C)."""
  b, _, t, c = x.shape
  ws = int(round(t ** 0.5))
  x = x.reshape(b, height // ws, width // ws, ws, ws, c)  # (B, nH, nW, ws, ws, C)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, nH, ws, nW, ws, C)
  return x.reshape(b, height, width, c)  # (B, H, W, C)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `rng` is None (inference) or `rate` is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# How Eq. 6 is computed (`config.model.attention`); every choice is the same math.
#   "einsum"  `cpu_kernels.einsum_attention`: two heads-major einsums, float32 logits and
#             softmax, and a backward laid out for XLA:CPU; the Linear layers then use
#             `cpu_kernels.dense_dot_general` too. With heads-major operands both products are
#             plain batched matmuls; in jax.nn.dot_product_attention's (B, T, heads, hd)
#             layout XLA:CPU runs them several times slower and a latent training step
#             9-12% slower.
#   "xla"     jax.nn.dot_product_attention, XLA's implementation (float32 logits and softmax).
#   "cudnn"   jax.nn.dot_product_attention on cuDNN's fused kernel: NVIDIA GPUs with
#             bfloat16 compute (`config.model.dtype`); float32 accumulation inside.
#   "auto"    "einsum" on CPU; "cudnn" on NVIDIA GPUs of compute capability >= 8.0
#             (Ampere and newer) with 16-bit compute, where it made the XL/2 bf16 train
#             step 16% faster than "xla" on an H200 (experiments/results/); else "xla"
#             (TPUs: XLA's attention, which every TPU plan in experiments/results/ uses).
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def _cudnn_attention_available() -> bool:
  """cuDNN's fused attention runs on every local device (NVIDIA, compute capability >= 8)."""
  try:
    return all(float(d.compute_capability) >= 8.0 for d in jax.local_devices())
  except (AttributeError, TypeError, ValueError):  # not a CUDA device
    return False


def resolve_attention(implementation: str, dtype=jnp.float32, platform: str | None = None) -> str:
  """Maps `config.model.attention` to the implementation used on a platform and dtype.

  `platform` ("cpu", "gpu", "tpu") is where the program will run: by default JAX's default
  backend; a TPU plan compiled on a CPU machine (`diffit_jax.plan`) names "tpu".
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={implementation!r}; use one of "
                     f"{list(ATTENTION_IMPLEMENTATIONS)}.")
  backend = platform or jax.default_backend()
  if implementation == "auto":
    if backend == "cpu":
      return "einsum"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend == "gpu" and half and _cudnn_attention_available() else "xla"
  if implementation == "cudnn" and backend != "gpu":
    raise ValueError(f"config.model.attention='cudnn' needs an NVIDIA GPU, and this run's "
                     f"backend is {backend!r}; use 'auto'.")
  return implementation


@jax.named_scope("attention")  # the accelerator check's profile attributes Eq. 6 by it
def attention(qkv: jax.Array, bias: jax.Array, implementation: str) -> jax.Array:
  """Eq. 6, softmax(q k^T / sqrt(d) + B) v, per window and head.

  Args:
    qkv: (N, T, 3, heads, hd) packed queries, keys and values of N windows.
    bias: (heads, T, T) relative position bias, shared by every window.
    implementation: "einsum", "xla" or "cudnn" (see `resolve_attention`).

  Returns:
    (N, T, heads, hd) in the dtype of `qkv`.
  """
  head_dim = qkv.shape[-1]
  if implementation == "einsum":
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (N, heads, T, hd)
    out = cpu_kernels.einsum_attention(q, k, v, bias[None], head_dim ** -0.5)  # (N, heads, T, hd)
    return out.transpose(0, 2, 1, 3)  # (N, T, heads, hd)
  q, k, v = (qkv[:, :, i] for i in range(3))  # each (N, T, heads, hd)
  bias = bias[None]  # (1, heads, T, T): broadcast over windows
  if implementation == "cudnn":
    bias = bias.astype(qkv.dtype)  # cuDNN takes the bias in the compute dtype
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


def _linear(in_features, out_features, *, attention: str, dtype, rngs):
  # Official init for every Linear: xavier-uniform weight, zero bias. With the XLA:CPU
  # attention ("einsum") the weight gradients are laid out for XLA:CPU too.
  dot_general = cpu_kernels.dense_dot_general if attention == "einsum" else jax.lax.dot_general
  return nnx.Linear(in_features, out_features, kernel_init=nnx.initializers.xavier_uniform(),
                    bias_init=nnx.initializers.zeros, dot_general=dot_general, dtype=dtype,
                    rngs=rngs)


class TMSA(nnx.Module):
  """Time-dependent multi-head self-attention in windows (Eqs. 3-6).

  Parameter names follow the official release: `qkv` (spatial), `qkv_temb`
  (temporal), `proj`, `relative_position_bias_table` ((2w-1)^2, heads). `attention`
  picks the implementation of Eq. 6 (`ATTENTION_IMPLEMENTATIONS`).
  """

  def __init__(self, dim: int, num_heads: int, *, time_dim: int, window_size: int,
               attention: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads.")
    self.num_heads = num_heads
    self.window_size = window_size
    self.attention = resolve_attention(attention, dtype)
    linear = partial(_linear, attention=self.attention, dtype=dtype, rngs=rngs)
    self.qkv = linear(dim, 3 * dim)
    self.qkv_temb = linear(time_dim, 3 * dim)
    self.proj = linear(dim, dim)
    # Official init: trunc_normal(std=0.02).
    self.relative_position_bias_table = nnx.Param(nnx.initializers.truncated_normal(0.02)(
        rngs.params(), ((2 * window_size - 1) ** 2, num_heads), jnp.float32))

  def relative_position_bias(self) -> jax.Array:
    """B of Eq. 6 for one window: (heads, w*w, w*w)."""
    index = relative_position_index(self.window_size)  # (T, T), a compile-time constant
    bias = self.relative_position_bias_table[...][index.reshape(-1)]  # (T*T, heads)
    t = index.shape[0]
    return bias.reshape(t, t, self.num_heads).transpose(2, 0, 1)  # (heads, T, T)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Args: x: (B, H, W, C) normalised tokens on their grid; c: (B, Dt) time token."""
    b, h, w, dim = x.shape
    heads, head_dim = self.num_heads, dim // self.num_heads
    windows = window_partition(x, self.window_size)  # (B, nWin, T, C)
    _, n_win, t, _ = windows.shape
    # Eqs. 3-5: spatial projection + temporal projection broadcast over all tokens.
    qkv = self.qkv(windows) + self.qkv_temb(c)[:, None, None, :]  # (B, nWin, T, 3C)
    qkv = qkv.reshape(b * n_win, t, 3, heads, head_dim)  # (B*nWin, T, 3, heads, hd)
    out = attention(qkv, self.relative_position_bias(), self.attention)  # (B*nWin, T, heads, hd)
    out = out.reshape(b, n_win, t, dim)  # (B, nWin, T, C)
    out = self.proj(out)  # (B, nWin, T, C)
    return window_merge(out, h, w)  # (B, H, W, C)


class Mlp(nnx.Module):
  """Linear -> GELU(tanh) -> Linear (timm `Mlp`, names `fc1`/`fc2` as in the release)."""

  def __init__(self, dim: int, hidden_dim: int, *, dropout_rate: float = 0.0,
               attention: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    linear = partial(_linear, attention=resolve_attention(attention, dtype), dtype=dtype,
                     rngs=rngs)
    self.fc1 = linear(dim, hidden_dim)
    self.fc2 = linear(hidden_dim, dim)
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    h = nnx.gelu(self.fc1(x), approximate=True)
    return self.fc2(dropout(h, self.dropout_rate, rng))


class DiffiTBlock(nnx.Module):
  """x = x + TMSA(LN(x), x_t); x = x + MLP(LN(x))  (Eqs. 7-8, affine-free LN, eps 1e-6)."""

  def __init__(self, dim: int, num_heads: int, *, time_dim: int, window_size: int,
               mlp_ratio: float = 4.0, dropout_rate: float = 0.0, attention: str = "auto",
               dtype=jnp.float32, rngs: nnx.Rngs):
    norm = partial(nnx.LayerNorm, dim, epsilon=LN_EPS, use_scale=False, use_bias=False,
                   dtype=dtype, rngs=rngs)
    self.norm1 = norm()
    self.attn = TMSA(dim, num_heads, time_dim=time_dim, window_size=window_size,
                     attention=attention, dtype=dtype, rngs=rngs)
    self.norm2 = norm()
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout_rate=dropout_rate, attention=attention,
                   dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Args: x: (B, H, W, C) token grid; c: (B, Dt) time token; rng: dropout key or None."""
    x = x + self.attn(self.norm1(x), c)
    return x + self.mlp(self.norm2(x), rng)
