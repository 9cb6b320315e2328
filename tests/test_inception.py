"""The Flax FID Inception and its converter against an independent PyTorch FID Inception.

torchvision cannot be installed beside torch 2.13.0, so the reference network is written
here from the 2015-12-05 graph's structure as pytorch-fid ports it (FIDInceptionA/C/E_1/
E_2: avg pools without padding, a max pool in the last block, 1008 classes), with the
graph's TF 1.x bilinear resize written as gathers (torch-fidelity's formulation) rather
than the matmuls of the Flax model. Random weights, randomised BatchNorm statistics,
saved with `torch.save`, converted by the real converter (CLI entry point).
"""

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffit_jax.convert import __main__ as convert_main
from diffit_jax.convert import inception as convert
from diffit_jax.models import inception as flax_inception

# ---- Independent PyTorch reference ----------------------------------------------------


class Conv(nn.Module):

  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):

  def __init__(self, cin, pool):
    super().__init__()
    self.branch1x1 = Conv(cin, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
    self.branch_pool = Conv(cin, pool, 1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(tf_avg_pool(x))], 1)


class BlockB(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = Conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = Conv(cin, 192, 1)
    self.branch7x7_1 = Conv(cin, c7, 1)
    self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = Conv(cin, c7, 1)
    self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    d = x
    for i in range(1, 6):
      d = getattr(self, f"branch7x7dbl_{i}")(d)
    return torch.cat([
        self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
        self.branch_pool(tf_avg_pool(x))], 1)


class BlockD(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = Conv(cin, 192, 1)
    self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

  def forward(self, x):
    b = x
    for i in range(1, 5):
      b = getattr(self, f"branch7x7x3_{i}")(b)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = Conv(cin, 320, 1)
    self.branch3x3_1 = Conv(cin, 384, 1)
    self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = Conv(cin, 448, 1)
    self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    a = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
    return torch.cat([
        self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(d),
        self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


def tf1_resize(x, size=299):
  """TF 1.x ResizeBilinear (align_corners=False, no half-pixel centres), NCHW, by gathers."""
  def axis(n_in):
    src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
    lo = src.long()
    return lo, (lo + 1).clamp(max=n_in - 1), src - lo.float()
  ylo, yhi, dy = axis(x.shape[2])
  xlo, xhi, dx = axis(x.shape[3])
  top = x[:, :, ylo][:, :, :, xlo] + (x[:, :, ylo][:, :, :, xhi] - x[:, :, ylo][:, :, :, xlo]) * dx
  bot = x[:, :, yhi][:, :, :, xlo] + (x[:, :, yhi][:, :, :, xhi] - x[:, :, yhi][:, :, :, xlo]) * dx
  return top + (bot - top) * dy[:, None]


class TorchFIDInception(nn.Module):

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = Conv(32, 32, 3)
    self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = Conv(64, 80, 1)
    self.Conv2d_4a_3x3 = Conv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
    self.Mixed_6a = BlockB(288)
    self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
    self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
    self.Mixed_7a = BlockD(768)
    self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, images_nhwc_uint8):
    x = images_nhwc_uint8.permute(0, 3, 1, 2).float()
    x = (tf1_resize(x) - 128) / 128
    x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
    # ADM's mixed_6/conv:0 = Mixed_6d.branch1x1, first 7 channels, flattened as NHWC.
    spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
    pool = x.mean((2, 3))
    return pool, spatial, pool @ self.fc.weight.T  # ADM's logits: no bias.


def randomise(model, seed=0):
  """He-normal convolutions and random BatchNorm statistics, so every parameter matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0, (2 / fan_in) ** 0.5, generator=g)
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.Linear):
        m.weight.normal_(0, 0.05, generator=g)
        m.bias.normal_(0, 1.0, generator=g)
  return model.eval()


# ---- Fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  return randomise(TorchFIDInception())


@pytest.fixture(scope="module")
def pth(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("pth") / "pt_inception-random.pth"
  torch.save(torch_model.state_dict(), path)
  return str(path)


@pytest.fixture(scope="module")
def converted(pth, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("ckpt") / "inception")
  assert convert_main.main(["inception", f"--src={pth}", f"--out={dst}"]) == 0
  return dst


# ---- Tests ----------------------------------------------------------------------------


def test_features_match_pytorch_reference(torch_model, converted):
  """Pool, spatial and logits agree to 1e-4 relative; 37x53 inputs exercise the resize."""
  images = np.random.default_rng(0).integers(0, 256, size=(2, 37, 53, 3), dtype=np.uint8)
  with torch.no_grad():
    expected = [t.numpy() for t in torch_model(torch.from_numpy(images))]
  got = flax_inception_outputs(convert.load_inception(converted), images)
  for name, g, e in zip(("pool", "spatial", "logits"), got, expected):
    assert g.shape == e.shape, name
    scale = np.abs(e).max()
    assert scale > 1e-2, f"{name} features vanished; the test weights are degenerate"
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * scale, err_msg=name)
  assert got.spatial.shape == (2, flax_inception.SPATIAL_DIM) == (2, 2023)


def flax_inception_outputs(model, images):
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)
  return flax_inception.InceptionOutputs(*(np.asarray(o) for o in out))


@pytest.mark.parametrize("shape", [(5, 7), (40, 33), (320, 301), (299, 299)])
def test_tf1_resize_matches_reference(shape):
  x = np.random.default_rng(1).uniform(0, 255, size=(1, *shape, 3)).astype(np.float32)
  expected = tf1_resize(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  got = np.asarray(flax_inception.resize_bilinear_tf1(x))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)  # values in [0, 255]


def test_checkpoint_metadata(converted):
  meta = convert.checkpoint.load_metadata(converted)
  assert meta["model"] == convert.MODEL_NAME and len(meta["source_sha256"]) == 64


def test_reader_matches_torch_load(torch_model, pth, tmp_path):
  """The torch-free reader, zip and legacy formats, against torch's own state dict."""
  legacy = tmp_path / "legacy.pth"
  torch.save(torch_model.state_dict(), legacy, _use_new_zipfile_serialization=False)
  expected = torch_model.state_dict()
  for path in (pth, legacy):
    got = convert.read_torch_state_dict(str(path))
    assert list(got) == list(expected)
    for key, value in expected.items():
      np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


def test_reader_refuses_code(tmp_path):
  path = tmp_path / "evil.pth"
  torch.save({"w": torch.zeros(2), "f": os.getcwd}, path)
  with pytest.raises(ValueError, match="refusing"):
    convert.read_torch_state_dict(str(path))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("Mixed_6d.branch1x1.bn.running_var"), "missing Mixed_6d.branch1x1.bn"),
    (lambda sd: sd.update({"fc.weight": torch.zeros(1000, 2048)}), "torchvision"),
    (lambda sd: sd.update({"AuxLogits.fc.weight": torch.zeros(2)}), "unexpected keys"),
])
def test_converter_rejects_wrong_weights_and_writes_nothing(torch_model, tmp_path, edit, message,
                                                           reported_error):
  state_dict = dict(torch_model.state_dict())
  edit(state_dict)
  src, dst = tmp_path / "bad.pth", tmp_path / "out"
  torch.save(state_dict, src)
  error = reported_error(convert_main.main, ["inception", f"--src={src}", f"--out={dst}"])
  assert isinstance(error, ValueError) and re.search(message, str(error)), error
  assert not dst.exists() and os.listdir(tmp_path) == ["bad.pth"]


def test_converter_checks_hash_in_file_name(pth, tmp_path, reported_error):
  src = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  src.write_bytes(open(pth, "rb").read())
  error = reported_error(convert_main.main,
                         ["inception", f"--src={src}", f"--out={tmp_path / 'out'}"])
  assert isinstance(error, ValueError) and "corrupt" in str(error), error
