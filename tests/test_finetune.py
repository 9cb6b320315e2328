"""Tests of fine-tuning (`config.init_from`, `diffit_jax.finetune`).

The source of the latent tests is official-layout weights with random values in every
parameter, written by the independent PyTorch reference (`tests/torch_reference.py`, a tiny
latent DiffiT: 8x8 latents, 4x4 tokens, depth 2, width 32, 2 heads, 10 classes). The run's
state at step 0 is built the way the trainer builds it (`finetune.load_source`, then
`train.create_train_state`, then `finetune.start_from`) and compared with the source
tensor by tensor and with the reference's outputs. The image-space tests train the tiny
MNIST network of `helpers.tiny_config` for real.
"""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx, traverse_util

from diffit_jax import checkpoint, finetune, logging_utils, sharding, train
from diffit_jax import run as run_lib
from diffit_jax.config_lib import load_config
from diffit_jax.convert import export
from diffit_jax.convert.diffit import convert_diffit
from helpers import LATENT_RUNLOCAL, assert_trees_equal, rel, run_module, tiny_config, write_latents

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402  (tests/ is on sys.path under pytest)

TOL = 1e-5
SOURCE = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
              mlp_ratio=4.0, num_classes=10, learn_sigma=True)
NULL = SOURCE["num_classes"]


def flat(tree) -> dict:
  return {tuple(str(k) for k in path): np.asarray(v)
          for path, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


class Official:
  """The reference with random weights and its `.safetensors` file in the official layout."""

  def __init__(self, folder):
    self.torch = torch_reference.LatentDiffiT(**SOURCE).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for name, p in self.torch.named_parameters():
        std = (0.5 if "relative_position_bias_table" in name else 1.0 if "embedding" in name
               else 0.1 if p.ndim == 1 else float(np.prod(p.shape[1:])) ** -0.5)
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    self.state = {k: v.numpy().copy() for k, v in self.torch.state_dict().items()}
    self.path = str(folder / "official.safetensors")
    safetensors.numpy.save_file(self.state, self.path)
    params, _, _ = convert_diffit(self.path)
    self.params = flat(params)  # the source's tensors under our parameter paths

  def reference(self, x, t, y, **model) -> np.ndarray:
    """The official module for `model` (sizes changed), holding the source's parameters."""
    ref = torch_reference.LatentDiffiT(**{**SOURCE, **model}).eval()
    own = ref.state_dict()
    ref.load_state_dict({k: (torch.from_numpy(v) if own[k].shape == v.shape else own[k])
                         for k, v in self.state.items() if k in own}, strict=False)
    return self.run(ref, x, t, y)

  @staticmethod
  def run(ref, x, t, y) -> np.ndarray:
    with torch.no_grad():
      out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                None if y is None else torch.from_numpy(y))
    return out.permute(0, 2, 3, 1).numpy()  # NHWC


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  return Official(tmp_path_factory.mktemp("official"))


def latent_config(init_from: str, **model):
  config = load_config(LATENT_RUNLOCAL)
  config.model.update(variant="custom", **{k: v for k, v in SOURCE.items()
                                            if k not in ("learn_sigma", "mlp_ratio")})
  config.model.update(model)
  config.init_from = init_from
  return config


def source_params(source: finetune.Source) -> dict:
  return {tuple(str(k) for k in path): v for path, v in source.params.items()}


def step0(config, workdir) -> tuple[train.TrainState, object]:
  """The run's state before any update, built as `train.train_and_evaluate` builds it."""
  source = finetune.load_source(config, str(workdir))
  setup, state = train.create_train_state(config, sharding.create_mesh(config.mesh))
  if source is not None:
    state = finetune.start_from(source, state, setup.shardings)
  model = nnx.merge(setup.graphdef, state.params)
  return state, jax.jit(lambda x, t, y: model(x, t, y))


def inputs(num_classes=NULL, input_size=8, batch=4):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(batch, input_size, input_size, 4)).astype(np.float32)
  t = np.array([0, 250, 600, 999][:batch], np.int64)
  y = np.array([1, 2, 0, num_classes][:batch], np.int64) if num_classes else None
  return x, t, y


# ----------------------------------------------------------------------------------------
# Official-layout weights: what the run starts from.


@pytest.mark.parametrize("kind", ["safetensors", "converted"])
def test_step0_is_the_source_bitwise(official, tmp_path, kind):
  src = official.path
  if kind == "converted":
    params, config, _ = convert_diffit(official.path)
    src = str(tmp_path / "converted")
    checkpoint.save_weights(src, params, metadata={"kind": "diffit", "config": config.to_dict()})
  state, net = step0(latent_config(src), tmp_path / "run")
  assert int(state.step) == 0
  for weights in (state.params, state.ema_params):
    got = flat(weights)
    assert got.keys() == official.params.keys()
    for path, value in official.params.items():
      np.testing.assert_array_equal(got[path], value, err_msg=str(path))
  x, t, y = inputs()
  out = np.asarray(net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  assert rel(out, official.reference(x, t, y)) < TOL


def test_new_class_count_touches_only_the_label_table(official, tmp_path):
  table = ("y_embedder", "embedding_table", "embedding")
  state, net = step0(latent_config(official.path, num_classes=3), tmp_path / "run")
  got = flat(state.params)
  assert got.keys() == official.params.keys()
  changed = [p for p in got if got[p].shape != official.params[p].shape
             or not np.array_equal(got[p], official.params[p])]
  assert changed == [table]
  assert got[table].shape == (4, 32)
  np.testing.assert_array_equal(got[table][3], official.params[table][NULL])  # the null row
  assert 0.01 < got[table][:3].std() < 0.03  # drawn afresh, N(0, 0.02)
  np.testing.assert_array_equal(flat(state.ema_params)[table], got[table])
  # The unconditional prediction (null class) is the source's.
  x, t, _ = inputs()
  null = np.full(4, 3, np.int64)
  out = np.asarray(net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(null)))
  assert rel(out, official.reference(x, t, np.full(4, NULL, np.int64))) < TOL


def test_conditional_source_made_unconditional(official, tmp_path):
  bias = ("t_embedder", "fc2", "bias")
  state, net = step0(latent_config(official.path, num_classes=0), tmp_path / "run")
  got = flat(state.params)
  assert set(official.params) - set(got) == {("y_embedder", "embedding_table", "embedding")}
  changed = [p for p in got if not np.array_equal(got[p], official.params[p])]
  assert changed == [bias]
  x, t, _ = inputs()
  out = np.asarray(net(jnp.asarray(x), jnp.asarray(t), None))
  assert rel(out, official.reference(x, t, np.full(4, NULL, np.int64))) < TOL


def test_new_resolution(official, tmp_path):
  x, t, y = inputs(input_size=16)
  # 4x4 windows on the 8x8 grid of 16x16 latents: the source's window, its tables as they are.
  state, net = step0(latent_config(official.path, input_size=16, window_size=4), tmp_path / "a")
  got = flat(state.params)
  for path, value in official.params.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))
  out = np.asarray(net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  assert rel(out, official.reference(x, t, y, input_size=16, window_size=4)) < TOL

  # Global attention on the 8x8 grid: every table resized from 7x7 to 15x15 offsets, the way
  # Swin does it in PyTorch; everything else as it was.
  state, net = step0(latent_config(official.path, input_size=16), tmp_path / "b")
  got = flat(state.params)
  table = ("blocks", "attn", "relative_position_bias_table")
  assert got[table].shape == (2, 225, 2)
  assert [p for p in got if got[p].shape != official.params[p].shape
          or not np.array_equal(got[p], official.params[p])] == [table]
  ref = torch_reference.LatentDiffiT(**{**SOURCE, "input_size": 16}).eval()
  state_dict = {k: torch.from_numpy(v) for k, v in official.state.items()
                if k != "pos_embed" and not k.endswith("relative_position_index")}
  for i in range(SOURCE["depth"]):
    key = f"blocks.{i}.attn.relative_position_bias_table"
    grid = state_dict[key].T.reshape(1, 2, 7, 7)  # (1, heads, 2w-1, 2w-1)
    state_dict[key] = torch.nn.functional.interpolate(
        grid, size=(15, 15), mode="bicubic", align_corners=False).reshape(2, 225).T
    np.testing.assert_allclose(got[table][i], state_dict[key].numpy(), rtol=1e-5, atol=1e-6)
  ref.load_state_dict(state_dict, strict=False)
  out = np.asarray(net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  assert np.isfinite(out).all()
  assert rel(out, Official.run(ref, x, t, y)) < TOL


def test_resize_bicubic_matches_pytorch():
  grid = np.random.default_rng(0).normal(size=(7, 7, 3)).astype(np.float32)
  for size in (3, 7, 15):
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(size, size), mode="bicubic",
        align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(finetune.resize_bicubic(grid, size), expected, atol=1e-5)


def tiny_latents(folder, num_classes: int) -> str:
  """A latent data set of 8 zero 8x8x4 latents in `folder`; returns its path."""
  write_latents(folder, 8, num_classes=num_classes, mean=0.0, logvar=0.0)
  return str(folder)


def test_mismatched_source_is_refused_by_the_cli_before_anything_runs(official, tmp_path):
  data = tiny_latents(tmp_path / "latents", num_classes=5)
  workdir = tmp_path / "run"
  proc = run_module(
      "diffit_jax.main", f"--config={LATENT_RUNLOCAL}", f"--workdir={workdir}",
      f"--config.init_from={official.path}", f"--config.data.name=latents:{data}",
      "--config.model.variant=custom", "--config.model.depth=3", "--config.model.hidden_size=48",
      "--config.model.num_heads=2", "--config.model.patch_size=2", "--config.model.input_size=8",
      "--config.model.num_classes=5", timeout=300)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr
  assert "blocks/attn/qkv/kernel: source (2, 32, 96), this run (3, 48, 144)" in errors[0]
  assert "depth=2 (this run: 3)" in errors[0] and "hidden_size=32 (this run: 48)" in errors[0]
  assert "Compiled" not in proc.stderr + proc.stdout
  assert not workdir.exists()  # nothing written


def test_sources_that_cannot_be_used_are_refused(official, tmp_path):
  config = latent_config(official.path)
  config.init_from_params = "params"
  with pytest.raises(finetune.IncompatibleSourceError, match="not a training workdir"):
    finetune.load_source(config, str(tmp_path))
  config.init_from_params = "ema"
  config.init_from = str(tmp_path / "nothing_here")
  with pytest.raises(finetune.IncompatibleSourceError, match="does not exist"):
    finetune.load_source(config, str(tmp_path))
  pickled = tmp_path / "official.pt"
  pickled.write_bytes(b"not read")
  config.init_from = str(pickled)
  with pytest.raises(finetune.IncompatibleSourceError, match="pickled PyTorch checkpoints"):
    finetune.load_source(config, str(tmp_path))
  poisoned = dict(official.state)
  poisoned["final_layer.linear.weight"] = poisoned["final_layer.linear.weight"].copy()
  poisoned["final_layer.linear.weight"][0, 0] = np.nan
  config.init_from = str(tmp_path / "poisoned.safetensors")
  safetensors.numpy.save_file(poisoned, config.init_from)
  with pytest.raises(finetune.IncompatibleSourceError,
                     match=r"1 tensor\(s\) hold NaN/Inf \(final_layer/linear/kernel\)"):
    finetune.load_source(config, str(tmp_path))


# ----------------------------------------------------------------------------------------
# Training runs: image space from an earlier run, export of a latent fine-tune.


def first_loss(workdir) -> float:
  return logging_utils.read_metrics(str(workdir))[0]["train/loss"]


def test_image_run_continued_starts_lower_and_resumes_exactly(tmp_path):
  pretrained = str(tmp_path / "pretrained")
  trained = train.train_and_evaluate(
      tiny_config(num_train_steps=40, log_every_steps=10, checkpoint_every_steps=20),
      pretrained)

  # Weights only, from the EMA by default, from the raw weights or an older step on request.
  config = tiny_config(init_from=pretrained)
  unused = str(tmp_path / "unused")
  for init_from, weights, expected in [
      (pretrained, "ema", trained.ema_params), (pretrained, "params", trained.params),
      (pretrained + "@20", "ema", checkpoint.load_run_params(pretrained, 20)[0])]:
    config.init_from, config.init_from_params = init_from, weights
    got, want = source_params(finetune.load_source(config, unused)), flat(expected)
    assert got.keys() == want.keys()
    for path, value in want.items():
      np.testing.assert_array_equal(got[path], value, err_msg=f"{init_from} {weights} {path}")
  assert not np.array_equal(flat(trained.params)[("head", "kernel")],
                            flat(trained.ema_params)[("head", "kernel")])
  # The raw weights are checked against the checkpoint's integrity record too.
  damaged = str(tmp_path / "damaged")
  shutil.copytree(pretrained, damaged)
  state_dir = os.path.join(damaged, "checkpoints", "40", checkpoint.STATE_ITEM)
  largest = max((os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files),
                key=os.path.getsize)
  with open(largest, "r+b") as f:
    byte = f.read(1)
    f.seek(0)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(checkpoint.CorruptCheckpointError, match="train_state/.*crc32"):
    checkpoint.load_run_params(damaged, 40, which="params")

  scratch = str(tmp_path / "scratch")
  train.train_and_evaluate(tiny_config(num_train_steps=4), scratch)
  straight = str(tmp_path / "finetuned")
  final = train.train_and_evaluate(tiny_config(num_train_steps=4, init_from=pretrained),
                                   straight)
  assert first_loss(straight) < 0.8 * first_loss(scratch)

  # Stopped after 2 steps and run again: it resumes from its own checkpoint, not the source.
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(tiny_config(num_train_steps=2, init_from=pretrained,
                                        checkpoint_every_steps=2), resumed)
  again = train.train_and_evaluate(tiny_config(num_train_steps=4, init_from=pretrained,
                                                checkpoint_every_steps=2), resumed)
  assert_trees_equal(again, final)
  assert ([r["train/loss"] for r in logging_utils.read_metrics(resumed)]
          == [r["train/loss"] for r in logging_utils.read_metrics(straight)])


def test_export_of_a_finetuned_latent_run_loads_into_the_official_code(official, tmp_path):
  data = str(tmp_path / "latents")
  write_latents(data, 16, num_classes=3, logvar=-2.0)
  config = latent_config(official.path, num_classes=3)
  config.data.update(name="latents:" + data, num_workers=0)
  config.batch_size, config.num_train_steps, config.log_every_steps = 8, 2, 1
  config.checkpoint_every_steps = config.sample_every_steps = 0
  config.optimizer.learning_rate = 1e-3
  config.ema.decay = 0.5
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(config, workdir)
  assert json.loads(open(os.path.join(workdir, "config.json")).read())["init_from"]

  params, saved = export._load_source(workdir, None, None)  # what `convert export` reads
  path = str(tmp_path / "finetuned.safetensors")
  export.write_safetensors(export.export_params(params, saved.model), path)
  ref = torch_reference.LatentDiffiT(**{**SOURCE, "num_classes": 3}).eval()
  ref.load_state_dict({k: torch.from_numpy(v)
                       for k, v in safetensors.numpy.load_file(path).items()}, strict=True)
  setup, _ = train.create_train_state(config, sharding.create_mesh(config.mesh), initialize=False)
  model = nnx.merge(setup.graphdef, state.ema_params)
  x, t, y = inputs(num_classes=3)
  ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  assert rel(Official.run(ref, x, t, y), ours) < TOL
  # Trained: the weights moved away from the source.
  assert not np.array_equal(flat(state.ema_params)[("final_layer", "linear", "kernel")],
                            official.params[("final_layer", "linear", "kernel")])


def test_architecture_comes_from_the_source_unless_set_on_the_command_line(official, tmp_path):
  # The config describes another network (depth 3, width 48); the source's is taken.
  config = latent_config(official.path, depth=3, hidden_size=48)
  changed = finetune.adopt_architecture(config, str(tmp_path / "run"), overrides=[])
  assert sorted(changed) == ["depth=2", "hidden_size=32"]
  state, net = step0(config, tmp_path / "run")
  got = flat(state.params)
  for path, value in official.params.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))
  x, t, y = inputs()
  out = np.asarray(net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  assert rel(out, official.reference(x, t, y)) < TOL
  # Set on the command line, the run's value stays, and the source no longer fits.
  config = latent_config(official.path, depth=3, hidden_size=32)
  changed = finetune.adopt_architecture(config, str(tmp_path / "run2"),
                                        overrides=["config.model.depth"])
  assert changed == [] and config.model.depth == 3
  with pytest.raises(finetune.IncompatibleSourceError, match=r"depth=2 \(this run: 3\)"):
    finetune.load_source(config, str(tmp_path / "run2"))
  # What may change (classes, resolution) stays the run's config's.
  config = latent_config(official.path, num_classes=3, input_size=16)
  assert finetune.adopt_architecture(config, str(tmp_path / "run3"), overrides=[]) == []


def test_dry_run_reads_only_the_header_of_a_safetensors_source(official, tmp_path):
  # The header intact, the tensor data cut short: the architecture is in the header alone.
  truncated = tmp_path / "truncated.safetensors"
  data = open(official.path, "rb").read()
  header_end = 8 + int.from_bytes(data[:8], "little")
  truncated.write_bytes(data[:header_end + 16])
  flags = [f"--config={LATENT_RUNLOCAL}", f"--config.init_from={truncated}",
           f"--config.data.name=latents:{tiny_latents(tmp_path / 'latents', num_classes=10)}",
           "--config.model.input_size=8", "--config.model.num_classes=10"]
  dry = run_module("diffit_jax.main", *flags, "--dry_run", "--nodry_run_memory", timeout=300)
  assert dry.returncode == 0, dry.stdout + dry.stderr
  assert "depth=2" in dry.stderr and "hidden_size=32" in dry.stderr, dry.stderr
  want = sum(v.size for v in official.params.values())
  assert f"trainable_params: {want}" in dry.stdout, dry.stdout
  # The real run reads the weights, and refuses the file in one line before writing anything.
  workdir = tmp_path / "run"
  run = run_module("diffit_jax.main", *flags, f"--workdir={workdir}", timeout=300)
  assert run.returncode == 2, run.stdout + run.stderr
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "cannot read as safetensors" in errors[0], run.stderr
  assert "Traceback" not in run.stderr and not workdir.exists()


def test_train_and_evaluate_ignores_sys_argv(official, tmp_path, monkeypatch):
  # A program whose own command line holds a config override: the library call takes only
  # the config (and overrides) it is given.
  monkeypatch.setattr(sys, "argv", ["some_program", "--config.model.depth=3"])

  class Adopted(Exception):
    pass

  def stop(config):  # the step after the architecture is adopted; nothing more is needed
    raise Adopted(config.model.depth)

  monkeypatch.setattr(run_lib, "fit_to_data", stop)
  with pytest.raises(Adopted) as adopted:
    train.train_and_evaluate(latent_config(official.path, depth=3), str(tmp_path / "a"))
  assert adopted.value.args == (2,)  # the source's depth
  with pytest.raises(Adopted) as adopted:  # set explicitly, the run's value stays
    train.train_and_evaluate(latent_config(official.path, depth=3), str(tmp_path / "b"),
                             overrides=["config.model.depth"])
  assert adopted.value.args == (3,)
