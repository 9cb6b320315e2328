"""An independent PyTorch implementation of the official latent DiffiT, for parity tests.

This file owns a reference written only from `docs/official_checkpoint.md` (the
official state-dict layout and forward math of NVIDIA's latent DiffiT release), not from
diffit_jax's JAX code: module and parameter names are the official ones, so
`LatentDiffiT(...).state_dict()` has exactly the official keys (including the `pos_embed`
and `relative_position_index` buffers) and `load_state_dict(official, strict=True)` works.
Activations are NCHW as in PyTorch. The window size of the time-dependent self-attention
(TMSA, DiffiT Eqs. 3-6) is the whole token grid by default (the released models); a smaller
window attends inside non-overlapping Swin-style windows (partition, attend with the
window's relative position bias, merge), as the paper's image-space model does.

`forward_with_cfg` is the official classifier-free-guided forward: the batch is
[conditional half; unconditional half], the guided eps replaces channels 0..2 of both
halves, and the scale is constant or the power-cosine schedule (MDT) of DiffiT-256.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LN_EPS = 1e-6
FREQUENCY_EMBEDDING_SIZE = 256


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """The fixed 2-D sin-cos position embedding (MAE convention, column first).

  Token m = r * grid + c gets [sin(c w), cos(c w), sin(r w), cos(r w)] with
  w_j = 10000^(-j / (dim / 4)), j = 0 .. dim/4 - 1.

  Returns:
    (grid * grid, dim) float32.
  """
  quarter = dim // 4
  omega = np.power(10000.0, -np.arange(quarter, dtype=np.float64) / quarter)  # (dim/4,)
  m = np.arange(grid * grid)
  r, c = m // grid, m % grid  # row-major token order
  col = c[:, None] * omega[None]  # (N, dim/4)
  row = r[:, None] * omega[None]  # (N, dim/4)
  return np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)],
                        axis=1).astype(np.float32)  # (N, dim)


def swin_relative_position_index(w: int) -> torch.Tensor:
  """index[m, n] = (r1 - r2 + w - 1) * (2w - 1) + (c1 - c2 + w - 1), a (w*w, w*w) int64 table."""
  m = torch.arange(w * w)
  r, c = m // w, m % w  # row-major positions in the window
  dr = r[:, None] - r[None, :] + w - 1  # (w*w, w*w)
  dc = c[:, None] - c[None, :] + w - 1  # (w*w, w*w)
  return dr * (2 * w - 1) + dc


class PatchEmbed(nn.Module):
  """Conv2d(k=p, s=p) patchify: (B, C, H, W) -> (B, N, D), tokens row-major."""

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.proj(x)  # (B, D, h, w)
    return x.flatten(2).transpose(1, 2)  # (B, h*w, D)


class TimestepEmbedder(nn.Module):
  """[cos, sin] sinusoid of t (256 wide) -> Linear -> SiLU -> Linear."""

  def __init__(self, hidden_size: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))

  @staticmethod
  def sinusoid(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                                device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    return self.mlp(self.sinusoid(t))  # (B, D)


class LabelEmbedder(nn.Module):
  """Label table with one extra row (index num_classes) for the null class."""

  def __init__(self, num_classes: int, hidden_size: int):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

  def forward(self, y: torch.Tensor) -> torch.Tensor:
    return self.embedding_table(y)  # (B, D)


class Attention(nn.Module):
  """TMSA: q, k, v of every token are its spatial projection plus the time token's projection.

  Attention runs inside non-overlapping `window x window` windows of the `grid x grid` token
  grid with a Swin relative position bias; window == grid is global attention.
  """

  def __init__(self, dim: int, num_heads: int, grid: int, window: int):
    super().__init__()
    assert dim % num_heads == 0 and grid % window == 0
    self.num_heads, self.grid, self.window = num_heads, grid, window
    self.head_dim = dim // num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.qkv_temb = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.relative_position_bias_table = nn.Parameter(
        torch.zeros((2 * window - 1) ** 2, num_heads))
    nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
    self.register_buffer("relative_position_index", swin_relative_position_index(window))

  def _partition(self, x: torch.Tensor) -> torch.Tensor:
    b, _, d = x.shape
    g, w = self.grid, self.window
    x = x.reshape(b, g // w, w, g // w, w, d)  # (B, nH, w, nW, w, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, w, w, D)
    return x.reshape(b * (g // w) ** 2, w * w, d)  # (B*nWin, T, D)

  def _merge(self, x: torch.Tensor, batch: int) -> torch.Tensor:
    d = x.shape[-1]
    g, w = self.grid, self.window
    x = x.reshape(batch, g // w, g // w, w, w, d)  # (B, nH, nW, w, w, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, nH, w, nW, w, D)
    return x.reshape(batch, g * g, d)  # (B, N, D)

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) normalised tokens, row-major over the grid; c: (B, D) time token."""
    b = x.shape[0]
    windows = self._partition(x)  # (B*nWin, T, D)
    n_win = windows.shape[0] // b
    temb = self.qkv_temb(c).repeat_interleave(n_win, dim=0)  # (B*nWin, 3D), window-major per sample
    qkv = self.qkv(windows) + temb[:, None, :]  # (B*nWin, T, 3D)
    bw, t, _ = qkv.shape
    qkv = qkv.reshape(bw, t, 3, self.num_heads, self.head_dim)  # (B*nWin, T, 3, heads, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B*nWin, heads, T, hd)
    bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
    bias = bias.reshape(t, t, self.num_heads).permute(2, 0, 1)  # (heads, T, T)
    attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + bias[None]  # (B*nWin, heads, T, T)
    out = attn.softmax(dim=-1) @ v  # (B*nWin, heads, T, hd)
    out = out.transpose(1, 2).reshape(bw, t, -1)  # (B*nWin, T, D)
    return self.proj(self._merge(out, b))  # (B, N, D)


class Mlp(nn.Module):
  """fc1 -> GELU(tanh) -> fc2."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class DiffiTBlock(nn.Module):
  """x = x + attn(LN(x), c); x = x + mlp(LN(x)); LayerNorms without parameters."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid: int, window: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=False)
    self.attn = Attention(dim, num_heads, grid, window)
    self.norm2 = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=False)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x), c)
    return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
  """Linear(SiLU(LN(x)))."""

  def __init__(self, dim: int, out_features: int):
    super().__init__()
    self.norm_final = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=False)
    self.linear = nn.Linear(dim, out_features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.linear(F.silu(self.norm_final(x)))


class LatentDiffiT(nn.Module):
  """The official latent DiffiT: (x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W).

  Args:
    input_size: latent side H = W.
    patch_size: patch side p.
    in_channels: latent channels C.
    hidden_size, depth, num_heads, mlp_ratio: the transformer.
    num_classes: classes; the label table has num_classes + 1 rows (the last is null).
      0 builds an unconditional model (no `y_embedder`).
    learn_sigma: C_out = 2C (eps, then variance interpolation) instead of C.
    window_size: TMSA window in tokens; None is the whole grid (the released models).
  """

  def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = True,
               window_size: int | None = None):
    super().__init__()
    self.patch_size, self.in_channels = patch_size, in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.num_classes = num_classes
    self.grid = input_size // patch_size
    window = window_size or self.grid
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.register_buffer("pos_embed", torch.from_numpy(
        sincos_pos_embed(hidden_size, self.grid))[None])  # (1, N, D)
    self.t_embedder = TimestepEmbedder(hidden_size)
    if num_classes > 0:
      self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    self.blocks = nn.ModuleList([DiffiTBlock(hidden_size, num_heads, mlp_ratio, self.grid, window)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)

  def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
    """(B, N, p*p*C_out) -> (B, C_out, H, W)."""
    b, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
    x = x.reshape(b, g, g, p, p, c)  # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(b, c, g * p, g * p)  # (B, C, H, W)

  def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
              ) -> torch.Tensor:
    h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
    c = self.t_embedder(t)  # (B, D)
    if self.num_classes > 0:
      c = c + self.y_embedder(y)
    for block in self.blocks:
      h = block(h, c)  # (B, N, D)
    return self.unpatchify(self.final_layer(h))  # (B, C_out, H, W)

  def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       cfg_scale: float, *, schedule: str = "power_cosine",
                       scale_pow: float = 4.0, diffusion_steps: int = 1000,
                       guided_channels: int = 3) -> torch.Tensor:
    """The official guided forward over a [cond; uncond] batch.

    Args:
      x: (2B, C, H, W); only the first half is used (both halves see the same input).
      t: (2B,) original timestep indices.
      y: (2B,) labels: the class labels, then the null class.
      cfg_scale: the guidance scale w.
      schedule: "power_cosine" (w_t = 1 + (w - 1) (1 - cos(pi (1 - t/T)^pow)) / 2, 256 px)
        or "constant" (512 px).
      scale_pow, diffusion_steps: pow and T of the power-cosine schedule.
      guided_channels: eps channels that are guided (3 in the release).

    Returns:
      (2B, C_out, H, W): channels < guided_channels hold the guided eps in both halves;
      the other channels keep each half's own prediction.
    """
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half], dim=0), t, y)  # (2B, C_out, H, W)
    eps, rest = out[:, :guided_channels], out[:, guided_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    if schedule == "power_cosine":
      step = (1 - torch.cos(((1 - t.float() / diffusion_steps) ** scale_pow) * math.pi)) / 2
      scale = ((cfg_scale - 1) * step + 1)[: len(x) // 2].reshape(-1, 1, 1, 1)
    elif schedule == "constant":
      scale = cfg_scale
    else:
      raise ValueError(f"schedule={schedule!r}; use 'power_cosine' or 'constant'.")
    half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
