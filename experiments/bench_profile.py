"""Where a compiled step's time goes, from a `jax.profiler` trace of a few steady-state calls.

`profile_calls` traces a few calls of a compiled function (`jax.profiler.trace`), reads the
XSpace protobuf the profiler writes back through the reader JAX ships
(`jax.profiler.ProfileData.from_file`: planes, lines, events and their stats), and keeps
the events of the function's own HLO module (stat `hlo_module`) that name an HLO
instruction (stat `hlo_op`). On a GPU or TPU those are the kernels on the device plane
(`/device:GPU:0`, one line per stream); on XLA:CPU, which has no device plane, the thunks
on the host plane's XLA threads (`/host:CPU`).

Each event is attributed by the instruction the trace names, looked up in the compiled
module's own HLO (`compiled.as_text()`): its opcode, the opcodes fused into it, its
custom-call target, and the JAX scope its `op_name` metadata records. The model marks
Eq. 6 with `jax.named_scope("attention")` (`models/tmsa.py`) and the trainer the loss
with `"diffusion_loss"` (`train.make_loss_fn`), so attention and the optimizer are found
by scope, not guessed from kernel names. Only an event whose op is missing from the HLO
falls back to the trace's own `hlo_category` stat, where it has one.

Time is exclusive: on one line a nested event's time is its own, not its parent's (an
XLA:CPU while loop runs its body's thunks inside its own event), and where several lines
run at once (XLA:CPU's thread pool, GPU streams) each instant is split equally between
the ops running then. Instants with no op running are idle; the categories plus idle add
up to the traced span (first op start to last op end), so the percentages sum to 100%.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import time
from typing import Any, Callable, NamedTuple

# The categories of the breakdown, in the order the report lists them.
MATMUL = "matmul (dot / convolution / gemm)"
ATTENTION = "attention (Eq. 6: fused kernel, or XLA's dots + softmax)"
REDUCTION = "LayerNorm / other reductions"
ELEMENTWISE = "GELU / other elementwise"
OPTIMIZER = "optimizer + EMA update (after the gradients)"
CAST = "casts / converts"
MOVEMENT = "copies / transposes / slicing / gather-scatter"
COLLECTIVE = "collectives"
RANDOM = "random numbers"
CONTROL = "control flow / other"
IDLE_IN_STEP = "idle inside a step (no op running)"
IDLE_BETWEEN = "idle between steps (host: dispatch, sync)"
IDLE = "idle (no op running)"
CATEGORIES = (MATMUL, ATTENTION, REDUCTION, ELEMENTWISE, OPTIMIZER, CAST, MOVEMENT,
              COLLECTIVE, RANDOM, CONTROL, IDLE_IN_STEP, IDLE_BETWEEN, IDLE)

ATTENTION_SCOPE = "attention"     # models/tmsa.py: attention()
LOSS_SCOPE = "diffusion_loss"     # train.make_loss_fn: forward and backward

_MATMUL_OPS = {"dot", "convolution", "ragged-dot", "scaled-dot"}
_COLLECTIVE_OPS = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                   "collective-permute", "collective-broadcast", "ragged-all-to-all"}
_COLLECTIVE_OPS |= {f"{op}-{part}" for op in set(_COLLECTIVE_OPS) for part in ("start", "done")}
_MOVEMENT_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "reshape",
                 "broadcast", "transpose", "copy", "copy-start", "copy-done", "slice",
                 "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "reverse",
                 "iota", "gather", "scatter"}
_CONVERT_OPS = {"convert", "bitcast-convert"}
_REDUCE_OPS = {"reduce", "reduce-window", "select-and-scatter", "sort"}
_RANDOM_OPS = {"rng", "rng-bit-generator", "rng-get-and-update-state"}
_CONTROL_OPS = {"while", "conditional", "call", "async-start", "async-update", "async-done",
                "send", "send-done", "recv", "recv-done", "infeed", "outfeed", "after-all",
                "opt-barrier", "custom-call"}
# JAX's random functions, as their jit names appear in op_name ("jit(_normal)/...").
_RANDOM_SCOPE = re.compile(r"jit\((_normal|_uniform|_randint|_bernoulli|_gamma|_truncated_normal"
                           r"|_threefry\w*|_random_bits|_fold_in)\)|threefry2x32|random_bits")
# Custom calls (cuDNN, cuBLAS, oneDNN) by target: fused attention first, then GEMMs.
_ATTENTION_TARGET = re.compile(r"fmha|flash|attention", re.IGNORECASE)
_MATMUL_TARGET = re.compile(r"gemm|matmul|cublas|conv", re.IGNORECASE)
# Lines of a device plane that XLA's tools derive from the kernels (the same time again).
_DERIVED_LINES = ("XLA Modules", "Steps", "TensorFlow Ops", "TensorFlow Name Scope",
                  "Framework Ops", "Framework Name Scope", "Source code", "XLA TraceMe")


def in_scope(op_name: str, scope: str) -> bool:
  """Whether `op_name` ("jit(f)/transpose(jvp(scope))/...") lies inside named scope `scope`."""
  return re.search(rf"(^|[/(]){re.escape(scope)}([/)]|$)", op_name) is not None


# ----------------------------------------------------------------------------------------
# The compiled module's HLO: what each traced instruction is.


class Instruction(NamedTuple):
  name: str
  opcode: str
  computation: str
  called: tuple[str, ...]      # computations it calls (fused, to_apply, body, ...)
  target: str                  # custom_call_target, or ""
  fusion_kind: str             # e.g. "kLoop", "kCustom", or ""
  backend_kind: str            # backend_config's "kind", e.g. "__triton_gemm", or ""
  op_name: str                 # metadata op_name (the JAX scope and primitive), or ""


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _skip_shape(rest: str) -> str:
  """`rest` after the result shape: a tuple shape "(...)" may hold spaces and comments."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[i + 1:]
  return rest.split(" ", 1)[1] if " " in rest else ""


def parse_hlo(hlo_text: str) -> tuple[str, dict[str, Instruction], dict[str, list[str]]]:
  """(module name, {instruction name: Instruction}, {computation: [instruction names]})."""
  module = ""
  instructions: dict[str, Instruction] = {}
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line.startswith("HloModule "):
      module = line.split()[1].rstrip(",")
      continue
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
      computations[current] = []
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _LINE.match(line)
    if current is None or not m:
      continue
    name, rest = m.groups()
    opcode = re.match(r"\s*([\w\-]+)", _skip_shape(rest.strip()))
    called = re.findall(r"(?:calls|to_apply|body|condition|branch_computations)="
                        r"(\{[^}]*\}|%?[\w.\-]+)", rest)
    called = tuple(c.strip("%") for group in called for c in re.split(r"[{},\s]+", group)
                   if c.strip("%"))
    get = lambda pattern: (re.search(pattern, rest) or [None, ""])[1]
    instructions[name] = Instruction(
        name=name, opcode=opcode.group(1) if opcode else "", computation=current,
        called=called, target=get(r'custom_call_target="([^"]*)"'),
        fusion_kind=get(r"kind=(k\w+)"), backend_kind=get(r'"kind":"([^"]*)"'),
        op_name=get(r'op_name="([^"]*)"'))
    computations[current].append(name)
  return module, instructions, computations


def _fused(ins: Instruction, instructions: dict, computations: dict) -> list[Instruction]:
  """The instructions a fusion (or an async wrapper) computes, nested calls included."""
  if ins.opcode not in ("fusion", "async-start"):
    return [ins]
  out, todo, seen = [], list(ins.called), set()
  while todo:
    comp = todo.pop()
    if comp in seen:
      continue
    seen.add(comp)
    for name in computations.get(comp, ()):
      inner = instructions[name]
      out.append(inner)
      todo.extend(inner.called)
  return out or [ins]


def classify(ins: Instruction, instructions: dict, computations: dict,
             loss_scope: str | None = LOSS_SCOPE) -> str:
  """The breakdown category of one HLO instruction (see the module docstring).

  `loss_scope`: the named scope of the forward and backward; ops outside it (and not
  random numbers) are the optimizer and EMA update. None for programs without one.
  """
  body = _fused(ins, instructions, computations)
  ops = {i.opcode for i in body}
  targets = " ".join(i.target for i in body)
  matmuls = [i for i in body if i.opcode in _MATMUL_OPS]
  root = next((i for i in reversed(body) if i.op_name), None)
  # The op a fusion is "about": its matmul if it has one, else its root's (or its own) scope.
  hero_names = [i.op_name for i in matmuls if i.op_name] or (
      [ins.op_name] if ins.op_name else [root.op_name] if root else [])
  all_names = [i.op_name for i in body if i.op_name] + ([ins.op_name] if ins.op_name else [])
  if ops & _COLLECTIVE_OPS:
    return COLLECTIVE
  if _ATTENTION_TARGET.search(targets) or any(in_scope(n, ATTENTION_SCOPE) for n in hero_names):
    return ATTENTION
  if matmuls or (ins.opcode == "custom-call" and _MATMUL_TARGET.search(ins.target)) or (
      "gemm" in ins.backend_kind):
    return MATMUL
  if ops & _RANDOM_OPS or any(_RANDOM_SCOPE.search(n) for n in hero_names):
    return RANDOM
  if loss_scope and all_names and not any(in_scope(n, loss_scope) for n in all_names):
    return OPTIMIZER
  computing = ops - _MOVEMENT_OPS
  if computing and computing <= _CONVERT_OPS:
    return CAST
  if not computing:
    return MOVEMENT
  if ins.opcode in _CONTROL_OPS:
    return CONTROL
  if ops & _REDUCE_OPS:
    return REDUCTION
  return ELEMENTWISE


def _category_from_trace(hlo_category: str) -> str:
  """For an op missing from the HLO: the category the trace's `hlo_category` stat gives."""
  c = hlo_category.lower()
  for words, category in ((("convolution", "dot", "gemm", "matmul"), MATMUL),
                          (("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                            "collective"), COLLECTIVE),
                          (("data formatting", "copy", "transpose"), MOVEMENT),
                          (("reduce",), REDUCTION), (("elementwise", "fusion"), ELEMENTWISE)):
    if any(w in c for w in words):
      return category
  return CONTROL


# ----------------------------------------------------------------------------------------
# The trace: the module's op events.


class OpEvent(NamedTuple):
  line: int           # index of the (plane, line) the event is on
  start_ns: float
  end_ns: float
  hlo_op: str         # the HLO instruction ("" for a device event that names none)
  kernel: str         # the event's own name: the kernel on a GPU, the op on XLA:CPU
  run_id: Any         # which execution of the module (None where the trace has no run_id)
  hlo_category: str   # the trace's own category stat, where it has one


def op_events(profile: Any, module: str, *, device: bool) -> tuple[list[OpEvent], dict]:
  """The events of HLO module `module` in a `jax.profiler.ProfileData`, and what was read.

  With `device` (a GPU or TPU run) the first device plane (`/device:...`) holding the
  module's events; otherwise the host plane, where XLA:CPU records its thunks. On a device
  plane, lines derived by the profiler from the kernels (`_DERIVED_LINES`, e.g. "XLA
  Modules", "Steps") are skipped, and if there are per-stream lines ("Stream #...") only
  those are read, so no time is counted twice.
  """
  planes = [p for p in profile.planes
            if p.name.startswith("/device:" if device else "/host:CPU")]
  chosen, lines = None, []
  for plane in sorted(planes, key=lambda p: p.name):
    for line in plane.lines:
      events = [(e, dict(e.stats)) for e in line.events]
      if any(s.get("hlo_module") == module for _, s in events):
        lines.append((line.name, events))
    if lines:
      chosen = plane.name
      break
  if chosen is None:
    where = "a device plane (/device:...)" if device else "the host plane (/host:CPU)"
    raise ValueError(f"the trace has no events of HLO module {module!r} on {where}; its "
                     f"planes: {[p.name for p in profile.planes]}"
                     + (" (on NVIDIA GPUs the profiler needs CUPTI)" if device else ""))
  if device:
    lines = [(n, ev) for n, ev in lines if n not in _DERIVED_LINES]
    if any(n.startswith("Stream") for n, _ in lines):
      lines = [(n, ev) for n, ev in lines if n.startswith("Stream")]
    elif any(n == "XLA Ops" for n, _ in lines):
      lines = [(n, ev) for n, ev in lines if n == "XLA Ops"]
  events: list[OpEvent] = []
  for index, (_, line_events) in enumerate(lines):
    for e, stats in line_events:
      mine = stats.get("hlo_module") == module and "hlo_op" in stats
      if not mine and not (device and "hlo_module" not in stats):
        continue  # host bookkeeping, or another module's kernel
      events.append(OpEvent(index, float(e.start_ns), float(e.start_ns + e.duration_ns),
                            str(stats.get("hlo_op", "")), str(e.name), stats.get("run_id"),
                            str(stats.get("hlo_category", ""))))
  mine = [e for e in events if e.hlo_op]
  if mine:  # a device's un-annotated events (memcpy, memset) count inside the module's span
    lo, hi = min(e.start_ns for e in mine), max(e.end_ns for e in mine)
    events = [e for e in events if e.hlo_op or (e.start_ns >= lo and e.end_ns <= hi)]
  return events, dict(planes=[p.name for p in profile.planes], plane=chosen,
                      lines=[n for n, _ in lines], events=len(events))


def exclusive_times(events: list[OpEvent]) -> tuple[list[float], float, list[tuple]]:
  """Each event's exclusive time (ns), the idle time, and the idle intervals.

  A sweep over every start and end: in each elementary interval, each line's innermost
  running event (the latest started) holds the line, and the interval's length is split
  equally between the lines held. An interval no line holds is idle.
  """
  points = sorted({e.start_ns for e in events} | {e.end_ns for e in events})
  starts = collections.defaultdict(list)
  ends = collections.defaultdict(list)
  for i, e in enumerate(events):
    starts[e.start_ns].append(i)
    ends[e.end_ns].append(i)
  active: dict[int, dict[int, float]] = collections.defaultdict(dict)  # line -> {event: start}
  exclusive = [0.0] * len(events)
  idle, gaps = 0.0, []
  for t0, t1 in zip(points, points[1:]):
    for i in ends.get(t0, ()):
      active[events[i].line].pop(i, None)
    for i in starts.get(t0, ()):
      if events[i].end_ns > t0:
        active[events[i].line][i] = t0
    holders = [max(running, key=lambda i: (running[i], -events[i].end_ns))
               for running in active.values() if running]
    if not holders:
      idle += t1 - t0
      gaps.append((t0, t1))
      continue
    share = (t1 - t0) / len(holders)
    for i in holders:
      exclusive[i] += share
  return exclusive, idle, gaps


# ----------------------------------------------------------------------------------------
# The breakdown.


def breakdown(events: list[OpEvent], hlo_text: str, *, calls: int,
              loss_scope: str | None = LOSS_SCOPE, top: int = 12) -> dict[str, Any]:
  """Per category and per kernel: ms per call and % of the traced span; see `profile_calls`."""
  module, instructions, computations = parse_hlo(hlo_text)
  if not events:
    raise ValueError(f"the trace holds no events of HLO module {module!r}")
  exclusive, idle, gaps = exclusive_times(events)
  span = max(e.end_ns for e in events) - min(e.start_ns for e in events)
  cache: dict[str, str] = {}
  unmatched = collections.Counter()

  def category(e: OpEvent) -> str:
    if not e.hlo_op:
      return CONTROL
    if e.hlo_op not in cache:
      ins = instructions.get(e.hlo_op)
      if ins is None:
        unmatched[e.hlo_op] += 1
        return _category_from_trace(e.hlo_category) if e.hlo_category else CONTROL
      cache[e.hlo_op] = classify(ins, instructions, computations, loss_scope)
    return cache[e.hlo_op]

  per_category = collections.Counter()
  count = collections.Counter()
  kernels: dict[tuple[str, str], list] = {}
  for e, ns in zip(events, exclusive):
    c = category(e)
    per_category[c] += ns
    count[c] += 1
    k = kernels.setdefault((e.kernel, e.hlo_op), [0.0, 0, c])
    k[0] += ns
    k[1] += 1
  # Idle inside an execution of the module (between its first and last op) or between two.
  runs: dict[Any, list[float]] = {}
  if all(e.run_id is not None for e in events if e.hlo_op):
    for e in events:
      if e.hlo_op:
        w = runs.setdefault(e.run_id, [e.start_ns, e.end_ns])
        w[0], w[1] = min(w[0], e.start_ns), max(w[1], e.end_ns)
  if len(runs) > 1:
    windows = sorted(runs.values())
    inside = min(idle, sum(max(0.0, min(g1, w1) - max(g0, w0))
                           for g0, g1 in gaps for w0, w1 in windows))
    per_category[IDLE_IN_STEP] = inside
    per_category[IDLE_BETWEEN] = idle - inside
  else:
    per_category[IDLE] = idle
  ms = lambda ns: ns / 1e6 / calls
  rows = [dict(category=c, ms_per_call=round(ms(per_category[c]), 4),
               percent=round(100.0 * per_category[c] / span, 2),
               events_per_call=round(count[c] / calls, 1))
          for c in CATEGORIES if c in per_category]
  top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(
      module=module, calls=calls, executions_seen=len(runs) or None,
      traced_ms_per_call=round(ms(span), 4), rows=rows,
      percent_sum=round(sum(r["percent"] for r in rows), 2),
      top_kernels=[dict(kernel=k, hlo_op=op, category=c, ms_per_call=round(ms(ns), 4),
                        percent=round(100.0 * ns / span, 2), count_per_call=n / calls)
                   for (k, op), (ns, n, c) in top_kernels],
      events=len(events), ops_missing_from_hlo=dict(unmatched.most_common(10)))


def profile_calls(run: Callable[[], None], hlo_text: str, trace_dir: str, *, calls: int,
                  loss_scope: str | None = LOSS_SCOPE) -> dict[str, Any]:
  """Traces `calls` calls of `run` (warm: already compiled and run) and breaks them down.

  Args:
    run: one call of the compiled function, waiting for its result.
    hlo_text: the compiled function's HLO (`compiled.as_text()`), naming its instructions.
    trace_dir: where the profiler writes (`plugins/profile/<time>/<host>.xplane.pb`; open it
      in TensorBoard's or XProf's profile tab).
    calls: how many calls to trace.
    loss_scope: see `classify`.

  Returns:
    `breakdown`'s dict plus the trace's path, what was read, and the seconds it all took.
  """
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  os.makedirs(trace_dir, exist_ok=True)
  before = set(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # Python's own calls would slow the host between steps
  with jax.profiler.trace(trace_dir, profiler_options=options):
    for _ in range(calls):
      run()
  new = sorted(set(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
               - before, key=os.path.getmtime)
  if not new:
    raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
  traced_s = time.perf_counter() - start
  profile = jax.profiler.ProfileData.from_file(new[-1])
  module = parse_hlo(hlo_text)[0]
  events, read = op_events(profile, module, device=jax.default_backend() != "cpu")
  result = breakdown(events, hlo_text, calls=calls, loss_scope=loss_scope)
  result.update(trace=new[-1], read=read, trace_s=round(traced_s, 2),
                analysis_s=round(time.perf_counter() - start - traced_s, 2))
  return result


def markdown(profile: dict[str, Any], *, step_ms: float | None = None,
             top: int = 8) -> list[str]:
  """The breakdown and the top kernels as markdown lines."""
  timed = f"; the timed loop measured {step_ms:.2f} ms per call" if step_ms else ""
  read = profile["read"]
  lines = [f"{profile['calls']} calls traced, {profile['traced_ms_per_call']:.2f} ms per call "
           f"from the first op to the last{timed}; {profile['events']} op events on "
           f"{len(read['lines'])} line(s) of {read['plane']}.", "",
           "| where the time goes | ms per call | % of traced time | events per call |",
           "|---|---|---|---|"]
  for r in profile["rows"]:
    idle = r["category"] in (IDLE, IDLE_IN_STEP, IDLE_BETWEEN)
    n = "-" if idle else f"{r['events_per_call']:g}"
    lines.append(f"| {r['category']} | {r['ms_per_call']:.3f} | {r['percent']:.1f}% | {n} |")
  lines.append(f"| total | {sum(r['ms_per_call'] for r in profile['rows']):.3f} | "
               f"{profile['percent_sum']:.1f}% | |")
  if profile.get("ops_missing_from_hlo"):
    lines += ["", f"Ops the trace names that the HLO lacks (classified by the trace's "
              f"hlo_category): {profile['ops_missing_from_hlo']}"]
  lines += ["", "| top kernels | HLO op | category | ms per call | % |", "|---|---|---|---|---|"]
  short = lambda s: s if len(s) <= 60 else s[:57] + "..."
  for k in profile["top_kernels"][:top]:
    kernel = "" if k["kernel"] == k["hlo_op"] else short(k["kernel"])
    lines.append(f"| {kernel or '(the op itself)'} | {k['hlo_op'] or '-'} | "
                 f"{k['category'].split(' (')[0]} | {k['ms_per_call']:.3f} | {k['percent']:.1f}% |")
  return lines
