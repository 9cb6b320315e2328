"""What every experiment shares: timing, peak memory, machine facts and result files.

`benchmark.py`, `accelerator_check.py`, `fit_table.py` and `sampler_overhead.py` time, record
and write through these helpers, so their figures mean the same thing. Only the standard
library is imported at the top (JAX where a function needs it), so a driver that just
starts processes (`fit_table.py`, the accelerator check) stays light.

Timing: every measured function waits for its result; `time_interleaved` runs several of
them in turn, round after round, so load from other processes on a shared machine hits
them alike, and reports the median (min, max, CPU time and page faults per call besides).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXPERIMENTS)
RESULTS_DIR = os.path.join(EXPERIMENTS, "results")
GIB = 2.0 ** 30


# ----------------------------------------------------------------------------------------
# Timing.


def load_average() -> list[float]:
  """1-, 5- and 15-minute load averages (compare with the CPU count)."""
  return [round(x, 2) for x in os.getloadavg()]


def summarize(seconds: list[float]) -> dict[str, Any]:
  return dict(median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds),
              samples_s=[round(s, 5) for s in seconds])


def measure(run: Callable[[], None], iters: int) -> dict[str, float]:
  """Per call of `run` (which waits for its result), over `iters` calls in this process.

  Besides wall time, the process's CPU time (user + system) and minor page faults: on a
  shared machine CPU time is less disturbed by other processes, and the faults show what
  fresh memory for temporaries costs (the kernel zeroes every new page).
  """
  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  for _ in range(iters):
    run()
  seconds = (time.perf_counter() - start) / iters
  after = resource.getrusage(resource.RUSAGE_SELF)
  system = (after.ru_stime - before.ru_stime) / iters
  return dict(seconds=seconds, cpu_s=(after.ru_utime - before.ru_utime) / iters + system,
              system_s=system, faults=(after.ru_minflt - before.ru_minflt) / iters)


def local_runners(runners: dict[str, Callable[[], None]]) -> dict[str, Callable[[int], dict]]:
  """In-process functions as `time_interleaved` runners."""
  return {name: functools.partial(measure, run) for name, run in runners.items()}


def time_interleaved(runners: dict[str, Callable[[int], dict]], repeats: int, iters: int
                     ) -> tuple[dict[str, dict], list[float]]:
  """Seconds per call of every runner, over `repeats` rounds that run them all in turn.

  A runner takes a number of calls and returns `measure`'s figures for them, measured in
  the process that ran them (this one, or the PyTorch worker).
  Returns ({name: summary}, [1-minute load average after each round]).
  """
  samples = {name: [] for name in runners}
  loads = []
  for _ in range(repeats):
    for name, run in runners.items():
      samples[name].append(run(iters))
    loads.append(round(os.getloadavg()[0], 2))
  median = lambda name, key: statistics.median(m[key] for m in samples[name])
  return {name: dict(summarize([m["seconds"] for m in samples[name]]),
                     cpu_median_s=median(name, "cpu_s"),
                     system_median_s=median(name, "system_s"),
                     minor_faults_median=median(name, "faults"))
          for name in runners}, loads


def time_repeated(run: Callable[[], None], iters: int, repeats: int) -> dict[str, Any]:
  """`time_interleaved`'s summary of one in-process function."""
  times, _ = time_interleaved(local_runners({"run": run}), repeats, iters)
  return times["run"]


# ----------------------------------------------------------------------------------------
# Memory.


def _proc_status_kib(field: str) -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return None


class PeakMemory:
  """Peak memory while a block runs: host RSS on CPU, device memory on accelerators.

  On Linux the RSS high-water mark is reset on entry (writing 5 to /proc/self/clear_refs),
  so the peak belongs to the block; elsewhere it is the process's peak so far. Device
  peaks (`memory_stats()["peak_bytes_in_use"]`) cannot be reset and are cumulative.
  """

  def __init__(self, torch_module: Any = None):
    self.torch = torch_module
    self.result: dict[str, Any] = {}

  def __enter__(self):
    self.reset = False
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.reset = True
    except OSError:
      pass
    self.rss_before = _proc_status_kib("VmRSS")
    if self.torch is not None and self.torch.cuda.is_available():
      self.torch.cuda.reset_peak_memory_stats()
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=g-import-not-at-top
    peak = _proc_status_kib("VmHWM")
    if peak is None:
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    self.result = dict(host_peak_rss_gib=round(peak / 2 ** 20, 3),
                       host_rss_before_gib=round((self.rss_before or 0) / 2 ** 20, 3),
                       host_peak_is_per_block=self.reset)
    device = jax.local_devices()[0]
    if device.platform != "cpu":
      stats = device.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        self.result["jax_device_peak_gib_cumulative"] = round(stats["peak_bytes_in_use"] / GIB, 3)
    if self.torch is not None and self.torch.cuda.is_available():
      self.result["torch_cuda_peak_gib"] = round(self.torch.cuda.max_memory_allocated() / GIB, 3)
    return False


def memory_analysis(compiled: Any) -> dict[str, float] | None:
  """XLA's memory estimate of a compiled function, in GiB (None where unsupported)."""
  from diffit_jax import plan  # pylint: disable=g-import-not-at-top
  try:
    p = plan.plan_of(compiled)
  except Exception:  # pylint: disable=broad-except
    return None
  return dict(arguments_gib=round(p.arguments / GIB, 3), outputs_gib=round(p.outputs / GIB, 3),
              aliased_gib=round(p.aliased / GIB, 3), temp_gib=round(p.temporaries / GIB, 3),
              total_gib=round(p.total / GIB, 3),
              temp_bytes=int(p.temporaries))  # unrounded, for toy sizes


# ----------------------------------------------------------------------------------------
# The machine, and the result files.


def machine_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The device JAX runs on, the host's CPU, and the versions (plus `extra`, e.g. torch's)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  cpu_model = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  info = dict(platform=device.platform, device_kind=device.device_kind,
              num_devices=jax.device_count(), host=platform.machine(), cpu_model=cpu_model,
              cpu_count=os.cpu_count(), jax=jax.__version__, flax=flax.__version__,
              python=platform.python_version(), xla_flags=os.environ.get("XLA_FLAGS", ""))
  info.update(extra or {})
  return info


def repo_relative(path: str) -> str:
  """`path` relative to the repository when it lies inside it: result files are committed."""
  rel = os.path.relpath(os.path.abspath(path), ROOT)
  return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def write_json(path: str, data: Any) -> None:
  """`data` as indented JSON, replacing `path` at once (an interrupted run keeps the old)."""
  _write_text(path, json.dumps(data, indent=2))


def _write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_results(out_dir: str, name: str, data: Any, markdown: str) -> dict[str, str]:
  """OUT_DIR/NAME.json and OUT_DIR/NAME.md; returns their paths ({"json": ..., "md": ...})."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md")}
  write_json(paths["json"], data)
  _write_text(paths["md"], markdown)
  return paths
