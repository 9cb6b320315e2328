"""The profile breakdown of experiments/bench_profile.py, on traces whose answer is known.

A GPU trace cannot be taken here, so its path runs on a synthetic XSpace built with the
reader JAX ships (`ProfileData.from_text_proto`): a device plane with two streams, a line
the profiler derives from the kernels, another module's kernel and an un-annotated memcpy,
against hand-written HLO in the form XLA:GPU prints (a Triton GEMM fusion, cuBLAS and
cuDNN custom calls, an async all-reduce). The exclusive times are worked out by hand in
the comments. The CPU path runs on a real `jax.profiler` trace of a tiny jitted function.
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "experiments"))
import bench_profile as bp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

HLO = '''HloModule jit_train_step, is_scheduled=true, entry_computation_layout={(f32[8,8]{1,0})->f32[8,8]{1,0}}

%fused_gemm (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(diffusion_loss)/dot_general"}
}

%fused_qk (p0: bf16[8,8], p1: bf16[8,8]) -> f32[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  %dot.2 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(diffusion_loss))/attention/dot_general"}
  ROOT %exponential.1 = f32[8,8]{1,0} exponential(%dot.2), metadata={op_name="jit(train_step)/transpose(jvp(diffusion_loss))/attention/exp"}
}

%fused_convert (p0: f32[8,8]) -> bf16[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %bitcast.1 = f32[64]{0} bitcast(%p0)
  ROOT %convert.1 = bf16[8,8]{1,0} convert(%p0), metadata={op_name="jit(train_step)/jvp(diffusion_loss)/convert_element_type"}
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b)
}

%fused_ln (p0: f32[8,8]) -> f32[8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %c0 = f32[] constant(0)
  %multiply.1 = f32[8,8]{1,0} multiply(%p0, %p0), metadata={op_name="jit(train_step)/jvp(diffusion_loss)/square"}
  ROOT %reduce.1 = f32[8]{0} reduce(%multiply.1, %c0), dimensions={1}, to_apply=%region_add, metadata={op_name="jit(train_step)/jvp(diffusion_loss)/reduce_sum"}
}

%fused_gelu (p0: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %tanh.1 = f32[8,8]{1,0} tanh(%p0), metadata={op_name="jit(train_step)/jvp(diffusion_loss)/tanh"}
  ROOT %multiply.2 = f32[8,8]{1,0} multiply(%tanh.1, %p0), metadata={op_name="jit(train_step)/jvp(diffusion_loss)/mul"}
}

%fused_adam (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  %sqrt.1 = f32[8,8]{1,0} sqrt(%p1), metadata={op_name="jit(train_step)/sqrt"}
  ROOT %divide.1 = f32[8,8]{1,0} divide(%p0, %sqrt.1), metadata={op_name="jit(train_step)/div"}
}

%fused_noise (p0: u32[8,8]) -> f32[8,8] {
  %p0 = u32[8,8]{1,0} parameter(0)
  ROOT %convert.2 = f32[8,8]{1,0} convert(%p0), metadata={op_name="jit(train_step)/jit(_normal)/jit(_normal_real)/jit(_uniform)/convert_element_type"}
}

ENTRY %main.1 (Arg_0: f32[8,8]) -> f32[8,8] {
  %Arg_0 = f32[8,8]{1,0} parameter(0), metadata={op_name="state"}
  %convert_fusion = bf16[8,8]{1,0} fusion(%Arg_0), kind=kLoop, calls=%fused_convert
  %gemm_fusion = bf16[8,8]{1,0} fusion(%convert_fusion, %convert_fusion), kind=kCustom, calls=%fused_gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %qk_fusion = f32[8,8]{1,0} fusion(%convert_fusion, %convert_fusion), kind=kCustom, calls=%fused_qk
  %custom-call.2 = (bf16[8,8]{1,0}, s8[1024]{0}) custom-call(%convert_fusion, %convert_fusion), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/jvp(diffusion_loss)/dot_general"}
  %custom-call.3 = (bf16[1,8,2,4]{3,2,1,0}, /*index=1*/u8[0]{0}) custom-call(%convert_fusion), custom_call_target="__cudnn$fmhaScaleBiasSoftmax", metadata={op_name="jit(train_step)/jvp(diffusion_loss)/dot_product_attention"}
  %all-reduce-start = f32[8,8]{1,0} all-reduce-start(%Arg_0), replica_groups={}, to_apply=%region_add
  %all-reduce-done = f32[8,8]{1,0} all-reduce-done(%all-reduce-start)
  %copy.1 = f32[8,8]{0,1} copy(%Arg_0)
  %ln_fusion = f32[8]{0} fusion(%Arg_0), kind=kInput, calls=%fused_ln
  %gelu_fusion = f32[8,8]{1,0} fusion(%Arg_0), kind=kLoop, calls=%fused_gelu
  %adam_fusion = f32[8,8]{1,0} fusion(%Arg_0, %copy.1), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(train_step)/div"}
  %noise_fusion = f32[8,8]{1,0} fusion(%Arg_0), kind=kLoop, calls=%fused_noise
  %tuple.1 = (s32[], f32[8,8]{1,0}) tuple(%Arg_0, %Arg_0)
  %while.1 = (s32[], f32[8,8]{1,0}) while(%tuple.1), condition=%cond, body=%body, metadata={op_name="jit(train_step)/jvp(diffusion_loss)/while"}
  ROOT %add.1 = f32[8,8]{1,0} add(%adam_fusion, %all-reduce-done)
}
'''

EXPECTED = {
    "convert_fusion": bp.CAST, "gemm_fusion": bp.MATMUL, "qk_fusion": bp.ATTENTION,
    "custom-call.2": bp.MATMUL, "custom-call.3": bp.ATTENTION,
    "all-reduce-start": bp.COLLECTIVE, "all-reduce-done": bp.COLLECTIVE,
    "copy.1": bp.MOVEMENT, "ln_fusion": bp.REDUCTION, "gelu_fusion": bp.ELEMENTWISE,
    "adam_fusion": bp.OPTIMIZER, "noise_fusion": bp.RANDOM, "while.1": bp.CONTROL,
}


def test_classify_by_the_hlo_the_trace_names():
  module, instructions, computations = bp.parse_hlo(HLO)
  assert module == "jit_train_step"
  assert instructions["custom-call.3"].opcode == "custom-call"  # past a tuple shape
  assert instructions["custom-call.3"].target == "__cudnn$fmhaScaleBiasSoftmax"
  assert instructions["gemm_fusion"].called == ("fused_gemm",)
  assert instructions["while.1"].called == ("cond", "body")
  got = {name: bp.classify(instructions[name], instructions, computations)
         for name in EXPECTED}
  assert got == EXPECTED
  # Without a loss scope (a sampler) nothing is the optimizer: the Adam fusion is elementwise.
  assert bp.classify(instructions["adam_fusion"], instructions, computations,
                     loss_scope=None) == bp.ELEMENTWISE


def _stats(**stats):
  ids = {"hlo_op": 1, "hlo_module": 2, "run_id": 3}
  return " ".join(f"stats {{ metadata_id: {ids[k]} "
                  + (f"int64_value: {v}" if isinstance(v, int) else f'str_value: "{v}"') + " }"
                  for k, v in stats.items())


def _xspace(planes):
  """An XSpace text proto: planes = [(name, [(line name, [(kernel, start_us, end_us, stats)])])]."""
  out = []
  for p, (plane, lines) in enumerate(planes):
    names = sorted({e[0] for _, events in lines for e in events})
    body = []
    for l, (line, events) in enumerate(lines):
      evs = " ".join(f"events {{ metadata_id: {names.index(k) + 1} offset_ps: {int(s * 1e6)} "
                     f"duration_ps: {int((e - s) * 1e6)} {_stats(**st)} }}"
                     for k, s, e, st in events)
      body.append(f'lines {{ id: {l + 1} name: "{line}" timestamp_ns: 0 {evs} }}')
    meta = " ".join(f'event_metadata {{ key: {i + 1} value {{ id: {i + 1} name: "{n}" }} }}'
                    for i, n in enumerate(names))
    stat_meta = " ".join(f'stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
                         for i, n in ((1, "hlo_op"), (2, "hlo_module"), (3, "run_id")))
    out.append(f'planes {{ id: {p + 1} name: "{plane}" {" ".join(body)} {meta} {stat_meta} }}')
  return jax.profiler.ProfileData.from_text_proto("\n".join(out))


def test_gpu_trace_kernels_on_two_streams():
  m = "jit_train_step"
  profile = _xspace([
      ("/host:CPU", [("tf_XLAClient", [("launch", 0, 30, dict(hlo_op="gemm_fusion", hlo_module=m))])]),
      ("/device:GPU:0", [
          ("Stream #7(Compute)", [
              ("sm90_xmma_gemm_bf16", 0, 10, dict(hlo_op="gemm_fusion", hlo_module=m)),
              ("loop_convert_fusion", 10, 12, dict(hlo_op="convert_fusion", hlo_module=m)),
              ("memcpy", 12, 14, {}),  # no HLO op: counted, inside the module's span
              ("loop_divide_fusion", 20, 25, dict(hlo_op="adam_fusion", hlo_module=m)),
              ("other_kernel", 30, 40, dict(hlo_op="fusion.9", hlo_module="jit_other"))]),
          ("Stream #9(Compute)", [
              ("ncclAllReduce", 5, 15, dict(hlo_op="all-reduce-start", hlo_module=m))]),
          ("XLA Modules", [("jit_train_step", 0, 25, dict(hlo_module=m))]),  # derived
      ])])
  events, read = bp.op_events(profile, m, device=True)
  assert read["plane"] == "/device:GPU:0"
  assert read["lines"] == ["Stream #7(Compute)", "Stream #9(Compute)"]
  assert len(events) == 5
  r = bp.breakdown(events, HLO, calls=1)
  rows = {row["category"]: row["ms_per_call"] * 1e3 for row in r["rows"]}  # us
  # 0-5 gemm alone; 5-10 gemm | all-reduce; 10-12 convert | all-reduce; 12-14 memcpy |
  # all-reduce; 14-15 all-reduce; 15-20 nothing; 20-25 the Adam fusion.
  assert rows == pytest.approx({bp.MATMUL: 7.5, bp.COLLECTIVE: 5.5, bp.CAST: 1.0,
                                bp.CONTROL: 1.0, bp.OPTIMIZER: 5.0, bp.IDLE: 5.0})
  assert r["traced_ms_per_call"] == pytest.approx(0.025)
  assert r["percent_sum"] == pytest.approx(100.0)
  assert r["top_kernels"][0]["kernel"] == "sm90_xmma_gemm_bf16"
  with pytest.raises(ValueError, match="CUPTI"):
    bp.op_events(profile, "jit_missing", device=True)


def test_host_trace_nested_ops_and_two_executions():
  m = "jit_train_step"
  profile = _xspace([("/host:CPU", [
      ("tf_XLAPjRtCpuClient", [
          ("while.1", 0, 10, dict(hlo_op="while.1", hlo_module=m, run_id=1)),
          ("gelu_fusion", 2, 6, dict(hlo_op="gelu_fusion", hlo_module=m, run_id=1)),  # in the loop
          ("ln_fusion", 14, 20, dict(hlo_op="ln_fusion", hlo_module=m, run_id=2))]),
      ("tf_XLAEigen", [
          ("copy.1", 4, 8, dict(hlo_op="copy.1", hlo_module=m, run_id=1)),
          ("SlinkyThreadPool::Await", 0, 20, {}),  # host bookkeeping: not an op
          ("ln_fusion", 16, 18, dict(hlo_op="unknown.7", hlo_module=m, run_id=2))]),
  ])])
  events, _ = bp.op_events(profile, m, device=False)
  r = bp.breakdown(events, HLO, calls=2)
  rows = {row["category"]: row["ms_per_call"] * 1e3 * 2 for row in r["rows"]}  # us, both calls
  # 0-2 while; 2-4 gelu (nested: the innermost holds the line); 4-6 gelu | copy; 6-8 while |
  # copy; 8-10 while; 10-14 idle between the runs; 14-16 and 18-20 ln; 16-18 ln | unknown.
  assert rows == pytest.approx({bp.CONTROL: 5.0 + 1.0, bp.ELEMENTWISE: 3.0, bp.MOVEMENT: 2.0,
                                bp.REDUCTION: 5.0, bp.IDLE_BETWEEN: 4.0, bp.IDLE_IN_STEP: 0.0})
  assert r["ops_missing_from_hlo"] == {"unknown.7": 1}
  assert r["percent_sum"] == pytest.approx(100.0)


def test_profile_calls_on_a_real_cpu_trace(tmp_path):
  @jax.jit
  def step(w, x):
    with jax.named_scope("diffusion_loss"):
      with jax.named_scope("attention"):
        h = jax.nn.softmax(x @ w.T)
      loss = jnp.tanh(h @ w).sum()
    return loss, w * 0.9 + 0.1  # outside the loss: the "optimizer"

  w = jnp.ones((128, 128))
  compiled = step.lower(w, w).compile()
  run = lambda: jax.block_until_ready(compiled(w, w))
  run()
  r = bp.profile_calls(run, compiled.as_text(), str(tmp_path), calls=3)
  assert r["trace"].endswith(".xplane.pb") and os.path.exists(r["trace"])
  assert r["read"]["plane"] == "/host:CPU" and r["calls"] == 3
  rows = {row["category"]: row for row in r["rows"]}
  assert rows[bp.ATTENTION]["ms_per_call"] > 0 and rows[bp.OPTIMIZER]["ms_per_call"] > 0
  assert abs(r["percent_sum"] - 100.0) < 0.1
  assert not r["ops_missing_from_hlo"]
  text = "\n".join(bp.markdown(r))
  assert "| total |" in text and "| top kernels |" in text
