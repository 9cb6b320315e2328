"""The JAX side of the benchmark: the real train step and a jitted forward, ready to time.

The train step is `train.make_train_step` itself (ADM hybrid loss L_simple + L_vlb, label
dropout, AdamW, EMA; jitted, state donated) on `bench_model.random_weights`; its compile
time, XLA's memory plan and the peak memory of the first calls are recorded with it.
`xl_compile` lowers and compiles the XL/2 step from shapes alone, without allocating its
561 M-parameter state.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffit_jax import sharding, train
from diffit_jax.config_lib import load_config

from bench_common import PeakMemory, load_average, memory_analysis
from bench_model import CONFIG, model_config, random_weights


def jax_train_config(variant: str, args: argparse.Namespace) -> Any:
  """The ImageNet-256 latent training config at the benchmark's variant, batch and precision."""
  config = load_config(CONFIG)
  config.model = model_config(variant, input_size=args.input_size, precision=args.precision)
  config.model.remat = args.remat
  config.model.attention = args.attention
  if args.remat:
    config.model.scan_blocks = True  # rematerialisation needs scanned blocks
  if args.scan_unroll != "config":
    config.model.scan_blocks = args.scan_unroll != "all"
    if config.model.scan_blocks:
      config.model.scan_unroll = int(args.scan_unroll)
  config.batch_size = args.batch_size
  return config


def benchmark_mesh(args: argparse.Namespace) -> jax.sharding.Mesh:
  devices = jax.devices()
  n = len(devices) if args.num_devices <= 0 else args.num_devices
  return sharding.create_mesh(None, devices[:n])


def latent_shape(args: argparse.Namespace) -> tuple[int, int, int]:
  return (args.input_size, args.input_size, 4)


def jax_runners(variant: str, args: argparse.Namespace, mesh: jax.sharding.Mesh, *,
                with_forward: bool = True
                ) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
  """Compiles the real train step and a forward; returns runners and compile/memory facts."""
  config = jax_train_config(variant, args)
  b = args.batch_size
  info: dict[str, Any] = {}
  with PeakMemory() as mem:
    setup, state = train.create_train_state(config, mesh)
    params = random_weights(state.params)
    state = state._replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    step = train.make_train_step(config, setup, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batch = {"image": jax.device_put(rng.standard_normal((b,) + latent_shape(args), np.float32),
                                     batch_sharding),
             "label": jax.device_put(rng.integers(0, 1000, b).astype(np.int32), batch_sharding)}
    start = time.perf_counter()
    lowered = step.lower(setup.abstract_state, batch)
    lower_s = time.perf_counter() - start
    compiled_step = lowered.compile()
    info["train_compile_s"] = round(time.perf_counter() - start, 3)
    info["train_lower_s"] = round(lower_s, 3)
    info["train_xla_memory"] = memory_analysis(compiled_step)
    holder = {"state": state}

    def train_once():
      holder["state"], metrics = compiled_step(holder["state"], batch)  # the state is donated
      jax.block_until_ready((holder["state"], metrics))

    train_once()
    train_once()
  train_once.compiled = compiled_step  # for a profile: its HLO names the traced ops
  info["train_memory"] = mem.result
  info["params"] = int(sum(x.size for x in jax.tree.leaves(holder["state"].params)))
  if not with_forward:
    return {"jax_train": train_once}, info

  with PeakMemory() as mem:
    graphdef = setup.graphdef
    forward = jax.jit(lambda params, x, t, y: nnx.merge(graphdef, params)(x, t, y))
    t = jax.device_put(rng.integers(0, 1000, b).astype(np.int32), batch_sharding)
    args_ = (holder["state"].params, batch["image"], t, batch["label"])
    start = time.perf_counter()
    compiled_forward = forward.lower(*args_).compile()
    info["forward_compile_s"] = round(time.perf_counter() - start, 3)

    def forward_once():
      # The latest weights: the previous ones were donated to the train step.
      jax.block_until_ready(compiled_forward(holder["state"].params, *args_[1:]))

    forward_once()
  info["forward_memory"] = mem.result
  return {"jax_train": train_once, "jax_forward": forward_once}, info


def xl_compile(args: argparse.Namespace, mesh) -> dict:
  """Lower + compile the XL/2 train step from ShapeDtypeStructs (no state is allocated)."""
  config = jax_train_config("XL/2", args)
  config.model.input_size = 32
  start = time.perf_counter()
  setup, _ = train.create_train_state(config, mesh, initialize=False)
  step = train.make_train_step(config, setup, mesh)
  build_s = time.perf_counter() - start
  b = args.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, 32, 32, 4), jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
  start = time.perf_counter()
  lowered = step.lower(setup.abstract_state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  total = time.perf_counter() - start
  return dict(batch_size=b, precision=args.precision, build_s=round(build_s, 3),
              lower_s=round(lower_s, 3), compile_s=round(total, 3),
              xla_memory=memory_analysis(compiled), load_average=load_average())
