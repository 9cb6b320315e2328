"""Smoke test of experiments/accelerator_check.py: every case runs, at toy sizes, on CPU.

The check is meant for a machine that has JAX, Flax, Optax, Orbax and PyTorch but not the
input-pipeline packages, so the run here hides grain, tensorflow-datasets, clu and
array_record from every process it starts: importing any of them fails the case.
Timings are not checked (they are noise on a shared CPU), only that each case measured
something and that the report and its targets are written.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As if not installed: `import grain` fails, `importlib.util.find_spec("grain")` is None.
BLOCKER = '''
import sys
for name in ("grain", "tensorflow_datasets", "clu", "array_record"):
  sys.modules[name] = None
'''


def test_smoke_run_measures_every_case_without_the_input_pipeline(tmp_path):
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(BLOCKER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(site), ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  out = tmp_path / "results"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "accelerator_check.py"), "--smoke",
       "--out_dir", str(out)], env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((out / "accelerator_smoke.json").read_text())
  assert (out / "accelerator_smoke.md").read_text().startswith("# diffit_jax accelerator check")
  cases = report["cases"]
  errors = {n: c["error"] for n, c in cases.items() if "error" in c}
  assert not errors, errors
  # On CPU: cuDNN and torch.compile are skipped with their reasons; everything else ran.
  assert "NVIDIA GPU" in cases["jax_train_bf16_cudnn_scan"]["skipped"]
  assert "smoke" in cases["torch_compile_bf16"]["skipped"]
  measured = {n for n, c in cases.items() if "skipped" not in c}
  assert {"jax_train_bf16_xla_scan", "jax_train_bf16_xla_unrolled",
          "jax_train_bf16_xla_scan_remat", "jax_sample_bf16", "jax_sample_fp32",
          "torch_eager_bf16", "torch_eager_fp32"} <= measured
  assert "torch_compile_fp32" not in cases  # not a default case
  for name in measured:
    c = cases[name]
    train = c if name.startswith("jax_train") else c.get("train")
    sample = c if name.startswith("jax_sample") else c.get("sample")
    if train:
      assert train["images_per_s"] > 0 and train["step_s"] > 0
    if name.startswith("jax_train"):
      assert c["xla_memory"]["total_gib"] > 0 and c["compile_s"] > 0
      assert c["train_flops_per_step"] > 0 and c["mfu_vs_measured_matmul"] > 0
    if sample:
      # Scaled from the timed steps to the 250 of the protocol.
      per_call = sample["seconds_per_call"]["median_s"]
      assert abs(sample["seconds_per_image"] - per_call * 250 / sample["timed_steps"]
                 / sample["batch_size"]) < 1e-9
      assert sample["hours_for_50k"] > 0
  # rematerialisation needs less memory than the same scanned step without it
  assert (cases["jax_train_bf16_xla_scan_remat"]["xla_memory"]["temp_gib"]
          < cases["jax_train_bf16_xla_scan"]["xla_memory"]["temp_gib"])
  targets = report["targets"]
  assert targets["sampling_bf16_vs_torch_eager"]["ratio"] > 0
  assert targets["train_mfu"]["mfu"] is None  # no datasheet peak for a CPU
