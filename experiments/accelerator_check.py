"""The accelerator check: DiffiT-XL/2 training and the official sampler on one GPU or TPU.

One command, prepared on CPU and run the moment an accelerator is at hand; it measures on
whatever device JAX sees, and PyTorch's reference on the same GPU, side by side:

  * JAX train step of DiffiT-XL/2 at 256 px (32x32x4 latents), the real jitted, donated
    `train.make_train_step` (ADM hybrid loss, AdamW, EMA) in bf16: images/s, step time,
    MFU against the chip's datasheet peak (and against a matmul timed in the same process),
    XLA's memory estimate and the device's peak memory. The shipped config ("default":
    unrolled blocks, attention "auto") and the candidates for more speed, each a case:
    XLA's attention against cuDNN's fused kernel, per-device batch 32, 64 and 128 (128
    also scanned with rematerialisation), and an XLA GPU flag (the latency-hiding
    scheduler, set in the case's own process).
  * Where the step's time goes: for the cases marked `profile` (all JAX cases with
    `--profile`), a `jax.profiler` trace of a few steady-state steps, broken down by the
    HLO op each event names (matmuls, attention, LayerNorm/reductions, GELU/elementwise,
    optimizer + EMA, casts, copies, collectives, idle), with the top kernels
    (`bench_profile.py`).
  * The official sampling protocol: 250-step DDPM with power-cosine guidance (w = 4.4,
    exponent 4) on the first 3 latent channels, a guided batch of `--sample_batch` images
    (the network sees twice that); also with XLA's attention and at twice the batch.
    `--sample_steps` steps of the loop are timed and the time is scaled to 250 (every
    step costs the same): images/s and the projected hours for the 50,000 samples of the
    FID protocol.
  * The same two for the PyTorch transcription of the official model
    (`tests/torch_reference.py`): eager and `torch.compile`, in TF32 (float32 with
    TF32 matmuls, what JAX's default float32 precision does on NVIDIA GPUs) and bf16
    autocast.
  * The targets, comparing like with like: each side's best case against the other's
    best, and default against default, at the same batch.

Every measurement ("case") runs in a process of its own, so its peak memory is its own,
a failure (out of memory, a compiler error) loses nothing else, and the device is free
for the next. Cases run in order of importance within `--budget_s`; what does not fit is
recorded as skipped. The report is rewritten after every case, so an interrupted run
keeps what it measured.

The check imports only JAX, Flax, Optax, Orbax, ml_collections, NumPy and (for the
reference) PyTorch: no grain, tensorflow-datasets or clu.

Run (writes experiments/results/accelerator_<device>.{json,md}, traces under
experiments/results/profiles/):
  python experiments/accelerator_check.py             # GPU/TPU: at most 9 minutes
  python experiments/accelerator_check.py --smoke     # the same code on CPU at toy sizes
On a machine whose own CUDA/TPU JAX must stay (no `pip install -e .`, which pins the CPU
wheels), run it from the repository root with `PYTHONPATH=.`; it needs ml_collections
besides JAX, Flax, Optax, Orbax and PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any

# The benchmark's parts (experiments/bench_*.py). All but bench_common and bench_profile
# import JAX, so they are imported inside the cases' processes, never in the driver.
import bench_common
import bench_profile

FID_SAMPLES = 50_000

# Dense matmul peaks from the vendors' datasheets (FLOP/s, no sparsity): (bf16, float32 as
# the chip runs it by default: TF32 on NVIDIA, bf16 passes on TPU). Matched in order
# against `device_kind`; MFU is reported against these and against a measured matmul.
CHIP_PEAKS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989.4e12, 494.7e12),   # SXM
    ("H200", 989.4e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("L4", 121e12, 60e12),
    ("TPU v4", 275e12, None),
    ("TPU v5 lite", 197e12, None),
    ("TPU v5", 459e12, None),       # v5p
    ("TPU v6 lite", 918e12, None),  # Trillium
)

# Sizes. `--smoke` runs the same cases on a tiny network, on CPU, in well under a minute.
# A case's batch is `train_batch` (or `sample_batch`) times its `batch_mult`.
SETTINGS = {
    "accelerator": dict(variant="XL/2", input_size=32, train_batch=32, train_iters=10,
                        repeats=3, sample_batch=64, sample_steps=25, matmul_size=8192,
                        budget_s=540, torch_compile=True, profile_calls=3),
    "smoke": dict(variant="tiny", input_size=8, train_batch=2, train_iters=1, repeats=1,
                  sample_batch=2, sample_steps=2, matmul_size=256, budget_s=900,
                  torch_compile=False, profile_calls=2),
}
LHS_FLAG = "--xla_gpu_enable_latency_hiding_scheduler=true"
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0"  # see _case_env
# Most important first: the shipped config, then the candidates for more speed (one GPU run
# A/Bs them all), then the rest of what the targets need, then the rest. "default" is the
# shipped config (configs/imagenet256_latent.py: blocks unrolled, attention "auto", which is
# cuDNN's fused kernel on NVIDIA GPUs of compute capability 8.0+ in bf16, einsum on CPU);
# the report shows which attention each case resolved to. A name's bN is the per-device batch at the
# accelerator sizes (32 x batch_mult; the smoke run's batch is 2 x batch_mult).
# `profile`: a jax.profiler trace of a few steps goes into the report (bench_profile.py).
CASES = (
    dict(name="jax_train_bf16_default", kind="jax_train", precision="bf16", attention="auto",
         scan=False, remat=False, profile=True),
    dict(name="jax_sample_bf16", kind="jax_sample", precision="bf16", attention="auto",
         profile=True),
    dict(name="torch_eager_bf16", kind="torch", precision="bf16", compile=False),
    # Candidates: XLA's attention, larger per-device batches (scanned with remat only where
    # 128 unrolled does not fit, `only_if_failed`; the smoke run runs it regardless), an
    # XLA flag, the sampler's attention and batch.
    dict(name="jax_train_bf16_xla_unrolled", kind="jax_train", precision="bf16",
         attention="xla", scan=False, remat=False, profile=True),
    dict(name="jax_train_bf16_default_b64", kind="jax_train", precision="bf16",
         attention="auto", scan=False, remat=False, batch_mult=2),
    dict(name="jax_train_bf16_default_b128", kind="jax_train", precision="bf16",
         attention="auto", scan=False, remat=False, batch_mult=4),
    dict(name="jax_train_bf16_remat_b128", kind="jax_train", precision="bf16",
         attention="auto", scan=True, remat=True, batch_mult=4,
         only_if_failed="jax_train_bf16_default_b128"),
    dict(name="jax_train_bf16_default_lhs", kind="jax_train", precision="bf16",
         attention="auto", scan=False, remat=False, xla_flags=LHS_FLAG),
    dict(name="jax_sample_bf16_xla", kind="jax_sample", precision="bf16", attention="xla"),
    dict(name="jax_sample_bf16_b128", kind="jax_sample", precision="bf16", attention="auto",
         batch_mult=2),
    # The rest of the targets' PyTorch side: its compile alone takes about 3 minutes.
    dict(name="torch_compile_bf16", kind="torch", precision="bf16", compile=True),
    # Lower priority: the H200 measured cudnn_scan; the fp32 cases did not fit its time.
    dict(name="jax_train_bf16_cudnn_scan", kind="jax_train", precision="bf16",
         attention="cudnn", scan=True, remat=False),
    dict(name="jax_sample_fp32", kind="jax_sample", precision="fp32", attention="auto"),
    dict(name="torch_eager_fp32", kind="torch", precision="fp32", compile=False),
    # Not in the default run: `--only NAME` or `--all`. The scanned XLA-attention steps were
    # 30% slower than unrolled on the H200; "default" is cuDNN unrolled where cuDNN runs.
    dict(name="jax_train_bf16_xla_scan", kind="jax_train", precision="bf16", attention="xla",
         scan=True, remat=False, default=False),
    dict(name="jax_train_bf16_xla_scan_remat", kind="jax_train", precision="bf16",
         attention="xla", scan=True, remat=True, default=False),
    dict(name="jax_train_bf16_cudnn_unrolled", kind="jax_train", precision="bf16",
         attention="cudnn", scan=False, remat=False, default=False),
    dict(name="torch_compile_fp32", kind="torch", precision="fp32", compile=True,
         default=False),
    dict(name="jax_train_fp32_xla_scan", kind="jax_train", precision="fp32", attention="xla",
         scan=True, remat=False, default=False),
)
# Most a case may take, in seconds (the compile of XL/2 included).
CASE_LIMIT_S = {"jax_train": 180, "jax_sample": 150, "torch": 240}
MIN_CASE_S = 30  # a case is not started with less than this left of the budget


# ----------------------------------------------------------------------------------------
# Inside a case's process.


def chip_peak(device_kind: str, precision: str) -> tuple[float | None, str]:
  """The datasheet peak for `precision` and the row it came from."""
  for name, bf16, fp32 in CHIP_PEAKS:
    if name.lower() in device_kind.lower():
      return (bf16 if precision == "bf16" else fp32), name
  return None, "unknown chip"


def _profile(case: dict, s: dict, run, compiled, loss_scope: str | None) -> dict | None:
  """`bench_profile.profile_calls` of a warm compiled function, if this case is profiled."""
  if not (s["profile"] == "all" or (s["profile"] == "default" and case.get("profile"))):
    return None
  try:
    profile = bench_profile.profile_calls(
        run, compiled.as_text(), os.path.join(s["profile_dir"], case["name"]),
        calls=s["profile_calls"], loss_scope=loss_scope)
    profile["trace"] = bench_common.repo_relative(profile["trace"])  # results are committed
    return profile
  except Exception as e:  # pylint: disable=broad-except
    return dict(error=f"{type(e).__name__}: {e}"[:1500],
                traceback=traceback.format_exc()[-3000:])  # the timings stand without it


def run_jax_train(case: dict, s: dict) -> dict[str, Any]:
  """The real train step, compiled and timed; MFU and memory; a profile if asked."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import bench_jax  # pylint: disable=g-import-not-at-top
  import bench_model  # pylint: disable=g-import-not-at-top
  from diffit_jax.models.tmsa import resolve_attention  # pylint: disable=g-import-not-at-top
  batch = s["train_batch"] * case.get("batch_mult", 1)
  args = argparse.Namespace(
      input_size=s["input_size"], precision=case["precision"], remat=case["remat"],
      attention=case["attention"], scan_unroll="1" if case["scan"] else "all",
      batch_size=batch, num_devices=1)
  mesh = bench_jax.benchmark_mesh(args)
  runners, info = bench_jax.jax_runners(s["variant"], args, mesh, with_forward=False)
  step = bench_common.time_repeated(runners["jax_train"], s["train_iters"], s["repeats"])
  config = bench_model.model_config(s["variant"], input_size=s["input_size"],
                                    precision=case["precision"])
  train_flops, flops_source = bench_model.train_step_flops(config, batch)
  dtype = jnp.bfloat16 if case["precision"] == "bf16" else jnp.float32
  matmul, matmul_flops = bench_model.matmul_runner(s["matmul_size"], dtype)
  matmul_s = bench_common.time_repeated(matmul, 10, s["repeats"])["median_s"]
  peak, peak_source = chip_peak(bench_common.machine_info()["device_kind"], case["precision"])
  t = step["median_s"]
  result = dict(
      batch_size=batch, step_s=t, images_per_s=batch / t,
      step_times=step, train_flops_per_step=train_flops,
      flops_source=flops_source,
      mfu=train_flops / t / peak if peak else None, peak_flops_per_s=peak,
      peak_source=peak_source, measured_matmul_flops_per_s=matmul_flops / matmul_s,
      mfu_vs_measured_matmul=train_flops / t / (matmul_flops / matmul_s),
      compile_s=info["train_compile_s"], xla_memory=info["train_xla_memory"],
      memory=info["train_memory"], params=info["params"],
      attention=resolve_attention(case["attention"], dtype), scan=case["scan"],
      remat=case["remat"], xla_flags=case.get("xla_flags", ""))
  profile = _profile(case, s, runners["jax_train"], runners["jax_train"].compiled,
                     loss_scope="diffusion_loss")  # train.make_loss_fn's scope
  if profile:
    result["profile"] = profile
  return result


def run_jax_sample(case: dict, s: dict) -> dict[str, Any]:
  """The compiled guided DDPM sampler on the latent network; a profile if asked."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from diffit_jax import models  # pylint: disable=g-import-not-at-top
  from diffit_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from diffit_jax.models.tmsa import resolve_attention  # pylint: disable=g-import-not-at-top
  import bench_jax  # pylint: disable=g-import-not-at-top
  import bench_model  # pylint: disable=g-import-not-at-top
  import bench_sampler  # pylint: disable=g-import-not-at-top
  config = bench_model.model_config(s["variant"], input_size=s["input_size"],
                                    precision=case["precision"])
  config.attention = case["attention"]
  model = models.build_model(config, rngs=nnx.Rngs(0))
  model.eval()
  apply_fn, state = models.nnx_apply_fn(model)
  mesh = bench_jax.benchmark_mesh(argparse.Namespace(num_devices=1))
  b = s["sample_batch"] * case.get("batch_mult", 1)
  sampler = samplers.make_sampler(
      bench_sampler.official_ddpm(s["sample_steps"], config.num_classes),
      apply_fn, (s["input_size"], s["input_size"], 4), mesh=mesh)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, config.num_classes, b).astype(np.int32)
  indices = np.arange(b, dtype=np.int32)
  seed = np.uint32(0)
  attention = resolve_attention(config.attention, models.DTYPES[config.dtype])
  with bench_common.PeakMemory() as mem:
    start = time.perf_counter()
    compiled = sampler.jitted.lower(state, labels, indices, seed, None).compile()  # no x_T
    compile_s = time.perf_counter() - start
    run = lambda: jax.block_until_ready(compiled(state, labels, indices, seed, None))
    run()
  result = _sampling_result(bench_common.time_repeated(run, 1, s["repeats"]), s, b, dict(
      compile_s=round(compile_s, 3), memory=mem.result, attention=attention))
  profile = _profile(case, s, run, compiled, loss_scope=None)
  if profile:
    result["profile"] = profile
  return result


def _sampling_result(times: dict, s: dict, batch: int, extra: dict) -> dict[str, Any]:
  """Seconds per image of the full 250-step protocol, from `sample_steps` timed steps."""
  from bench_sampler import OFFICIAL_DDPM_STEPS  # pylint: disable=g-import-not-at-top
  per_image = times["median_s"] * OFFICIAL_DDPM_STEPS / s["sample_steps"] / batch
  return dict(batch_size=batch, network_batch=2 * batch,
              timed_steps=s["sample_steps"], protocol_steps=OFFICIAL_DDPM_STEPS,
              seconds_per_call=times, seconds_per_image=per_image,
              images_per_s=1.0 / per_image,
              hours_for_50k=FID_SAMPLES * per_image / 3600.0, **extra)


def run_torch(case: dict, s: dict) -> dict[str, Any]:
  """The reference's train step and the official sampler, eager or compiled."""
  import torch  # pylint: disable=g-import-not-at-top
  import bench_model  # pylint: disable=g-import-not-at-top
  import bench_torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.set_float32_matmul_precision("high")  # TF32, as JAX's default float32 on GPU
  reference = bench_torch.import_torch_reference()
  result: dict[str, Any] = dict(torch=torch.__version__, device=device,
                                device_name=torch.cuda.get_device_name() if device == "cuda"
                                else platform.processor())
  runners, info = bench_torch.torch_runners(
      torch, reference, variant=s["variant"], batch_size=s["train_batch"],
      input_size=s["input_size"], precision=case["precision"], device=device,
      compile_model=case["compile"])
  tag = "torch_compile" if case["compile"] else "torch_eager"
  step = bench_common.time_repeated(runners[f"{tag}_train"], s["train_iters"], s["repeats"])
  config = bench_model.model_config(s["variant"], input_size=s["input_size"],
                                    precision=case["precision"])
  train_flops, _ = bench_model.train_step_flops(config, s["train_batch"])
  peak, peak_source = chip_peak(result["device_name"], case["precision"])
  result["train"] = dict(
      batch_size=s["train_batch"], step_s=step["median_s"],
      images_per_s=s["train_batch"] / step["median_s"], step_times=step,
      mfu=train_flops / step["median_s"] / peak if peak else None, peak_source=peak_source,
      first_call_s=info["train_first_call_s"], memory=info["train_memory"])
  del runners
  if device == "cuda":
    torch.cuda.empty_cache()

  model = bench_torch.reference_model(torch, reference, config, device).eval()
  run = bench_torch.torch_ddpm_loop(torch, model, steps=s["sample_steps"], batch=s["sample_batch"],
                        input_size=s["input_size"], device=device,
                        bf16=case["precision"] == "bf16", compile_model=case["compile"])
  with bench_common.PeakMemory(torch) as mem:
    start = time.perf_counter()
    run()  # compiles under torch.compile
    first_s = time.perf_counter() - start
  result["sample"] = _sampling_result(bench_common.time_repeated(run, 1, s["repeats"]), s,
                                      s["sample_batch"], dict(
      first_call_s=round(first_s, 3), memory=mem.result))
  return result


RUNNERS = {"jax_train": run_jax_train, "jax_sample": run_jax_sample, "torch": run_torch}


def case_process(names: list[str], settings: dict, out: str) -> None:
  """Runs `names` in this process, writing {name: result} to `out` after each."""
  results: dict[str, Any] = {}
  for name in names:
    case = next(c for c in CASES if c["name"] == name)
    print(f"[{name}] ...", flush=True)
    start = time.perf_counter()
    try:
      if case.get("attention") == "cudnn":
        import jax  # pylint: disable=g-import-not-at-top
        if jax.default_backend() != "gpu":
          raise _Skip("cuDNN attention needs an NVIDIA GPU")
      if case["kind"] == "torch" and case["compile"] and not settings["torch_compile"]:
        raise _Skip("torch.compile is off in smoke mode (Inductor builds take minutes on CPU)")
      result = RUNNERS[case["kind"]](case, settings)
      if case["kind"] != "torch":
        result["device"] = bench_common.machine_info()
    except _Skip as e:
      result = dict(skipped=str(e))
    except Exception as e:  # pylint: disable=broad-except
      result = dict(error=f"{type(e).__name__}: {e}"[:1500],
                    traceback=traceback.format_exc()[-3000:])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    results[name] = result
    print(f"[{name}] {_one_line(result)}", flush=True)
    bench_common.write_json(out, results)


class _Skip(Exception):
  pass


# ----------------------------------------------------------------------------------------
# The driver: one process per case (one per framework in smoke mode), then the report.


def _one_line(r: dict) -> str:
  if "error" in r:
    return "error: " + r["error"].splitlines()[0][:300]
  if "skipped" in r:
    return "skipped: " + r["skipped"]
  parts = []
  train = r if "step_s" in r else r.get("train")
  if train:
    mfu = f", MFU {train['mfu']:.1%}" if train.get("mfu") else ""
    parts.append(f"train {train['images_per_s']:.1f} img/s{mfu}")
  sample = r if "hours_for_50k" in r else r.get("sample")
  if sample:
    parts.append(f"sampling {sample['images_per_s']:.3f} img/s "
                 f"({sample['hours_for_50k']:.2f} h for 50k)")
  return "; ".join(parts)


def _case_env(case: dict, smoke: bool) -> dict[str, str]:
  env = dict(os.environ)
  if case["kind"] == "torch":
    env["JAX_PLATFORMS"] = "cpu"  # the reference's process keeps JAX off the device
    return env
  # Alone on the device: let JAX's allocator take most of it.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  # XLA reads its flags once, when it starts: a case with flags has a process of its own.
  # The smoke run checks the code, not the speed: XLA:CPU compiles its kernels without
  # LLVM's optimisations (the same HLO, fusions and memory plan), which halves the toy
  # step's compile time.
  flags = (SMOKE_XLA_FLAGS if smoke else "", case.get("xla_flags", ""))
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS"), *flags) if f)
  return env


def run_cases(cases: list[dict], settings: dict, args, report: dict, write) -> None:
  """Runs the cases in order, each group in a subprocess, within the time budget.

  On an accelerator every case has the device to itself, one after another. In smoke mode
  (CPU, toy sizes) there is one process per framework, and one more for each set of
  `xla_flags` (XLA reads them once, at start), all side by side: they share nothing but
  the CPU, and the smoke run takes the time of the longest.
  """
  deadline = time.monotonic() + settings["budget_s"]
  if args.smoke:
    groups: dict[tuple, list] = {}
    for c in cases:
      groups.setdefault((c["kind"] == "torch", c.get("xla_flags", "")), []).append(c)
    waves = [list(groups.values())]
  else:
    waves = [[[case]] for case in cases]
  for wave in waves:
    running = []
    for i, group in enumerate(wave):
      names = [c["name"] for c in group]
      needed = group[0].get("only_if_failed")
      if not args.smoke and needed and not _failed(report["cases"].get(needed)):
        report["cases"][names[0]] = dict(skipped=f"not needed: {needed} ran, or did not start")
        continue
      left = deadline - time.monotonic()
      if left < MIN_CASE_S:
        for name in names:
          report["cases"][name] = dict(skipped=f"time budget ({settings['budget_s']} s) spent")
        continue
      limit = min(left, sum(CASE_LIMIT_S[c["kind"]] for c in group))
      part = os.path.join(args.out_dir, f".accelerator_part_{os.getpid()}_{i}.json")
      command = [sys.executable, os.path.abspath(__file__), "--case_process", ",".join(names),
                 "--settings", json.dumps(settings), "--part", part]
      process = subprocess.Popen(command, env=_case_env(group[0], args.smoke))
      running.append((names, limit, part, process))
    start = time.monotonic()
    for names, limit, part, process in running:
      report["cases"].update(_finish_cases(names, start + limit, limit, part, process))
    write()


def _failed(result: dict | None) -> bool:
  return bool(result) and "error" in result


def _finish_cases(names: list[str], end: float, limit: float, part: str,
                  process: subprocess.Popen) -> dict[str, Any]:
  """Waits for a case process until `end` (then kills it) and returns its results."""
  try:
    process.wait(timeout=max(0.0, end - time.monotonic()))
    timed_out = False
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    timed_out = True
  results = {}
  if os.path.exists(part):
    with open(part) as f:
      results = json.load(f)
    os.remove(part)
  return {name: results.get(name) or dict(
      error=f"killed after {limit:.0f} s" if timed_out else "the case's process died "
      "without a result (its output is above)") for name in names}


def _layout(r: dict) -> str:
  """How a JAX train case ran its blocks (and under which extra XLA flags)."""
  layout = ("scan + remat" if r.get("remat") else "scan") if r.get("scan") else "unrolled"
  return layout + (f", {r['xla_flags']}" if r.get("xla_flags") else "")


def summarize_report(report: dict) -> dict[str, Any]:
  """The targets, each side's best against the other's best and default against default.

  XL/2 bf16 training >= 45% MFU (the best JAX case at any batch, and the shipped config);
  JAX sampling >= 1.5x PyTorch eager (default against default: the shipped sampler against
  eager) and >= 1.0x torch.compile (best against best, at the same guided batch). The
  train step's speed against PyTorch has no target; it is compared the same two ways at
  the batch PyTorch ran. "Best" is the fastest case that ran; "default" is what a user
  gets without choosing: `jax_*_default` / `jax_sample_*` and PyTorch eager.
  """
  cases = report["cases"]
  s = report["settings"]
  ok = lambda name: name in cases and "error" not in cases[name] and "skipped" not in cases[name]
  train = lambda c: c if "step_s" in c else c.get("train")
  sample = lambda c: c if "hours_for_50k" in c else c.get("sample")
  out: dict[str, Any] = {}

  def best(prefix: str, get, batch: int | None = None) -> str | None:
    names = [n for n in cases if n.startswith(prefix) and ok(n) and get(cases[n])
             and (batch is None or get(cases[n])["batch_size"] == batch)]
    return max(names, key=lambda n: get(cases[n])["images_per_s"], default=None)

  def ratio(key, what, jax_name, torch_name, get, target=None):
    if jax_name and torch_name and ok(jax_name) and ok(torch_name):
      r = get(cases[jax_name])["images_per_s"] / get(cases[torch_name])["images_per_s"]
      out[key] = dict(what=what, jax_case=jax_name, torch_case=torch_name, ratio=r,
                      target=target, holds=None if target is None else r >= target)

  for key, what, name in (("train_mfu_best", "best JAX case, any batch",
                           best("jax_train_bf16", train)),
                          ("train_mfu_default", "JAX default (the shipped config)",
                           "jax_train_bf16_default")):
    if name and ok(name):
      mfu = cases[name].get("mfu")
      out[key] = dict(what=f"XL/2 bf16 train MFU, {what}", jax_case=name, mfu=mfu,
                      target=0.45, holds=None if mfu is None else mfu >= 0.45)
  for p in ("bf16", "fp32"):
    torch_best = lambda get, p=p: max(
        (n for n in (f"torch_eager_{p}", f"torch_compile_{p}") if ok(n)),
        key=lambda n: get(cases[n])["images_per_s"], default=None)
    ratio(f"train_{p}_default_vs_default", f"{p} train img/s, default vs default",
          f"jax_train_{p}_default", f"torch_eager_{p}", train)
    ratio(f"train_{p}_best_vs_best", f"{p} train img/s, best vs best (batch {s['train_batch']})",
          best(f"jax_train_{p}", train, s["train_batch"]), torch_best(train), train)
    ratio(f"sampling_{p}_default_vs_default", f"{p} sampling img/s, default vs default",
          f"jax_sample_{p}", f"torch_eager_{p}", sample, target=1.5)
    ratio(f"sampling_{p}_best_vs_best",
          f"{p} sampling img/s, best vs best (guided batch {s['sample_batch']})",
          best(f"jax_sample_{p}", sample, s["sample_batch"]), torch_best(sample), sample,
          target=1.0)
  return out


def markdown(report: dict) -> str:
  d = report.get("device") or {}
  s = report["settings"]
  lines = [f"# diffit_jax accelerator check ({d.get('platform', '?')}: "
           f"{d.get('device_kind', '?')})", "",
           f"`{report['command']}`; JAX {d.get('jax', '?')}, Flax {d.get('flax', '?')}, "
           f"{report.get('torch') or 'no PyTorch'}; model {s['variant']} at "
           f"{s['input_size']}x{s['input_size']}x4 latents; {report.get('wall_s', '?')} s"
           + (f"; XLA_FLAGS `{d['xla_flags']}`" if d.get("xla_flags") else "") + ".", "",
           f"## Train step (median of {s['repeats']} rounds of {s['train_iters']} steps)", "",
           "| case | batch | attention | blocks | img/s | step ms | MFU (datasheet) | "
           "MFU (measured matmul) | compile s | XLA memory GiB | device peak GiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x, f: "-" if x is None else format(x, f)
  for name, r in report["cases"].items():
    train = r if name.startswith("jax_train") else r.get("train")
    if not name.startswith(("jax_train", "torch")):
      continue
    if "error" in r or "skipped" in r or not train:
      lines.append(f"| {name} | {_one_line(r)} | | | | | | | | | |")
      continue
    mem = train.get("memory") or {}
    peak = mem.get("jax_device_peak_gib_cumulative", mem.get("torch_cuda_peak_gib"))
    jax_case = name.startswith("jax")
    lines.append(
        f"| {name} | {train['batch_size']} | {r.get('attention', '-')} | "
        f"{_layout(r) if jax_case else '-'} | {train['images_per_s']:.1f} | "
        f"{1e3 * train['step_s']:.1f} | "
        f"{fmt(train.get('mfu'), '.1%')} | {fmt(train.get('mfu_vs_measured_matmul'), '.1%')} | "
        f"{fmt(train.get('compile_s', train.get('first_call_s')), '.1f')} | "
        f"{fmt((train.get('xla_memory') or {}).get('total_gib'), '.2f')} | {fmt(peak, '.2f')} |")
  lines += ["", f"Datasheet peaks: {report.get('peak_note', '-')}", "",
            f"## Official sampling protocol (250-step DDPM, power-cosine guidance on 3 channels; "
            f"{s['sample_steps']} steps timed, scaled to 250)", "",
            "| case | guided batch | attention | img/s | s/img | hours for 50k | "
            "compile / first call s |", "|---|---|---|---|---|---|---|"]
  for name, r in report["cases"].items():
    if not name.startswith(("jax_sample", "torch")):
      continue
    sample = r if name.startswith("jax_sample") else r.get("sample")
    if "error" in r or "skipped" in r or not sample:
      lines.append(f"| {name} | {_one_line(r)} | | | | | |")
      continue
    lines.append(f"| {name} | {sample['batch_size']} | {sample.get('attention', '-')} | "
                 f"{sample['images_per_s']:.3f} | {sample['seconds_per_image']:.3f} |"
                 f" {sample['hours_for_50k']:.2f} | "
                 f"{fmt(sample.get('compile_s', sample.get('first_call_s')), '.1f')} |")
  lines += ["", "## Targets", "",
            "Each side's best case against the other's best, and default against default "
            "(JAX: the shipped config; PyTorch: eager), at the same batch.", "",
            "| target | JAX case | PyTorch case | measured | holds |", "|---|---|---|---|---|"]
  for t in report.get("targets", {}).values():
    goal = "" if t["target"] is None else (
        f" >= {t['target']:.0%}" if "mfu" in t else f" >= {t['target']}x")
    measured = fmt(t["mfu"], ".1%") if "mfu" in t else f"{t['ratio']:.2f}x"
    holds = "" if t["target"] is None else t["holds"]
    lines.append(f"| {t['what']}{goal} | {t['jax_case']} | {t.get('torch_case') or '-'} | "
                 f"{measured} | {holds} |")
  lines += _profile_markdown(report)
  return "\n".join(lines) + "\n"


def _profile_markdown(report: dict) -> list[str]:
  """One breakdown per profiled case (see bench_profile.py)."""
  profiled = {n: r for n, r in report["cases"].items() if r.get("profile")}
  if not profiled:
    return []
  d = report.get("device") or {}
  where = ("XLA:CPU's thunks on the host's XLA threads" if d.get("platform") == "cpu" else
           "the kernels on the device's streams")
  lines = ["", "## Where the time goes (jax.profiler)", "",
           f"A trace of {report['settings']['profile_calls']} steady-state calls per case, "
           f"after the timed ones; {where}. Each op is classified by the HLO instruction the "
           "trace names (opcode, fused ops, custom-call target, JAX scope); time is exclusive "
           "and split between ops running at once, so the rows add up to the traced time.",
           "While a profile is active XLA:GPU runs its command buffers (CUDA graphs) op by op "
           "(`--xla_enable_command_buffers_during_profiling` is false by default), so idle gaps "
           "can be longer in the trace than in the timed steps: compare the traced ms per call "
           "with the timed one.",
           "Open the trace (`profile.trace` in the JSON) in TensorBoard's or XProf's profile "
           "tab for the timeline."]
  for name, r in profiled.items():
    p = r["profile"]
    lines += ["", f"### {name}", ""]
    if "error" in p:
      lines.append(f"The profile failed: {p['error']}")
      continue
    step = r.get("step_s") or (r.get("seconds_per_call") or {}).get("median_s")
    lines += bench_profile.markdown(p, step_ms=1e3 * step if step else None)
  return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="toy sizes on CPU (a test runs this so the script cannot rot)")
  p.add_argument("--only", default="", help="comma-separated case names (default: all)")
  p.add_argument("--all", action="store_true", help="also the cases left out by default")
  p.add_argument("--budget_s", type=float, help="total seconds for all cases")
  p.add_argument("--train_batch", type=int)
  p.add_argument("--sample_batch", type=int)
  p.add_argument("--sample_steps", type=int)
  p.add_argument("--out_dir", default=bench_common.RESULTS_DIR)
  p.add_argument("--profile", dest="profile", action="store_const", const="all",
                 default="default", help="profile every JAX case (default: the cases "
                 "marked profile=True: the shipped train step, XLA's attention, the sampler)")
  p.add_argument("--no_profile", dest="profile", action="store_const", const="none",
                 help="profile no case")
  p.add_argument("--profile_dir", help="where the traces go (default: OUT_DIR/profiles/CASE; "
                 "open an .xplane.pb in TensorBoard's or XProf's profile tab)")
  p.add_argument("--case_process", help=argparse.SUPPRESS)
  p.add_argument("--settings", help=argparse.SUPPRESS)
  p.add_argument("--part", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.case_process:
    case_process(args.case_process.split(","), json.loads(args.settings), args.part)
    return {}
  settings = dict(SETTINGS["smoke" if args.smoke else "accelerator"])
  for key in ("budget_s", "train_batch", "sample_batch", "sample_steps"):
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  settings["profile"] = args.profile
  settings["profile_dir"] = os.path.abspath(args.profile_dir or
                                            os.path.join(args.out_dir, "profiles"))
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - {c["name"] for c in CASES})
  if unknown:
    sys.exit(f"error: unknown case(s) {unknown}; the cases are {[c['name'] for c in CASES]}")
  cases = [c for c in CASES
           if c["name"] in names or (not names and (args.all or c.get("default", True)))]
  os.makedirs(args.out_dir, exist_ok=True)
  report: dict[str, Any] = dict(
      command="python experiments/accelerator_check.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      settings=dict(settings, profile_dir=bench_common.repo_relative(settings["profile_dir"])),
      cases={},
      peak_note="; ".join(f"{n}: bf16 {b / 1e12:.0f} TFLOP/s" +
                          (f", TF32 {f / 1e12:.0f}" if f else "") for n, b, f in CHIP_PEAKS))
  start = time.perf_counter()
  paths = {}

  def write() -> None:
    order = [c["name"] for c in CASES]  # the smoke run's processes finish in any order
    report["cases"] = dict(sorted(report["cases"].items(), key=lambda kv: order.index(kv[0])))
    done = [c for c in report["cases"].values() if "device" in c]
    if done:
      report["device"] = done[0]["device"]
      report["torch"] = next((f"PyTorch {c['torch']}" for c in report["cases"].values()
                              if "torch" in c), None)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["targets"] = summarize_report(report)
    kind = (report.get("device") or {}).get("device_kind", "pending")
    tag = "smoke" if args.smoke else "".join(ch if ch.isalnum() else "_" for ch in kind).lower()
    for old in set(paths.values()):
      if f"accelerator_{tag}." not in old and os.path.exists(old):
        os.remove(old)  # named before the device was known
    paths.update(bench_common.write_results(args.out_dir, f"accelerator_{tag}", report,
                                              markdown(report)))

  run_cases(cases, settings, args, report, write)
  write()
  print(markdown(report))
  print(f"wrote {paths['json']} and {paths['md']}")
  return report


if __name__ == "__main__":
  main()
