"""The TPU compiler's own plans for the tables users read before renting TPUs, from any machine.

    .venv/bin/python experiments/tpu_plans.py [--only=train|sampling|finetune] [--max_rows=N]

Compiles, with libtpu on this machine (no TPU; see `diffit_jax.tpu`), the XL/2 train step
(ImageNet-256 and -512, fp32 and bf16, global batch 256) on v5e-8, v5e-64, v4-8, v5p-8 and
v6e-8, replicated, FSDP over every chip, and rematerialised (scanned blocks); the guided
sampler of the 50,000-sample FID protocol with its VAE decode on a v5e-8 and one v5e chip;
and the fine-tune recipe (`configs/finetune_latent.py`) on one chip. Each row is the plan
per chip and the roofline bound from the compiler's FLOPs and bytes (a bound, not a
measurement). Rows are appended to experiments/results/tpu_plans.json as they finish, and
a run skips the rows already there, so a long table can be built over several runs; the
README's summary and docs/performance.md's tables are rewritten from them at the end.
An XL/2 row compiles in about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_platforms", "cpu")  # JAX runs on the CPU; the TPU is only compiled for

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_common import RESULTS_DIR, ROOT, machine_info, write_results  # noqa: E402

from diffit_jax import config_lib, plan, sharding, tpu  # noqa: E402

NAME = "tpu_plans"
TRAIN_SLICES = ("v5e-8", "v5e-64", "v4-8", "v5p-8", "v6e-8")
STRATEGIES = {  # config fields of each way to hold the train step
    "replicated": {},
    "FSDP": {"mesh.fsdp": -1, "mesh.data": 1},
    "remat": {"model.remat": True, "model.scan_blocks": True},
}
GLOBAL_BATCH = 256
FID_SAMPLES = 50_000


def load(name: str, fields: dict) -> config_lib.ConfigDict:
  config = config_lib.load_config(os.path.join(ROOT, "configs", name + ".py"))
  return plan.with_fields(config, fields)


def train_rows():
  for resolution, name in ((256, "imagenet256_latent"), (512, "imagenet512_latent")):
    for dtype in ("float32", "bfloat16"):
      for slice_name in TRAIN_SLICES:
        for strategy, fields in STRATEGIES.items():
          key = f"train XL/2-{resolution} {dtype} {slice_name} {strategy}"
          fields = {**fields, "batch_size": GLOBAL_BATCH, "model.dtype": dtype}
          yield key, dict(kind="train", config=name, slice=slice_name, resolution=resolution,
                          dtype=dtype, strategy=strategy, fields=fields)


def sampling_rows():
  for slice_name, batch in (("v5e-8", 256), ("v5e-1", 32)):
    yield (f"sampling XL/2-256 {slice_name} batch {batch}",
           dict(kind="sampling", config="imagenet256_latent", slice=slice_name, batch=batch,
                fields={}))


def finetune_rows():
  remat = STRATEGIES["remat"]
  for strategy, fields in (("recipe", {}), ("recipe + remat", remat),
                           ("recipe + remat, batch 16", {**remat, "batch_size": 16})):
    yield (f"finetune XL/2-256 v5e-1 {strategy}",
           dict(kind="train", config="finetune_latent", slice="v5e-1", resolution=256,
                dtype="float32", strategy=strategy, fields=fields))


def measure(row: dict, devices_of) -> dict:
  config = load(row["config"], row["fields"])
  tpu_slice = tpu.parse_slice(row["slice"])
  devices = devices_of(row["slice"])
  mesh = sharding.create_mesh(config.mesh, devices)
  chip = tpu_slice.chip
  out = dict(row, chips=tpu_slice.num_chips, hosts=tpu.num_hosts(devices), chip=chip.name,
             hbm_gib=chip.hbm_gib, mesh=dict(mesh.shape))
  if row["kind"] == "train":
    p = plan.compile_plan_or_refusal(plan.train_step(config, mesh))
    items = int(config.batch_size)
    out["batch"] = items
    if isinstance(p, plan.Plan):
      p = plan.with_train_step_work(p, config, items // mesh.size)
  else:
    p = plan.compile_plan_or_refusal(plan.sampler(config, mesh, row["batch"]))
    if isinstance(p, plan.Plan):
      p = plan.with_unrolled_work(p, *plan.sampler_work(config, row["batch"] // mesh.size))
    d = plan.compile_plan_or_refusal(plan.vae_decode(config, mesh, row["batch"]))
    items = row["batch"]
    out["decode"] = plan_dict(d, tpu_slice)
    out["sampler"] = dict(name=config.sampler.name, num_steps=int(config.sampler.num_steps),
                          guidance=float(config.sampler.guidance.scale))
  out.update(plan_dict(p, tpu_slice))
  if out["bound_s"] is not None:
    seconds = out["bound_s"] + (out.get("decode", {}).get("bound_s") or 0.0)
    out["bound_items_per_s"] = items / seconds if seconds else None
    if row["kind"] == "sampling":
      out["fid_50k_bound_minutes"] = -(-FID_SAMPLES // items) * seconds / 60
  return out


def plan_dict(p: plan.Plan | plan.DoesNotFitError, tpu_slice: tpu.Slice) -> dict:
  if isinstance(p, plan.DoesNotFitError):  # the TPU compiler refuses what exceeds the HBM
    return dict(fits=False, refused=p.reason, compile_s=round(p.compile_seconds, 1),
                state_gib=None, temp_gib=None, program_gib=None, total_gib=None, bound_s=None,
                bound_items_per_s=None)
  gib = lambda b: round(b / plan.GIB, 3)
  return dict(state_gib=gib(p.arguments), temp_gib=gib(p.temporaries),
              program_gib=gib(p.code), total_gib=gib(p.total + p.code),
              fits=plan.fits(p, tpu_slice), tflops=p.flops / 1e12,
              gb_accessed=p.bytes_accessed / 1e9,
              bound_s=plan.roofline_seconds(p, tpu_slice.chip.peak_tflops,
                                            tpu_slice.chip.hbm_gbps),
              flops_only=p.partial_bytes,
              compile_s=round(p.compile_seconds, 1))


def _train_row(r: dict) -> str:
  only = " (FLOPs only)" if r.get("flops_only", r["strategy"] == "remat") else ""
  if r.get("refused"):
    figures = f"refused by the compiler: {r['refused']} | | | no | |"
  else:
    figures = (f"{r['state_gib']:.2f} | {r['temp_gib']:.2f} | {r['total_gib']:.2f} / "
               f"{r['hbm_gib']:g} | {'yes' if r['fits'] else 'no'} | "
               f"{r['bound_items_per_s']:,.0f}{only} |")
  return (f"| {r['config']} | {r['dtype']} | {r['slice']} | {r['chips']} ({r['hosts']}) | "
          f"{r['strategy']} | {r['batch']} | {figures} {r['compile_s']:.0f} |")


def summary(rows: list[dict]) -> list[str]:
  """One line per slice: GiB per chip of each way to hold the XL/2-256 step ("no": refused)."""
  cols = [(d, st) for d in ("float32", "bfloat16") for st in STRATEGIES]
  lines = ["| XL/2-256, global batch 256 | " + " | ".join(
      f"{'fp32' if d == 'float32' else 'bf16'} {st}" for d, st in cols) + " |",
           "|" + "---|" * (len(cols) + 1)]
  by_key = {r["key"]: r for r in rows}
  for slice_name in TRAIN_SLICES:
    cells = []
    for d, st in cols:
      r = by_key.get(f"train XL/2-256 {d} {slice_name} {st}")
      cells.append("not yet" if r is None else "no (refused)" if r.get("refused")
                   else f"{r['total_gib']:.1f} GiB")
    chip = tpu.parse_slice(slice_name).chip
    lines.append(f"| {slice_name} ({chip.hbm_gib:g} GiB/chip) | " + " | ".join(cells) + " |")
  return lines


def markdown(rows: list[dict], machine: dict) -> str:
  lines = ["# TPU plans (libtpu's compiler on a CPU machine; no TPU ran)", "",
           f"libtpu {machine.get('libtpu', '?')}, jax {jax.__version__}. Per chip: the "
           "compiler's memory plan (state and batch, temporaries, the program) against the "
           "chip's HBM; the roofline bound is the compiler's FLOPs at the chip's bf16 peak or "
           "its bytes at the HBM bandwidth, whichever is slower: a bound, not a measurement. "
           "XLA counts a loop's body once: FLOPs are the unrolled network's (x 3 for a train "
           "step, x the network evaluations for a sampler); the bytes of scanned blocks "
           "(the remat rows) see one block, so those bounds are the FLOPs' alone, not "
           "comparable with the others' (remat's extra forward adds about a third to them).",
           "", "## Summary: per-chip plan of the XL/2-256 train step", "", *summary(rows), ""]
  header = ["| config | dtype | slice | chips (hosts) | strategy | batch | state GiB | "
            "temporaries GiB | total GiB / HBM | fits | bound img/s | compile s |",
            "|" + "---|" * 12]
  for title, finetune in (("XL/2 train step, global batch 256", False),
                          ("The fine-tune recipe (configs/finetune_latent.py) on one chip", True)):
    lines += [f"## {title}", "", *header]
    lines += [_train_row(r) for r in rows if r["kind"] == "train"
              and (r["config"] == "finetune_latent") == finetune]
    lines.append("")
  lines += ["## Sampling (the FID protocol: 50,000 samples, guided DDPM with the VAE decode)",
            "", "| slice | batch | sampler | sampler GiB | decode GiB | fits | bound samples/s "
            "| 50,000 samples at least | compile s |", "|" + "---|" * 9]
  for r in rows:
    if r["kind"] != "sampling":
      continue
    s, d = r["sampler"], r["decode"]
    if r.get("refused") or d.get("refused"):
      lines.append(f"| {r['slice']} | {r['batch']} | {s['name']} {s['num_steps']} steps | "
                   f"refused by the compiler: {r.get('refused') or d.get('refused')} | | no | | "
                   f"| {r['compile_s'] + d['compile_s']:.0f} |")
      continue
    lines.append(f"| {r['slice']} | {r['batch']} | {s['name']} {s['num_steps']} steps, guidance "
                 f"{s['guidance']:g} | {r['total_gib']:.2f} | {d['total_gib']:.2f} | "
                 f"{'yes' if r['fits'] and d['fits'] else 'no'} | {r['bound_items_per_s']:.1f} | "
                 f"{r['fid_50k_bound_minutes']:.0f} min | {r['compile_s'] + d['compile_s']:.0f} |")
  return "\n".join(lines) + "\n"


DOCS_START = "<!-- tpu_plans: from experiments/results/tpu_plans.json -->"
DOCS_END = "<!-- /tpu_plans -->"


def update_docs(rows: list[dict], machine: dict) -> None:
  """Puts the summary into README.md and the tables into docs/performance.md, between the
  DOCS_START / DOCS_END markers there."""
  sections = markdown(rows, machine).split("\n## ", 1)[1]  # without the page's title
  for name, text in (("README.md", "\n".join(summary(rows))),
                     (os.path.join("docs", "performance.md"),
                      ("### " + sections.replace("\n## ", "\n### ")).rstrip())):
    path = os.path.join(ROOT, name)
    with open(path) as f:
      page = f.read()
    start, end = page.index(DOCS_START), page.index(DOCS_END)
    with open(path, "w") as f:
      f.write(page[:start] + f"{DOCS_START}\n{text}\n" + page[end:])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", choices=("train", "sampling", "finetune"), default=None)
  parser.add_argument("--max_rows", type=int, default=0, help="stop after this many new rows")
  parser.add_argument("--keys", default="", help="comma-separated substrings: only rows whose "
                      "key contains one")
  args = parser.parse_args()
  path = os.path.join(RESULTS_DIR, NAME + ".json")
  import json  # pylint: disable=g-import-not-at-top
  done = json.load(open(path))["rows"] if os.path.exists(path) else []
  have = {r["key"] for r in done}
  groups = {"train": train_rows, "sampling": sampling_rows, "finetune": finetune_rows}
  todo = [(k, r) for g, rows in groups.items() if args.only in (None, g) for k, r in rows()
          if k not in have and (not args.keys or any(s in k for s in args.keys.split(",")))]
  cache = {}
  devices_of = lambda name: cache.setdefault(name, tpu.compile_only_devices(name))
  machine = machine_info({"libtpu": tpu.LIBTPU_VERSION})
  for i, (key, row) in enumerate(todo[:args.max_rows or None]):
    start = time.perf_counter()
    print(f"[tpu_plans] {i + 1}/{len(todo)} {key} ...", flush=True)
    done.append({"key": key, **measure(row, devices_of)})
    r = done[-1]
    figure = f"{r['total_gib']:.2f} GiB per chip" if r["total_gib"] is not None else r["refused"]
    print(f"[tpu_plans]   {figure}, {time.perf_counter() - start:.0f} s", flush=True)
    write_results(RESULTS_DIR, NAME, {"machine": machine, "rows": done}, markdown(done, machine))
  update_docs(done, machine)


if __name__ == "__main__":
  main()
