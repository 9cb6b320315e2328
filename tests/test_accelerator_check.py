"""Smoke test of experiments/accelerator_check.py: every case runs, at toy sizes, on CPU.

The check is meant for a machine that has JAX, Flax, Optax, Orbax and PyTorch but not the
input-pipeline packages, so the run here hides grain, tensorflow-datasets, clu and
array_record from every process it starts: importing any of them fails the case.
Timings are not checked (they are noise on a shared CPU), only that each case measured
something, that the candidate cases ran as asked (batch, attention, XLA flag), that the
profiled cases' breakdown of the traced time is in the report and adds up, and that the
targets compare like with like.
"""

import argparse
import json
import os
import subprocess
import sys

from helpers import REPO

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
      [str(site), REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  out = tmp_path / "results"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "accelerator_check.py"), "--smoke",
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
  candidates = {"jax_train_bf16_default", "jax_train_bf16_xla_unrolled",
                "jax_train_bf16_default_b64", "jax_train_bf16_default_b128",
                "jax_train_bf16_remat_b128", "jax_train_bf16_default_lhs",
                "jax_sample_bf16_xla", "jax_sample_bf16_b128"}
  assert candidates | {"jax_sample_bf16", "jax_sample_fp32", "torch_eager_bf16",
                       "torch_eager_fp32"} <= measured
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
  # The candidates ran as asked: batch multiples, blocks, attention, the XLA flag.
  batch = report["settings"]["train_batch"]
  assert [cases[f"jax_train_bf16_default{b}"]["batch_size"] for b in ("", "_b64", "_b128")] == [
      batch, 2 * batch, 4 * batch]
  assert cases["jax_train_bf16_remat_b128"]["batch_size"] == 4 * batch
  assert cases["jax_train_bf16_default"]["attention"] == "einsum"  # "auto" on CPU
  assert cases["jax_train_bf16_xla_unrolled"]["attention"] == "xla"
  assert cases["jax_sample_bf16_xla"]["attention"] == "xla"
  assert (cases["jax_sample_bf16_b128"]["batch_size"]
          == 2 * cases["jax_sample_bf16"]["batch_size"])
  flag = "--xla_gpu_enable_latency_hiding_scheduler=true"
  assert flag in cases["jax_train_bf16_default_lhs"]["device"]["xla_flags"]
  assert flag not in cases["jax_train_bf16_default"]["device"]["xla_flags"]
  # rematerialisation needs less memory than the same batch unrolled without it (at toy
  # sizes 1.9 against 2.5 MB: XLA's plan, in bytes)
  assert (cases["jax_train_bf16_remat_b128"]["xla_memory"]["temp_bytes"]
          < cases["jax_train_bf16_default_b128"]["xla_memory"]["temp_bytes"])

  # The profile: a breakdown of the traced time, read from the trace's XLA:CPU op events.
  markdown = (out / "accelerator_smoke.md").read_text()
  assert "## Where the time goes (jax.profiler)" in markdown
  assert "| matmul (dot / convolution / gemm) |" in markdown and "| total |" in markdown
  for name in ("jax_train_bf16_default", "jax_train_bf16_xla_unrolled", "jax_sample_bf16"):
    profile = cases[name]["profile"]
    assert "error" not in profile, profile
    assert os.path.exists(profile["trace"]) and profile["trace"].endswith(".xplane.pb")
    assert profile["read"]["plane"] == "/host:CPU" and profile["events"] > 100
    rows = {r["category"]: r for r in profile["rows"]}
    # Exclusive times plus idle tile the traced span, so the rows sum to 100% of it: within
    # 0.1 points, the rounding of each of the (at most 13) rows to 0.01%; and their ms to
    # the traced ms per call within the rounding of each to 0.1 us.
    assert abs(sum(r["percent"] for r in rows.values()) - 100.0) < 0.1, rows
    assert abs(sum(r["ms_per_call"] for r in rows.values())
               - profile["traced_ms_per_call"]) <= 1e-4 * (len(rows) + 1)
    assert profile["calls"] == report["settings"]["profile_calls"]
    # The model's matmuls and Eq. 6 are found by the HLO the trace names.
    for category in ("matmul (dot / convolution / gemm)",
                     "attention (Eq. 6: fused kernel, or XLA's dots + softmax)"):
      assert rows[category]["ms_per_call"] > 0 and rows[category]["events_per_call"] > 0
    assert not profile["ops_missing_from_hlo"]
    assert profile["top_kernels"] and f"### {name}" in markdown
  train_rows = {r["category"] for r in cases["jax_train_bf16_default"]["profile"]["rows"]}
  assert "optimizer + EMA update (after the gradients)" in train_rows
  assert "profile" not in cases["jax_train_bf16_default_b64"]  # profiled: the marked cases

  targets = report["targets"]
  # Like with like: default against default, best against best.
  assert targets["train_bf16_default_vs_default"]["jax_case"] == "jax_train_bf16_default"
  assert targets["train_bf16_default_vs_default"]["torch_case"] == "torch_eager_bf16"
  best = targets["train_bf16_best_vs_best"]
  assert cases[best["jax_case"]]["batch_size"] == batch  # the batch PyTorch ran
  assert targets["sampling_bf16_default_vs_default"]["ratio"] > 0
  assert targets["sampling_bf16_best_vs_best"]["torch_case"] == "torch_eager_bf16"  # no compile
  assert targets["train_mfu_best"]["mfu"] is None  # no datasheet peak for a CPU


def _experiments():
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import accelerator_check  # pylint: disable=g-import-not-at-top
  return accelerator_check


def test_targets_compare_like_with_like():
  check = _experiments()
  train = lambda ips, batch=32, mfu=None: dict(images_per_s=ips, step_s=batch / ips,
                                               batch_size=batch, mfu=mfu)
  sample = lambda ips, batch=64: dict(images_per_s=ips, seconds_per_image=1 / ips,
                                     hours_for_50k=1.0, batch_size=batch)
  settings = dict(check.SETTINGS["accelerator"], profile="default", profile_dir="p")
  report = dict(settings=settings, cases={
      "jax_train_bf16_default": train(400, mfu=0.30),
      "jax_train_bf16_xla_unrolled": train(450, mfu=0.33),
      "jax_train_bf16_default_b128": train(600, batch=128, mfu=0.44),  # the batch differs
      "jax_train_bf16_default_lhs": dict(error="boom"),
      "jax_sample_bf16": sample(3.0), "jax_sample_bf16_xla": sample(2.8),
      "jax_sample_bf16_b128": sample(4.0, batch=128),
      "torch_eager_bf16": dict(train=train(250), sample=sample(1.5)),
      "torch_compile_bf16": dict(train=train(350), sample=sample(2.9)),
  })
  t = check.summarize_report(report)
  assert (t["train_mfu_best"]["jax_case"], t["train_mfu_best"]["holds"]) == (
      "jax_train_bf16_default_b128", False)  # any batch counts for MFU
  assert t["train_mfu_default"]["mfu"] == 0.30
  assert (t["train_bf16_default_vs_default"]["jax_case"],
          t["train_bf16_default_vs_default"]["torch_case"]) == (
              "jax_train_bf16_default", "torch_eager_bf16")
  assert t["train_bf16_default_vs_default"]["ratio"] == 400 / 250
  # Best against best at PyTorch's batch: the b128 case is left out.
  assert (t["train_bf16_best_vs_best"]["jax_case"], t["train_bf16_best_vs_best"]["torch_case"],
          t["train_bf16_best_vs_best"]["ratio"]) == (
              "jax_train_bf16_xla_unrolled", "torch_compile_bf16", 450 / 350)
  assert t["sampling_bf16_default_vs_default"]["ratio"] == 2.0
  assert t["sampling_bf16_default_vs_default"]["holds"]  # target 1.5x
  best = t["sampling_bf16_best_vs_best"]
  assert (best["jax_case"], best["torch_case"], best["target"]) == (
      "jax_sample_bf16", "torch_compile_bf16", 1.0)
  assert "| bf16 train img/s, best vs best (batch 32) | jax_train_bf16_xla_unrolled | " \
         "torch_compile_bf16 | 1.29x |  |" in check.markdown(dict(
             report, command="x", targets=t, peak_note=""))


def test_remat_b128_runs_only_where_b128_unrolled_failed(tmp_path):
  check = _experiments()
  remat = next(c for c in check.CASES if c["name"] == "jax_train_bf16_remat_b128")
  args = argparse.Namespace(smoke=False, out_dir=str(tmp_path))
  ran = {"cases": {"jax_train_bf16_default_b128": dict(images_per_s=1.0)}}
  check.run_cases([remat], dict(budget_s=0), args, ran, lambda: None)
  assert "not needed" in ran["cases"]["jax_train_bf16_remat_b128"]["skipped"]
  failed = {"cases": {"jax_train_bf16_default_b128": dict(error="RESOURCE_EXHAUSTED")}}
  check.run_cases([remat], dict(budget_s=0), args, failed, lambda: None)  # no time: no process
  assert "budget" in failed["cases"]["jax_train_bf16_remat_b128"]["skipped"]
