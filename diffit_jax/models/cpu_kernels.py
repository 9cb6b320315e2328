"""Kernels for XLA:CPU: the Linear layers' and attention's backward passes, laid out for it.

A gradient that contracts over the rows of both operands (a weight gradient x^T g, or
p^T g in attention) is a "transposed" matrix product: XLA:CPU either copies the larger
operand into a transposed layout or runs a slower kernel. Transposing the smaller
operand explicitly, behind an optimization barrier so that XLA cannot fold the transpose
back into the product, turns each one into a plain row-major matmul. Together with the
attention backward below this makes a latent DiffiT training step 10-20% faster on CPU;
the math is autodiff's (tests/test_models.py compares both with it).

TMSA uses these when `config.model.attention` resolves to "einsum" (the default on CPU;
see `tmsa.resolve_attention`); GPU and TPU runs never trace them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def materialized_transpose(x: jax.Array) -> jax.Array:
  """`x` with its last two axes swapped, as an array of its own (not a layout hint)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.dot(x, w)  # (..., K) @ (K, N) -> (..., N)


def _matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _matmul_bwd(residuals, g):
  x, w = residuals
  k, n = w.shape
  x2, g2 = x.reshape(-1, k), g.reshape(-1, n)  # (M, K), (M, N)
  dx = jnp.dot(g, w.T)  # (..., K): contracts over N, a plain product
  if k <= n:
    dw = jnp.dot(materialized_transpose(x2), g2)  # (K, M) @ (M, N)
  else:  # ((N, M) @ (M, K))^T; the barrier keeps XLA from folding the .T into the product
    dw = jax.lax.optimization_barrier(jnp.dot(materialized_transpose(g2), x2)).T
  return dx, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      **kwargs):
  """`nnx.Linear`'s dot_general with the CPU-friendly weight gradient (`_matmul`).

  Used for token-wise layers; anything else (a few rows such as the time token's
  projections, other contractions, explicit precision or sharding) is
  `jax.lax.dot_general` unchanged.
  """
  (lhs_contract, rhs_contract), batch_dims = dimension_numbers
  rows = lhs.size // max(lhs.shape[-1], 1)
  if (rhs.ndim == 2 and lhs_contract == (lhs.ndim - 1,)
      and rhs_contract == (0,) and batch_dims == ((), ()) and rows > 64 and precision is None
      and preferred_element_type is None and kwargs.get("out_sharding") is None
      and lhs.dtype == rhs.dtype):
    return _matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                     scale: float) -> jax.Array:
  """softmax(q k^T * scale + bias) v over heads-major (N, heads, T, hd) operands.

  `bias` is (1, heads, T, T), shared by all N windows. The logits and softmax are float32
  even under bfloat16 compute; the probabilities meet v in the compute dtype. The backward
  is autodiff's, with the two products that contract over queries (p^T g and ds^T q) run
  on materialised transposes and the bias gradient summed over windows with a
  matrix-vector product (XLA:CPU's reduce kernel for that sum is several times slower).
  """
  return _einsum_attention_fwd(q, k, v, bias, scale)[0]


def _einsum_attention_fwd(q, k, v, bias, scale):
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * scale + bias, axis=-1)  # (N, heads, T, T) float32
  return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v), (q, k, v, probs)


def _einsum_attention_bwd(scale, residuals, g):
  q, k, v, probs = residuals
  dv = jnp.einsum("bhkq,bhqd->bhkd", materialized_transpose(probs.astype(v.dtype)), g)
  dprobs = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=jnp.float32)
  dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))  # softmax VJP
  dbias = jnp.tensordot(jnp.ones((dlogits.shape[0],), dlogits.dtype), dlogits, axes=1)[None]
  dlogits = (dlogits * scale).astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", dlogits, k)
  dk = jnp.einsum("bhkq,bhqd->bhkd", materialized_transpose(dlogits), q)
  return dq, dk, dv, dbias


einsum_attention.defvjp(_einsum_attention_fwd, _einsum_attention_bwd)
