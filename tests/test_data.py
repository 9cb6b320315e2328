"""Tests for diffit_jax.data: folder builder, MNIST demo, grain pipelines, latent records."""

import os
import re
import socket
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffit_jax.data import __main__ as data_cli
from diffit_jax.data import folder, latents, mnist, pipeline, transforms
from helpers import run_module, subprocess_env, write_latents


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _noise_image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def class_folder(tmp_path):
  """cat/ (4 good + a corrupt file), dog/ (3 good + odd-sized + truncated JPEG), a loose file."""
  rng = np.random.default_rng(0)
  src = tmp_path / "src"
  for i in range(4):
    _save(str(src / "cat" / f"c{i}.png"), _noise_image(rng, 24, 20))
  for i in range(3):
    _save(str(src / "dog" / f"d{i}.jpg"), _noise_image(rng, 24, 20))
  (src / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  _save(str(src / "dog" / "odd.png"), _noise_image(rng, 8, 8))
  _save(str(src / "dog" / "full.jpg"), _noise_image(rng, 24, 20))
  data = (src / "dog" / "full.jpg").read_bytes()
  # Header intact, pixels cut: passes the header check, fails when decoded.
  (src / "dog" / "truncated.jpg").write_bytes(data[:len(data) * 8 // 10])
  os.remove(src / "dog" / "full.jpg")
  (src / "notes.txt").write_text("not an image")
  return str(src)


def _leftovers(parent):
  return [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


# ---------------------------------------------------------------------------------------------
# Folder builder.


def test_folder_build_reports_and_skips_bad_images(class_folder, tmp_path, capsys):
  dst = str(tmp_path / "built")
  assert data_cli.main(["build", f"--src={class_folder}", f"--out={dst}"]) == 0
  out = capsys.readouterr().out
  for name in ("cat/corrupt.png", "dog/odd.png", "dog/truncated.jpg"):
    assert name in out
  assert "Wrote 7 images" in out and "cat (4), dog (3)" in out and "notes.txt" in out

  builder = tfds.builder_from_directory(dst)
  assert builder.info.features["label"].names == ["cat", "dog"]
  assert builder.info.features["image"].shape == (24, 20, 3)
  skipped = dict(map(tuple, builder.info.metadata["skipped"]))
  assert set(skipped) == {"cat/corrupt.png", "dog/odd.png", "dog/truncated.jpg"}
  assert "unreadable" in skipped["cat/corrupt.png"] and "differs" in skipped["dog/odd.png"]
  source = builder.as_data_source(split="train")
  labels = sorted(int(source[i]["label"]) for i in range(len(source)))
  assert labels == [0, 0, 0, 0, 1, 1, 1]
  assert source[0]["image"].shape == (24, 20, 3) and source[0]["image"].dtype == np.uint8
  assert _leftovers(tmp_path) == []

  assert data_cli.main(["info", f"--src={dst}"]) == 0
  assert "7 examples" in capsys.readouterr().out


def test_folder_build_strict_rejects_and_writes_nothing(class_folder, tmp_path, capsys):
  dst = str(tmp_path / "built")
  with pytest.raises(folder.FolderDatasetError) as e:
    folder.build_folder_dataset(class_folder, dst, strict=True)
  assert {p for p, _ in e.value.problems} == {"cat/corrupt.png", "dog/odd.png"}
  assert not os.path.exists(dst) and _leftovers(tmp_path) == []

  # A file whose header is fine but whose pixels are cut is found during writing: still rejected.
  os.remove(os.path.join(class_folder, "cat", "corrupt.png"))
  os.remove(os.path.join(class_folder, "dog", "odd.png"))
  assert data_cli.main(["build", f"--src={class_folder}", f"--out={dst}", "--strict"]) == 2
  assert "dog/truncated.jpg" in capsys.readouterr().err
  assert not os.path.exists(dst) and _leftovers(tmp_path) == []


def test_folder_build_unconditional_resize_and_adm_crop(tmp_path):
  rng = np.random.default_rng(1)
  src = tmp_path / "src"
  _save(str(src / "a.png"), _noise_image(rng, 40, 30))
  _save(str(src / "b.png"), _noise_image(rng, 20, 50))
  _save(str(src / "tiny.png"), _noise_image(rng, 8, 30))  # Shorter side below 16.
  # A 16x48 picture: red | green | red thirds. ADM crop to 16 keeps exactly the green square.
  tri = np.zeros((16, 48, 3), np.uint8)
  tri[..., 0] = 255
  tri[:, 16:32] = (0, 255, 0)
  _save(str(src / "thirds.png"), tri)

  report = folder.build_folder_dataset(str(src), str(tmp_path / "ds"), resolution=16)
  assert report.num_written == 3 and report.class_names == []
  assert [p for p, _ in report.skipped] == ["tiny.png"] and "too small" in report.skipped[0][1]
  builder = tfds.builder_from_directory(str(tmp_path / "ds"))
  assert "label" not in builder.info.features.keys()
  source = builder.as_data_source(split="train")
  images = [source[i]["image"] for i in range(len(source))]
  assert all(im.shape == (16, 16, 3) for im in images)
  assert any((im == np.array([0, 255, 0], np.uint8)).all() for im in images)

  # Unconditional data trains with label 0.
  config = pipeline.get_default_data_config()
  config.update(name=f"folder:{tmp_path / 'ds'}", image_size=16, channels=3)
  assert pipeline.get_dataset_info(config).num_classes == 0
  batch = next(pipeline.create_train_iterator(config, global_batch_size=2, seed=0))
  assert batch["image"].shape == (2, 16, 16, 3) and (batch["label"] == 0).all()


def test_folder_build_user_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    folder.build_folder_dataset(str(tmp_path / "missing"), str(tmp_path / "ds"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "x.txt").write_text("x")
  with pytest.raises(folder.FolderDatasetError, match="No images found"):
    folder.build_folder_dataset(str(tmp_path / "empty"), str(tmp_path / "ds"))
  (tmp_path / "ds").mkdir()
  with pytest.raises(FileExistsError, match="--overwrite"):
    folder.build_folder_dataset(str(tmp_path / "empty"), str(tmp_path / "ds"))


def _data_cli(*args):
  return run_module("diffit_jax.data", *args, timeout=120)


def _by_label(dst):
  builder = tfds.builder_from_directory(str(dst))
  source = builder.as_data_source(split="train")
  names = builder.info.features["label"].names
  return {names[int(source[i]["label"])]: source[i]["image"] for i in range(len(source))}


def test_folder_build_converts_16_bit_float_and_transparent_images(tmp_path):
  """Wide and transparent PIL modes through the CLI, against NumPy oracles (one class each)."""
  src, h, w = tmp_path / "src", 4, 8
  ramp = np.linspace(0, 65535, h * w).round().reshape(h, w)  # A known 16-bit gradient.
  expected = {}
  (src / "g16").mkdir(parents=True)
  Image.fromarray(ramp.astype(np.uint16)).save(src / "g16" / "a.png")  # PIL mode I;16.
  expected["g16"] = np.round(ramp / 257)
  (src / "pgm16").mkdir()
  Image.fromarray(ramp.astype(np.uint16)).save(src / "pgm16" / "a.pgm")  # Opens as mode I.
  expected["pgm16"] = np.round(ramp / 257)
  (src / "float").mkdir()
  unit = ramp.astype(np.float32) / 65535
  Image.fromarray(unit).save(src / "float" / "a.tif")  # Mode F, values in [0, 1].
  expected["float"] = np.round(unit * 255)
  (src / "rgba").mkdir()
  rgba = np.zeros((h, w, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, np.linspace(0, 255, w).astype(np.uint8)  # Red, fading in.
  _save(str(src / "rgba" / "a.png"), rgba)
  alpha = rgba[..., 3:] / 255
  expected["rgba"] = rgba[..., :3] * alpha + 255 * (1 - alpha)  # Composited on white.
  (src / "palette").mkdir()
  pal = Image.fromarray(np.tile(np.arange(w, dtype=np.uint8) % 2, (h, 1)), "P")
  pal.putpalette([10, 20, 30, 40, 50, 60])
  pal.save(src / "palette" / "a.png", transparency=1)  # Index 1 is transparent.
  expected["palette"] = np.where((np.arange(w) % 2)[None, :, None] == 1, 255, [10, 20, 30])
  (src / "cmyk").mkdir()
  Image.new("CMYK", (w, h), (51, 0, 102, 128)).save(src / "cmyk" / "a.tif")
  expected["cmyk"] = np.array([255 - 51, 255, 255 - 102]) * (255 - 128) / 255
  (src / "hdr").mkdir()
  Image.fromarray(unit * 4).save(src / "hdr" / "a.tif")  # Mode F beyond [0, 1]: refused.

  result = _data_cli("build", f"--src={src}", f"--out={tmp_path / 'ds'}")
  assert result.returncode == 0, result.stderr
  images = _by_label(tmp_path / "ds")
  np.testing.assert_array_equal(images["g16"][..., 0], np.round(ramp / 257), "exact 16 -> 8 bits")
  assert re.search(r"hdr/a.tif: mode F .* only floats in \[0, 1\]", result.stdout), result.stdout
  assert set(images) == set(expected)
  for name, want in expected.items():
    want = np.asarray(want, np.float64)
    want = np.broadcast_to(want[..., None] if want.ndim == 2 else want, (h, w, 3))  # Grey -> RGB.
    got = images[name].astype(np.float64)
    np.testing.assert_allclose(got, want, atol=1, err_msg=name)  # PIL rounds to nearest.


def test_folder_build_removes_stale_partial_folders(tmp_path):
  """A killed build's DST.partial-HOST-PID-* is removed by the next build; a live one is kept."""
  rng = np.random.default_rng(0)
  for i in range(3):
    _save(str(tmp_path / "src" / f"{i}.png"), _noise_image(rng, 8, 8))
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # Reaped: its pid names no process now.
  host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
  dst = tmp_path / "ds"
  stale = tmp_path / f"ds.partial-{host}-{dead.pid}-0123abcd"
  (stale / "ds" / "1.0.0").mkdir(parents=True)
  (stale / "ds" / "1.0.0" / "ds-train.array_record-00000-of-00001").write_bytes(b"half")
  live = tmp_path / f"ds.partial-{host}-{os.getpid()}-89abcdef"
  live.mkdir()
  unnamed = tmp_path / "ds.partial-fedcba98"  # Named by an older version: no writer to check.
  unnamed.mkdir()

  result = _data_cli("build", f"--src={tmp_path / 'src'}", f"--out={dst}")
  assert result.returncode == 0, result.stderr
  assert f"Removed {stale}" in result.stdout and not stale.exists()
  assert live.exists(), "a running build's folder must be kept"
  assert f"Kept {unnamed}" in result.stdout and unnamed.exists()
  assert len(tfds.builder_from_directory(str(dst)).as_data_source(split="train")) == 3
  assert sorted(os.listdir(tmp_path)) == sorted(["src", "ds", live.name, unnamed.name])


@pytest.fixture
def awkward_folder(tmp_path, monkeypatch):
  """Real images in class folders beside every entry `data build` must not read or wait on.

  src/cat: c0.png, c1.png; pipe.png (a FIFO: opening it blocks until a writer comes), sock.png
  (a UNIX socket), gone.png (a dangling symlink), dir.png/ (an empty folder), cycle -> ../cat.
  src/dog: d0.png, d1.png, outside.png -> a real image outside the source.
  src/bird -> a class folder outside the source (followed: a symlinked class is read once).
  src/loop -> . (the source itself), src/up -> .. (the folder holding the source).
  Returns (src, the expected (class, pixels) records, the expected skipped entry -> reason).
  """
  rng = np.random.default_rng(0)
  src, outside = tmp_path / "src", tmp_path / "outside"
  images = {}
  for path, label in [("cat/c0.png", "cat"), ("cat/c1.png", "cat"), ("dog/d0.png", "dog"),
                      ("dog/d1.png", "dog")]:
    images[src / path] = label
  images[outside / "e.png"], images[outside / "bird" / "b0.png"] = "dog", "bird"
  records = []
  for path, label in images.items():
    pixels = _noise_image(rng, 6, 5)
    _save(str(path), pixels)
    records.append((label, pixels.tobytes()))
  cat = src / "cat"
  os.mkfifo(cat / "pipe.png")
  with monkeypatch.context() as m, socket.socket(socket.AF_UNIX) as sock:
    m.chdir(cat)  # A relative name: AF_UNIX paths are limited to ~100 bytes.
    sock.bind("sock.png")
  (cat / "gone.png").symlink_to("missing.png")
  (cat / "dir.png").mkdir()
  (cat / "cycle").symlink_to("../cat")
  (src / "dog" / "outside.png").symlink_to(outside / "e.png")
  (src / "bird").symlink_to(outside / "bird")
  (src / "loop").symlink_to(".")
  (src / "up").symlink_to("..")
  skipped = {
      "cat/pipe.png": "a FIFO, not a regular file",
      "cat/sock.png": "a socket, not a regular file",
      "cat/gone.png": "a broken symlink (-> missing.png",
      f"cat/dir.png{os.sep}": "a folder, not an image file",
      "cat/cycle": "a symlink to a folder already scanned (-> ../cat)",
      "loop": "a symlink to a folder already scanned (-> .)",
      "up": "a symlink to a folder holding the source (-> ..)",
  }
  return src, sorted(records), skipped


def test_folder_build_skips_special_files_and_symlink_loops(awkward_folder, tmp_path):
  """The CLI finishes (the old scan blocked forever opening the FIFO), writes exactly the real
  images, and names every entry it did not read with its reason."""
  src, records, skipped = awkward_folder
  result = _data_cli("build", f"--src={src}", f"--out={tmp_path / 'ds'}")
  assert result.returncode == 0, result.stderr
  assert "Wrote 6 images" in result.stdout and "bird (1), cat (2), dog (3)" in result.stdout
  assert "Skipped 3 images and 4 other entries:" in result.stdout, result.stdout
  listed = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines()
                if line.startswith("  "))
  assert set(listed) == set(skipped), result.stdout
  for path, reason in skipped.items():
    assert listed[path].startswith(reason), (path, listed[path])
  builder = tfds.builder_from_directory(str(tmp_path / "ds"))
  assert {p for p, _ in builder.info.metadata["skipped"]} == set(skipped)
  names = builder.info.features["label"].names
  source = builder.as_data_source(split="train")
  assert sorted((names[int(r["label"])], r["image"].tobytes()) for r in source) == records
  assert _leftovers(tmp_path) == []


def test_folder_build_strict_refuses_special_files_and_symlink_loops(awkward_folder, tmp_path):
  src, _, skipped = awkward_folder
  result = _data_cli("build", f"--src={src}", f"--out={tmp_path / 'ds'}", "--strict")
  assert result.returncode == 2, (result.stdout, result.stderr)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      "error: Build rejected (--strict): 7 entries cannot be read as images;"), result.stderr
  for path, reason in skipped.items():
    assert f"  {path}: {reason}" in result.stderr, (path, result.stderr)
  assert not (tmp_path / "ds").exists() and _leftovers(tmp_path) == []


def test_folder_image_readers_refuse_a_special_file_without_opening_it(tmp_path):
  """A file swapped for a FIFO after the scan: the readers name it instead of blocking."""
  import threading

  fifo = str(tmp_path / "swapped.png")
  os.mkfifo(fifo)
  results = {}

  def read():
    results["probe"] = folder._probe(fifo)
    try:
      folder._load(fifo, 3, None)
    except OSError as e:
      results["load"] = str(e)

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(10)
  while reader.is_alive():  # A reader blocked in open(): a writer lets it go on, so this fails.
    try:
      os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
      pass  # No reader has the FIFO open at this instant.
    reader.join(0.1)
  assert results == {"probe": (None, "a FIFO, not a regular file"),
                     "load": "a FIFO, not a regular file"}


def test_data_cli_user_errors_are_one_line(tmp_path, capsys):
  assert data_cli.main(["build", f"--src={tmp_path / 'missing'}", f"--out={tmp_path / 'ds'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0]
  with pytest.raises(SystemExit) as e:
    data_cli.main(["build", f"--src={tmp_path}", f"--out={tmp_path / 'ds'}", "--channels=2"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  assert "--channels" in err[0] and "--help" in err[0]
  assert data_cli.main(["info", f"--src={tmp_path / 'missing'}"]) == 2
  assert capsys.readouterr().err.startswith("error: ")


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def _cifar_tarball(path, batches, meta=None):
  """A tarball in the official cifar-10-python layout: Python pickles (protocol 2, bytes keys)."""
  import io
  import pickle
  import tarfile

  meta = meta or {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}
  with tarfile.open(path, "w:gz") as tar:
    for name, obj in [("batches.meta", meta), *batches.items()]:
      raw = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))


def _cifar_batch(rng, n, first_label=0):
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # R, G, B planes, as CIFAR-10 stores
  labels = [(first_label + i) % 10 for i in range(n)]
  return images, {b"batch_label": b"training batch", b"data": rows, b"labels": labels}


def test_data_build_reads_the_cifar10_tarball_with_labels(tmp_path):
  """`data build --src=cifar-10-python.tar.gz`: a labelled dataset the cifar10 config trains on."""
  rng = np.random.default_rng(0)
  train, batches = {}, {}
  for b in range(5):  # data_batch_1..5: two images each, so the 10 labels 0..9 all occur.
    images, batches[f"data_batch_{b + 1}"] = _cifar_batch(rng, 2, first_label=2 * b)
    train.update({2 * b + i: image for i, image in enumerate(images)})
  test_images, batches["test_batch"] = _cifar_batch(rng, 10, first_label=3)
  tarball = tmp_path / "cifar-10-python.tar.gz"
  _cifar_tarball(tarball, batches)

  result = _data_cli("build", f"--src={tarball}", f"--out={tmp_path / 'cifar10'}")
  assert result.returncode == 0, result.stderr
  builder = tfds.builder_from_directory(str(tmp_path / "cifar10"))
  assert builder.info.features["label"].names == CIFAR_NAMES  # CIFAR-10's ids, in order
  assert builder.info.metadata["source"].startswith(str(tarball))
  images = _by_label(tmp_path / "cifar10")  # one image per class: label -> image
  assert len(images) == 10
  for label, image in train.items():
    np.testing.assert_array_equal(images[CIFAR_NAMES[label]], image, err_msg=CIFAR_NAMES[label])

  from diffit_jax import config_lib
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                               "cifar10.py"))
  assert config.data.name == "folder:data/cifar10"  # where the docstring's build writes
  config.data.update(name=f"folder:{tmp_path / 'cifar10'}", num_workers=0)
  batch = next(pipeline.create_train_iterator(config.data, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)

  assert data_cli.main(["build", f"--src={tarball}", f"--out={tmp_path / 'test'}",
                        "--split=test"]) == 0
  by_label = _by_label(tmp_path / "test")
  for i, image in enumerate(test_images):
    np.testing.assert_array_equal(by_label[CIFAR_NAMES[(3 + i) % 10]], image)


def _one_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_data_build_refuses_a_hostile_cifar10_tarball(tmp_path, capsys):
  """A batch whose pickle calls os.system is refused by name; nothing runs, nothing is written."""
  import pickle

  marker = tmp_path / "PWNED"

  class Shell:
    def __reduce__(self):
      return os.system, (f"touch '{marker}'",)

  rng = np.random.default_rng(0)
  batches = {f"data_batch_{b}": _cifar_batch(rng, 2)[1] for b in range(1, 6)}
  batches["data_batch_3"] = pickle.dumps({b"data": Shell(), b"labels": [0]}, protocol=2)
  tarball = tmp_path / "cifar-10-python.tar.gz"
  _cifar_tarball(tarball, batches)
  assert data_cli.main(["build", f"--src={tarball}", f"--out={tmp_path / 'ds'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: refusing to load"), err
  assert f"global {os.system.__module__}.system" in err[0]
  assert not marker.exists() and not (tmp_path / "ds").exists()
  # An array of Python objects is refused too (only numeric arrays are read).
  batches["data_batch_3"] = {b"data": np.array([None, 1], dtype=object), b"labels": [0, 1]}
  _cifar_tarball(tarball, batches)
  assert data_cli.main(["build", f"--src={tarball}", f"--out={tmp_path / 'ds'}"]) == 2
  assert "not a plain numeric type" in capsys.readouterr().err
  # A truncated download, and a file that is not the tarball: one line each.
  truncated = tmp_path / "cut.tar.gz"
  truncated.write_bytes(tarball.read_bytes()[:len(tarball.read_bytes()) // 2])
  other = tmp_path / "notes.txt"
  other.write_text("not a tarball")
  for src, message in ((truncated, "damaged tar file"), (other, "not the official")):
    assert data_cli.main(["build", f"--src={src}", f"--out={tmp_path / 'ds'}"]) == 2
    assert message in _one_line(capsys)
  assert not (tmp_path / "ds").exists()


def test_data_build_prints_progress_lines_and_no_tfds_noise(tmp_path):
  """No tqdm bars and no tfds "Downloading and preparing dataset Unknown size" banner."""
  rng = np.random.default_rng(0)
  for i in range(3):
    _save(str(tmp_path / "src" / f"{i}.png"), _noise_image(rng, 8, 8))
  result = _data_cli("build", f"--src={tmp_path / 'src'}", f"--out={tmp_path / 'ds'}")
  assert result.returncode == 0, result.stderr
  output = result.stdout + result.stderr
  for noise in ("Downloading and preparing", "downloaded and prepared", "Unknown size", "%|",
                "\r", "Generating splits", "Shuffling"):
    assert noise not in output, (noise, output)
  assert re.search(r"^checking images 3/3 \| [\d.]+ img/s \| done in", result.stdout, re.M)
  assert re.search(r"^writing images 3/3 \| ", result.stdout, re.M), result.stdout


def test_reading_a_built_dataset_in_grain_workers_logs_no_opencv_note(tmp_path):
  """tfds's "OpenCV is not installed ... Defaulting to PIL" note, once per grain worker and
  for nothing a user must do, is not shown."""
  rng = np.random.default_rng(0)
  for i in range(4):
    _save(str(tmp_path / "src" / f"{i}.png"), _noise_image(rng, 8, 8))
  folder.build_folder_dataset(str(tmp_path / "src"), str(tmp_path / "ds"))
  script = tmp_path / "read.py"
  script.write_text(
      "from absl import flags\n"
      "from diffit_jax.data import pipeline\n"
      "if __name__ == '__main__':\n"
      "  flags.FLAGS.mark_as_parsed()\n"
      "  config = pipeline.get_default_data_config()\n"
      f"  config.update(name='folder:{tmp_path / 'ds'}', image_size=8, channels=3, "
      "num_workers=1)\n"
      "  batch = next(pipeline.create_train_iterator(config, global_batch_size=2, seed=0))\n"
      "  print(batch['image'].shape)\n")
  result = subprocess.run([sys.executable, str(script)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert "(2, 8, 8, 3)" in result.stdout
  assert "OpenCV" not in result.stderr, result.stderr


def test_center_crop_and_channels():
  image = Image.fromarray(np.arange(64 * 128, dtype=np.uint32).reshape(64, 128).astype(np.uint8))
  assert transforms.center_crop_arr(image, 16).shape == (16, 16)
  grey = np.full((4, 4, 1), 7, np.uint8)
  np.testing.assert_array_equal(transforms.to_channels(grey, 3), np.full((4, 4, 3), 7, np.uint8))
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[..., 1] = 100
  assert (transforms.to_channels(rgb, 1) == 59).all()  # 0.587 * 100, PIL's luma.
  assert transforms.uint8_to_unit_range(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# MNIST demo.


def test_mnist_demo_is_real_digits():
  images, labels = mnist.load_mnist_demo(channels=1)
  assert images.shape == (5000, 32, 32, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and np.bincount(labels).tolist() == [500] * 10
  assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0  # The 2-pixel padding.
  ink = images.astype(np.float32) / 255
  assert 0.08 < ink.mean() < 0.13  # MNIST's mean ink is 0.13 at 28x28, diluted by the padding.
  assert (ink > 0.5).mean() > 0.6 * (ink > 0.05).mean()  # Strokes, not haze: mostly bright ink.
  per_class = [ink[labels == k].mean() for k in range(10)]
  assert np.argmin(per_class) == 1 and np.argmax(per_class) in (0, 8)  # 1s thinnest.
  # Same class digits look alike: each class mean image is nearest to its own digits.
  means = np.stack([ink[labels == k].mean(0) for k in range(10)])  # (10, 32, 32, 1)
  nearest = np.argmin(((ink[:500, None] - means[None]) ** 2).sum((2, 3, 4)), axis=1)
  assert (nearest == labels[:500]).mean() > 0.7
  rgb, _ = mnist.load_mnist_demo(channels=3)
  assert rgb.shape == (5000, 32, 32, 3) and (rgb == images).all()
  # Shuffled once, so contiguous per-process shards see every class.
  assert len(set(labels[:100].tolist())) == 10


# ---------------------------------------------------------------------------------------------
# Pipeline.


def _mnist_config(**overrides):
  config = pipeline.get_default_data_config()
  config.update(overrides)
  return config


def test_pipeline_batches_shapes_range_and_values():
  config = _mnist_config(channels=3)
  it = pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
  batch = next(it)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  # Every example is one of the source digits with its own label, scaled to [-1, 1].
  images, labels = mnist.load_mnist_demo(channels=3)
  flat = images.reshape(5000, -1).astype(np.float32) / 127.5 - 1
  for image, label in zip(batch["image"], batch["label"]):
    index = np.argmin(np.abs(flat - image.reshape(-1)).sum(1))
    np.testing.assert_array_equal(flat[index], image.reshape(-1))
    assert labels[index] == label
  info = pipeline.get_dataset_info(config)
  assert info == pipeline.DatasetInfo(5000, 10, (32, 32, 3), tuple("0123456789"),
                                      stored_shape=(32, 32, 1))  # the digits as stored


def test_pipeline_random_flip():
  plain = next(pipeline.create_train_iterator(_mnist_config(), global_batch_size=64, seed=3))
  flipped = next(pipeline.create_train_iterator(
      _mnist_config(random_flip=True), global_batch_size=64, seed=3))
  np.testing.assert_array_equal(plain["label"], flipped["label"])  # Same records, same order.
  same = (plain["image"] == flipped["image"]).all((1, 2, 3))
  mirrored = (plain["image"][:, :, ::-1] == flipped["image"]).all((1, 2, 3))
  assert (same | mirrored).all() and 10 < mirrored.sum() < 54 and 10 < same.sum() < 54


def test_pipeline_resume_gives_exactly_the_same_batches():
  config = _mnist_config(random_flip=True)
  it = pipeline.create_train_iterator(config, global_batch_size=16, seed=7)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.create_train_iterator(config, global_batch_size=16, seed=7)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_pipeline_shards_are_disjoint_and_sized():
  config = _mnist_config()
  shards = []
  for index in range(2):
    it = pipeline.create_train_iterator(
        config, global_batch_size=32, seed=0, shard_options=grain.sharding.ShardOptions(index, 2))
    batches = [next(it) for _ in range(4)]
    assert batches[0]["image"].shape == (16, 32, 32, 1)  # B_local = 32 / 2.
    shards.append({im.tobytes() for b in batches for im in b["image"]})
  assert len(shards[0]) > 60 and not shards[0] & shards[1]
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    pipeline.create_train_iterator(config, global_batch_size=33, seed=0,
                                   shard_options=grain.sharding.ShardOptions(0, 2))


def test_pipeline_tfds_source_mocked():
  config = _mnist_config(name="tfds:cifar10", channels=3, image_size=16, random_flip=True)
  with tfds.testing.mock_data(num_examples=12):
    batch = next(pipeline.create_train_iterator(config, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3)  # 32x32 -> 16x16 by the ADM crop.
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1


def test_pipeline_user_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown tfds dataset"):
    pipeline.get_dataset_info(_mnist_config(name="tfds:no_such_dataset_xyz"))
  with pytest.raises(ValueError, match="not prepared in ArrayRecord"):
    pipeline.get_dataset_info(_mnist_config(name="cifar10", data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="diffit_jax.data build"):
    pipeline.get_dataset_info(_mnist_config(name=f"folder:{tmp_path}"))
  with pytest.raises(ValueError, match="not a data source"):
    pipeline.get_dataset_info(_mnist_config(name="/some/path"))
  with pytest.raises(ValueError, match="channels must be 1 or 3"):
    pipeline.get_dataset_info(_mnist_config(channels=4))


def test_pipeline_reads_the_schema_defaults():
  # The schema's config.data (what every config starts from): "" is tfds' default data_dir.
  config = pipeline.get_default_data_config()
  assert config.data_dir == "" and config.name == "mnist_demo"
  batch = next(pipeline.create_train_iterator(config, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 32, 32, 1)


def test_pipeline_with_a_worker_process_matches_in_process():
  config = _mnist_config(random_flip=True)
  want = [next(it) for it in [pipeline.create_train_iterator(config, global_batch_size=8, seed=1)]
          for _ in range(2)]
  config.num_workers = 1
  it = pipeline.create_train_iterator(config, global_batch_size=8, seed=1)
  got = [next(it) for _ in range(2)]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])


# ---------------------------------------------------------------------------------------------
# Latent records.


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_latent_records_round_trip(tmp_path, dtype):
  directory = str(tmp_path / "latents")
  means, logvars = write_latents(directory, 10, shape=(4, 4, 4), num_writers=2, dtype=dtype)
  paths = latents.shard_paths(directory)
  assert [os.path.basename(p) for p in paths] == [
      "latents-00000-of-00002.array_record", "latents-00001-of-00002.array_record"]
  source = grain.sources.ArrayRecordDataSource(paths)
  records = [latents.decode_record(source[i]) for i in range(len(source))]
  assert sorted(r["label"] for r in records) == list(range(10))
  for r in records:
    assert r["mean"].dtype == dtype and r["mean"].shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(r["mean"], means[r["label"]])
    np.testing.assert_array_equal(r["logvar"], logvars[r["label"]])
  with pytest.raises(ValueError, match="shape"):
    latents.encode_record(means[0, 0], logvars[0, 0])


def test_latent_shards_incomplete_or_partial_are_refused(tmp_path):
  directory = str(tmp_path / "latents")
  write_latents(directory, 4, shape=(4, 4, 4), num_writers=3)
  os.remove(os.path.join(directory, "latents-00001-of-00003.array_record"))
  with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
    latents.shard_paths(directory)
  # A writer that fails leaves no shard under the final name.
  with pytest.raises(RuntimeError):
    with latents.LatentShardWriter(directory, 1, 3) as writer:
      writer.write(np.zeros((2, 1, 1, 4), np.float16), np.zeros((2, 1, 1, 4), np.float16))
      raise RuntimeError("encoder crashed")
  assert sorted(os.listdir(directory)) == [
      "latents-00000-of-00003.array_record", "latents-00002-of-00003.array_record"]


def test_sample_latent_formula_numpy_and_jit():
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  mean, logvar, noise = (rng.normal(size=(3, 4, 4, 4)).astype(np.float32) for _ in range(3))
  oracle = (mean.astype(np.float64) + np.exp(0.5 * logvar.astype(np.float64)) * noise) * 0.18215
  np.testing.assert_allclose(latents.sample_latent(mean, logvar, noise), oracle,
                             rtol=1e-5, atol=1e-7)
  mean_j, logvar_j = jnp.asarray(mean), jnp.asarray(logvar)
  jitted = jax.jit(latents.sample_latent)(mean_j, logvar_j, jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(jitted), oracle, rtol=1e-5, atol=1e-7)
  assert latents.LATENT_SCALE == 0.18215


def test_pipeline_latents_sample_fresh_latents_and_mirrors(tmp_path):
  directory = str(tmp_path / "latents")
  n = 16
  mean = np.zeros((2, 4, 4, 4), np.float32)
  mean[1] = 10.0  # View 1 (the mirror) is told apart by its mean.
  for shard in range(2):
    with latents.LatentShardWriter(directory, shard, 2) as writer:
      for i in range(shard, n, 2):
        writer.write(mean, np.zeros_like(mean), label=i)
  latents.write_info(directory, num_classes=n)
  config = _mnist_config(name=f"latents:{directory}", random_flip=True)
  info = pipeline.get_dataset_info(config)
  assert (info.num_examples, info.num_classes, info.example_shape) == (n, n, (4, 4, 4))

  it = pipeline.create_train_iterator(config, global_batch_size=n, seed=0)
  epoch1, epoch2 = next(it), next(it)
  assert epoch1["image"].shape == (n, 4, 4, 4) and epoch1["image"].dtype == np.float32
  assert sorted(epoch1["label"].tolist()) == list(range(n))
  z = epoch1["image"] / latents.LATENT_SCALE  # mean + 1 * noise
  mirror = z.mean((1, 2, 3)) > 5
  assert 0 < mirror.sum() < n  # Both views are drawn.
  noise = z - np.where(mirror[:, None, None, None], 10.0, 0.0)
  assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2  # N(0, 1) noise, std exp(0/2).
  order1, order2 = np.argsort(epoch1["label"]), np.argsort(epoch2["label"])
  assert not np.allclose(epoch1["image"][order1], epoch2["image"][order2])  # Fresh each epoch.

  config.random_flip = False
  batch = next(pipeline.create_train_iterator(config, global_batch_size=n, seed=0))
  assert (batch["image"].mean((1, 2, 3)) < 5 * latents.LATENT_SCALE).all()  # Only view 0.


def test_pipeline_latent_shards_partition_records(tmp_path):
  directory = str(tmp_path / "latents")
  write_latents(directory, 20, shape=(2, 2, 4), num_writers=3)
  config = _mnist_config(name=f"latents:{directory}")
  seen = []
  for index in range(2):
    it = pipeline.create_train_iterator(
        config, global_batch_size=4, seed=0, num_epochs=1,
        shard_options=grain.sharding.ShardOptions(index, 2, drop_remainder=True))
    seen.append([int(label) for batch in it for label in batch["label"]])
  assert len(seen[0]) == len(seen[1]) == 10
  assert sorted(seen[0] + seen[1]) == list(range(20))


# ---------------------------------------------------------------------------------------------
# The disk the build shares: another build of the same --out, a full disk.


def test_a_second_build_of_the_same_out_is_refused(class_folder, tmp_path):
  """A live build of --out (a child holding OUT.lock, as `data build` does) makes a second
  one exit 2 with one line naming it; nothing is written."""
  dst = tmp_path / "built"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import time; from diffit_jax import files; "
       f"files.FolderLock({str(dst) + '.lock'!r}, what='dataset build', advice='-').acquire(); "
       "print('held', flush=True); time.sleep(600)"], env=subprocess_env(),
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    result = _data_cli("build", f"--src={class_folder}", f"--out={dst}")
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert f"pid {holder.pid} on host" in error and "dataset build" in error, error
  assert not dst.exists() and not _leftovers(tmp_path)


FULL_DATASET_SCRIPT = r"""
fill 64
"$PYTHON" -m diffit_jax.data build --src="$SRC" --out="$MNT/ds" > "$OUT/full.txt" 2>&1
echo "full rc=$?"; ls -a "$MNT"
rm "$MNT/filler"
"$PYTHON" -m diffit_jax.data build --src="$SRC" --out="$MNT/ds" > "$OUT/freed.txt" 2>&1
echo "freed rc=$?"; ls "$MNT/ds"
"""


def test_a_full_disk_stops_the_build_with_one_line(tmp_path, run_on_small_disk):
  """--out on a real tmpfs with 64 KB free for 600 KB of images: one line naming --out and
  the space the build needs, exit 2, no partial folder; with space freed it builds."""
  if run_on_small_disk is None:
    pytest.skip("no mount namespace here (unshare -m needs root or user namespaces)")
  rng = np.random.default_rng(0)
  for i in range(12):
    _save(str(tmp_path / "src" / f"{i}.png"), _noise_image(rng, 128, 128))
  env = subprocess_env(PYTHON=sys.executable, SRC=str(tmp_path / "src"), OUT=str(tmp_path))
  proc = run_on_small_disk(FULL_DATASET_SCRIPT, tmp_path / "mnt", 2048, env, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  full = (tmp_path / "full.txt").read_text()
  assert "full rc=2" in proc.stdout and "Traceback" not in full, (proc.stdout, full)
  (error,) = [line for line in full.splitlines() if line.startswith("error:")]
  assert f"out of space writing {tmp_path / 'mnt' / 'ds'}: the write needs about" in error, error
  listing = proc.stdout.split("full rc=2")[1].split("freed rc=")[0].split()
  assert listing == [".", "..", "filler"], proc.stdout  # no partial folder, no lock
  assert "freed rc=0" in proc.stdout and "dataset_info.json" in proc.stdout, (
      (tmp_path / "freed.txt").read_text())
