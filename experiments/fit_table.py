"""Will it fit: per-device memory of the DiffiT-XL/2 train step before renting hardware.

Runs `python -m diffit_jax.main --config=configs/imagenet256_latent.py --dry_run
--dry_run_devices=N` for global batch 256 on 8 and 64 devices, parameters replicated
(`config.mesh.fsdp=1`) or sharded over 8 devices (`config.mesh.fsdp=8`), with and without
rematerialisation (`config.model.remat=True`, which scans the blocks), and collects the
per-device figure each prints: XLA's memory plan of the step compiled for N virtual CPU
devices. Each run is a process of its own (JAX's CPU device count is fixed at start).

  python experiments/fit_table.py            # about 15 minutes on a 2-core CPU
  python experiments/fit_table.py --devices 8 --precision bf16

Writes experiments/results/fit_xl2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from bench_common import RESULTS_DIR, ROOT, write_results

LINE = re.compile(r"train_step_memory_per_device: ([\d.]+) GiB = state and batch ([\d.]+) GiB "
                  r"\+ XLA temporaries ([\d.]+) GiB")


def estimate(devices: int, fsdp: int, remat: bool, batch: int, precision: str) -> dict:
  """One dry run; returns its per-device figures in GiB."""
  overrides = [f"--config.batch_size={batch}", f"--config.mesh.fsdp={fsdp}",
               "--config.mesh.data=-1",
               f"--config.model.dtype={'bfloat16' if precision == 'bf16' else 'float32'}"]
  if remat:
    overrides += ["--config.model.scan_blocks=True", "--config.model.remat=True"]
  command = [sys.executable, "-m", "diffit_jax.main",
             "--config=" + os.path.join(ROOT, "configs", "imagenet256_latent.py"), "--dry_run",
             f"--dry_run_devices={devices}"] + overrides
  start = time.perf_counter()
  out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  match = LINE.search(out)
  if not match:
    raise RuntimeError(f"no memory line in the output of {' '.join(command)}:\n{out[-2000:]}")
  total, state, temp = (float(x) for x in match.groups())
  return dict(devices=devices, fsdp=fsdp, remat=remat, batch=batch, precision=precision,
              total_gib=total, state_and_batch_gib=state, temporaries_gib=temp,
              seconds=round(time.perf_counter() - start, 1),
              command="python -m diffit_jax.main " + " ".join(command[3:]).replace(ROOT + "/", ""))


def markdown(rows: list[dict], precision: str) -> str:
  lines = [f"| devices | parameters | remat | per-device batch | state + batch GiB | "
           f"temporaries GiB | total GiB |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    params = "replicated" if r["fsdp"] == 1 else f"FSDP over {r['fsdp']}"
    lines.append(f"| {r['devices']} | {params} | {'yes' if r['remat'] else 'no'} | "
                 f"{r['batch'] // r['devices']} | {r['state_and_batch_gib']:.2f} | "
                 f"{r['temporaries_gib']:.2f} | {r['total_gib']:.2f} |")
  return (f"XL/2 train step, global batch {rows[0]['batch']}, {precision}, XLA:CPU's plan per "
          "device (see docs/performance.md for how it compares with a GPU's)\n\n"
          + "\n".join(lines) + "\n")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="8,64")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--out_dir", default=RESULTS_DIR)
  args = p.parse_args()
  rows = []
  for devices in (int(d) for d in args.devices.split(",")):
    for fsdp in (1, 8):
      for remat in (False, True):
        rows.append(estimate(devices, fsdp, remat, args.batch, args.precision))
        print(json.dumps(rows[-1]), flush=True)
  name = "fit_xl2" + ("" if args.precision == "fp32" else "_bf16")
  write_results(args.out_dir, name, rows, markdown(rows, args.precision))
  print(markdown(rows, args.precision))


if __name__ == "__main__":
  main()
