"""Speed of diffit_jax against the PyTorch reference, in one run on one machine.

What is measured, for the latent DiffiT at 256 px (32x32x4 SD latents), per variant:
  * train step: forward + backward + AdamW + EMA. JAX runs the real jitted, donated
    `train.make_train_step` (ADM hybrid loss L_simple + L_vlb, label dropout, EMA); the
    PyTorch reference (`tests/torch_reference.py`) runs the same loss (ported below), the
    same optimizer (`torch.optim.AdamW`, foreach) and the same EMA, eager and under
    `torch.compile` (failures are caught and recorded).
  * forward: images/s of one jitted forward (JAX) and of the reference in inference mode.
  * the ratio JAX / PyTorch of throughputs (> 1: JAX is faster).
  * model FLOPs utilisation: forward FLOPs (XLA's cost analysis of the unrolled forward,
    `models.forward_flops`, checked against an analytic matmul count in the tests) x 3 for a
    train step, divided by the step time, as a fraction of the measured throughput of a
    large matmul in the compute dtype, timed in the same rounds as the step.
  * compile time (lower + compile) of the train step and forward; peak memory (host RSS on
    CPU with the high-water mark reset per measurement, `memory_stats()` on GPU/TPU) and
    XLA's own memory analysis of the compiled step.
Then:
  * the sampler: seconds per image of 250-step DDPM with power-cosine guidance (the official
    ImageNet-256 recipe) and of 18-step EDM Heun (35 NFE; the EDM formulation run on the
    latent network, whose cost per call is the same), and the share of time outside the
    network, by `sampler_overhead.py`'s method: the compiled sampler vs the network alone
    run NFE times in one jitted loop, and vs the same sampler with a zero-cost network.
    On CPU fewer steps are run (flags) and the time is extrapolated linearly in NFE.
  * the XL/2 train step lowered and compiled abstractly (ShapeDtypeStruct inputs): compile
    time and XLA's memory estimate, without allocating the 561 M-parameter state.

Timings: both frameworks start from the same random N(0, 0.02^2) weights (the official
zero-initialised head would back-propagate exact zeros). PyTorch runs in a worker process
of its own (`TorchWorker`), so neither framework's allocations disturb the other's. Each
measured function is compiled and warmed up first; then `--repeats` rounds run every
function of a variant in turn, in this process or the worker's (so load from other
processes hits them alike); each reports the median over rounds
(min, max, CPU time and page faults per call are in the JSON) with the 1-minute load
average of every round. On Linux CPUs the run re-executes itself under `RETAIN_MALLOC`
(`--malloc default` to measure the stock allocator). Unchanged on a GPU or TPU
(accelerator defaults: batch 64, all of S/2, B/2, XL/2, full sampler step counts).

Run:
  .venv/bin/python experiments/benchmark.py                 # CPU defaults: ~7 min on 2 cores
  .venv/bin/python experiments/benchmark.py --no-torch_compile   # faster: no Inductor builds
  .venv/bin/python experiments/benchmark.py --quick         # smoke run, ~1 minute
  .venv/bin/python experiments/benchmark.py --precision bf16 --batch_size 32 --xl
Writes experiments/results/benchmark_<platform>.json and .md.

What each part measures lives in its own file: `bench_jax.py` (the JAX train step and
forward), `bench_torch.py` (the PyTorch reference), `bench_sampler.py` (the sampler),
`bench_model.py` (the network's configs and FLOPs), `bench_report.py` (targets and
tables) and `bench_common.py` (timing, memory and result files, shared with the other
experiments). This file holds the command line and one variant's interleaved rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from diffit_jax import models
from diffit_jax.models.tmsa import resolve_attention

from bench_common import (RESULTS_DIR, load_average, local_runners, machine_info, measure,
                          repo_relative, time_interleaved, write_results)
from bench_jax import benchmark_mesh, jax_runners, xl_compile
from bench_model import analytic_forward_flops, matmul_runner, model_config
from bench_report import markdown, targets
from bench_sampler import OFFICIAL_DDPM_STEPS, OFFICIAL_HEUN_STEPS, benchmark_sampler
from bench_torch import TorchWorker


# `--malloc retain`: glibc keeps freed memory for reuse instead of returning it to the kernel.
# XLA:CPU allocates one temporary buffer per execution (2 GiB for an S/2 train step at batch
# 8); glibc serves such large blocks with a fresh mmap, so every step page-faults and the
# kernel zeroes gigabytes (about 0.4 M faults and 1-9 s of system time per step here).
# No mmap, no trimming and one arena make the next step reuse the same pages. It must be set
# before the process starts, so the benchmark re-executes itself with it (both frameworks
# then run under the same allocator). The same setting speeds up CPU training.
RETAIN_MALLOC = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:"
                 "glibc.malloc.arena_max=1")

# Per-platform defaults; `--quick` shrinks them to a smoke run. Flags given explicitly win.
DEFAULTS = {
    "cpu": dict(variants="S/2,B/2", batch_size=8, repeats=9, sampler_repeats=25, iters=1,
                ddpm_steps=4, heun_steps=2, sampler_batch=2, sampler_variant="S/2",
                matmul_size=2048, torch_compile=True),
    "accelerator": dict(variants="S/2,B/2,XL/2", batch_size=64, repeats=5, sampler_repeats=5,
                        iters=5, ddpm_steps=OFFICIAL_DDPM_STEPS, heun_steps=OFFICIAL_HEUN_STEPS,
                        sampler_batch=64, sampler_variant="XL/2", matmul_size=8192,
                        torch_compile=True),
    "quick": dict(variants="S/2", batch_size=2, repeats=2, sampler_repeats=2, iters=1,
                  ddpm_steps=2, heun_steps=2,
                  sampler_batch=2, sampler_variant="S/2", matmul_size=1024,
                  torch_compile=False),
}


# ----------------------------------------------------------------------------------------
# One variant: every runner, interleaved.


def benchmark_variant(variant: str, args: argparse.Namespace, mesh,
                      worker: TorchWorker | None) -> dict:
  """Train step and forward of `variant` in JAX and PyTorch, timed in the same rounds."""
  config = model_config(variant, input_size=args.input_size, precision=args.precision)
  b = args.batch_size
  result: dict[str, Any] = dict(batch_size=b, load_average_start=load_average())
  xla_fwd = models.forward_flops(config, b) / b
  analytic = analytic_forward_flops(config)
  result.update(forward_flops_per_image=xla_fwd, analytic_forward_flops_per_image=analytic,
                flops_source="XLA cost analysis of the unrolled forward (models.forward_flops)",
                train_flops_per_image=3 * xla_fwd)
  print(f"[{variant}] compiling the JAX train step and forward ...", flush=True)
  jax_fns, result["jax"] = jax_runners(variant, args, mesh)
  result["params"] = result["jax"]["params"]
  runners = local_runners(jax_fns)
  modes = [False] + ([True] if args.torch_compile else []) if worker is not None else []
  for compile_model in modes:
    tag = "torch_compile" if compile_model else "torch_eager"
    print(f"[{variant}] preparing {tag} ...", flush=True)
    more, result[tag] = worker.runners(
        variant=variant, batch_size=b, input_size=args.input_size, precision=args.precision,
        compile_model=compile_model)
    runners.update(more)
  dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
  matmul, matmul_flops = matmul_runner(args.matmul_size, dtype)
  runners["matmul_peak"] = functools.partial(measure, matmul)
  print(f"[{variant}] timing {sorted(runners)}: {args.repeats} rounds x {args.iters} calls",
        flush=True)
  times, loads = time_interleaved(runners, args.repeats, args.iters)
  if worker is not None:
    worker.release()
  result["times"] = times
  result["load_average_per_round"] = loads
  result["load_average_end"] = load_average()

  peak = matmul_flops / times["matmul_peak"]["median_s"]
  result["matmul_peak_flops_per_s"] = peak
  result["matmul_peak_flops_per_s_best"] = matmul_flops / times["matmul_peak"]["min_s"]
  throughput, mfu = {}, {}
  for name, summary in times.items():
    if name == "matmul_peak":
      continue
    s = summary["median_s"]
    throughput[name] = b / s
    flops = (3 if name.endswith("_train") else 1) * xla_fwd * b
    mfu[name] = flops / s / peak
  result["images_per_s"] = throughput
  result["mfu"] = mfu
  ratios = {}
  for tag in ("torch_eager", "torch_compile"):
    for kind in ("train", "forward"):
      if f"{tag}_{kind}" in throughput:
        ratios[f"{kind}_vs_{tag}"] = throughput[f"jax_{kind}"] / throughput[f"{tag}_{kind}"]
  result["jax_over_torch"] = ratios
  # The same ratios from each runner's fastest round: the least disturbed by other load.
  result["jax_over_torch_best_round"] = {
      f"{kind}_vs_{tag}": times[f"{tag}_{kind}"]["min_s"] / times[f"jax_{kind}"]["min_s"]
      for tag in ("torch_eager", "torch_compile") for kind in ("train", "forward")
      if f"{tag}_{kind}" in times}
  print(f"[{variant}] img/s {json.dumps({k: round(v, 3) for k, v in throughput.items()})}"
        f" ratios {json.dumps({k: round(v, 3) for k, v in ratios.items()})}", flush=True)
  return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", help="comma-separated latent variants (S/2, B/2, XL/2, tiny)")
  p.add_argument("--xl", action="store_true", help="also time XL/2 (needs ~25 GiB at batch 8)")
  p.add_argument("--batch_size", type=int)
  p.add_argument("--repeats", type=int, help="interleaved timing rounds (median reported)")
  p.add_argument("--sampler_repeats", type=int,
                 help="interleaved sampler rounds: the sampler's share outside the network is a "
                      "difference of two timings, so on a noisy CPU it takes many short rounds")
  p.add_argument("--iters", type=int, help="calls per runner per round")
  p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--input_size", type=int, default=32, help="latent side (32: 256 px)")
  p.add_argument("--remat", action="store_true",
                 help="rematerialise blocks (config.model.remat; scans the blocks)")
  p.add_argument("--scan_unroll", default="config",
                 help="'config' (the config's choice), N (scan the blocks, N per iteration) "
                      "or 'all' (no loop: config.model.scan_blocks=False)")
  p.add_argument("--attention", default="auto",
                 help="config.model.attention of the JAX runs: auto, einsum, xla or cudnn")
  p.add_argument("--ddpm_steps", type=int, help="DDPM steps run; extrapolated to 250")
  p.add_argument("--heun_steps", type=int, help="Heun steps run; extrapolated to 18 (35 NFE)")
  p.add_argument("--sampler_batch", type=int)
  p.add_argument("--sampler_variant")
  p.add_argument("--matmul_size", type=int)
  p.add_argument("--num_devices", type=int, default=1,
                 help="devices the JAX runs use (<= 0: all); PyTorch uses one")
  p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                 help="time the PyTorch reference")
  p.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--xl_compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--malloc", choices=("retain", "default"), default="retain",
                 help="retain: rerun under GLIBC_TUNABLES that keep freed memory (CPU only)")
  p.add_argument("--quick", action="store_true", help="a smoke run: small batch, few steps")
  p.add_argument("--out_dir", default=RESULTS_DIR)
  args = p.parse_args(argv)
  kind = "quick" if args.quick else ("cpu" if jax.devices()[0].platform == "cpu"
                                     else "accelerator")
  for key, value in DEFAULTS[kind].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.variant_list = [v for v in args.variants.split(",") if v]
  args.attention_used = resolve_attention(  # checks the choice early
      args.attention, jnp.bfloat16 if args.precision == "bf16" else jnp.float32)
  if args.xl and "XL/2" not in args.variant_list:
    args.variant_list.append("XL/2")
  return args


def reexec_with_retained_malloc() -> None:
  """Restarts this script under `RETAIN_MALLOC` (glibc reads its tunables at start-up)."""
  if RETAIN_MALLOC in os.environ.get("GLIBC_TUNABLES", ""):
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), RETAIN_MALLOC) if x)
  print(f"re-running under GLIBC_TUNABLES={env['GLIBC_TUNABLES']}", flush=True)
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv: list[str] | None = None) -> dict:
  if "--no-torch" not in (sys.argv[1:] if argv is None else argv):
    # On a GPU the PyTorch worker shares the device: JAX takes half its memory, not 75%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  args = parse_args(argv)
  if (argv is None and args.malloc == "retain" and jax.devices()[0].platform == "cpu"
      and platform.system() == "Linux"):
    reexec_with_retained_malloc()
  worker = None
  if args.torch:
    jax_platform = jax.devices()[0].platform
    if jax_platform in ("cpu", "gpu"):
      try:
        worker = TorchWorker("cuda" if jax_platform == "gpu" else "cpu")
      except RuntimeError as e:
        print(f"{e}: skipping the reference.")
    else:
      print(f"PyTorch has no {jax_platform} device here: skipping the reference.")
  mesh = benchmark_mesh(args)
  report: dict[str, Any] = dict(
      command="python experiments/benchmark.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      machine=machine_info(worker.info if worker else None), load_average_start=load_average(),
      settings={k: v for k, v in vars(args).items() if k != "variant_list"},
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
      torch_device=worker.device if worker else None, variants={})
  report["settings"]["mesh_devices"] = int(mesh.devices.size)
  report["settings"]["out_dir"] = repo_relative(args.out_dir)
  start = time.perf_counter()
  for variant in args.variant_list:
    report["variants"][variant] = benchmark_variant(variant, args, mesh, worker)
  if worker is not None:
    worker.close()
  if args.sampler:
    report["sampler"] = benchmark_sampler(args, mesh)
  if args.xl_compile:
    print("[XL/2] abstract train-step compile ...", flush=True)
    report["xl2_train_step_compile"] = xl_compile(args, mesh)
    print(f"[XL/2] {report['xl2_train_step_compile']}", flush=True)
  else:
    report["xl2_train_step_compile"] = dict(skipped="--no-xl_compile")
  report["load_average_end"] = load_average()
  report["wall_s"] = round(time.perf_counter() - start, 1)
  report["targets"] = targets(report)
  write_results(args.out_dir, f"benchmark_{report['machine']['platform']}", report,
                markdown(report))
  print(markdown(report))
  return report


if __name__ == "__main__":
  main()
