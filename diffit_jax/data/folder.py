"""Image-folder builder: any folder of images -> an ArrayRecord tfds dataset.

For FFHQ and custom data. Layout rules:
  * `SRC/<class>/**/<image>`: each sub-folder of SRC holding images is a class; sorted
    sub-folder names map to ids 0, 1, ... and are saved as the `label` feature's names.
  * images directly in SRC and no class sub-folders, or `unconditional=True` (e.g. FFHQ,
    whose images sit in numbered chunk folders): one unconditional dataset, no `label`.
  * only regular files are read: a FIFO, socket or device named like an image is skipped by
    name (nothing opens it: a FIFO would block the build forever), and so are broken symlinks
    and folders named like an image that hold none. A symlink to an image file is that image.
  * symlinked folders (`cats -> /data/cats`) are followed after the real folders, each folder
    (by device and inode) is scanned at most once, and a symlink to a folder already scanned
    (`cat/again -> ../cat`, `loop -> .`) or to a folder holding SRC (`up -> ..`, which would
    pull in the whole parent tree) is skipped by name.
  Hidden entries (`.name`) are passed over; non-image files are listed as ignored.

Images are converted to 8-bit RGB (or grey with `channels=1`; `to_8bit` says how for each
PIL mode: 16-bit samples are scaled by 1/257, transparent pixels are composited on white)
and, with `resolution`, brought to `resolution x resolution` by ADM's center crop
(`transforms.center_crop_arr`). Without `resolution` all images must share one size (the
most common one is taken). Unreadable files, images of a mode that cannot be converted,
and odd-sized images (another size when not resizing; shorter side below `resolution`
unless `allow_upscale`) are reported by name and skipped, as are the entries above that are
not read; with `strict=True` any of them rejects the build. The dataset is written with a
TensorFlow-free tfds builder (`file_format="array_record"`) into a temporary sibling folder
`DST.partial-HOST-PID-*` that is renamed into place only when complete, so a failed build
never leaves a half-written dataset. A build that was killed leaves its partial folder
behind; the next build of the same DST removes every such folder whose writer (that PID on
this host) is no longer running.

Read the result with `tfds.builder_from_directory(dst).as_data_source()`, or train on it with
`config.data.name = "folder:<dst>"` (see `pipeline.py`). Every record has one shape, the
image feature's (H, W, C) in `features.json`; `metadata.json` (printed by `data info`)
repeats it as `image_shape`, with the source, `resolution` (None: the images' own size),
`channels`, the crop, `allow_upscale`, the skipped files and the images per class. A run
with `config.data.image_size=0` takes its resolution from that shape (configs/custom_folder.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import re
import shutil
import stat
import types
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffit_jax import files, logging_utils
from diffit_jax.data import transforms

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT = "train"
VERSION = "1.0.0"
# Transparent pixels are composited on this background (white, as viewers show them).
BACKGROUND = 255
# PIL modes whose pixels PIL cannot bring to RGB meaningfully (it copies LAB's channels as RGB).
_REFUSED_MODES = {"LAB": "CIELAB colour needs a colour-managed conversion; save it as RGB"}


class FolderDatasetError(ValueError):
  """A folder cannot be built into a dataset; `problems` lists (file, reason) pairs."""

  def __init__(self, message: str, problems: list[tuple[str, str]] = ()):
    self.problems = list(problems)
    if self.problems:
      message += "\n" + "\n".join(f"  {path}: {reason}" for path, reason in self.problems)
    super().__init__(message)


@dataclasses.dataclass
class BuildReport:
  """What a build did; `summary()` is the text the CLI prints."""
  dataset_dir: str
  num_written: int
  image_shape: tuple[int, int, int]
  class_names: list[str]  # Empty for an unconditional dataset.
  class_counts: list[int]  # Images written per class.
  skipped: list[tuple[str, str]]  # (path relative to the source, reason).
  ignored: list[str]  # Non-image files and image-free sub-folders, relative paths.

  def summary(self, max_listed: int = 50) -> str:
    lines = [f"Wrote {self.num_written} images of shape {self.image_shape} (H, W, C) to "
             f"{self.dataset_dir}"]
    if self.class_names:
      counts = ", ".join(f"{n} ({k})" for n, k in zip(self.class_names, self.class_counts))
      lines.append(f"{len(self.class_names)} classes (id order): {counts}")
      if len(self.class_names) > 10 and all(n.isdigit() for n in self.class_names):
        lines.append("Hint: numbered sub-folders (like FFHQ's) are usually chunks, not classes; "
                     "pass --unconditional to ignore them.")
    else:
      lines.append("Unconditional (no class sub-folders).")
    others = sum(p.endswith(os.sep) or not _is_image(p) for p, _ in self.skipped)  # Folders, links.
    head = f"Skipped {len(self.skipped) - others} images"
    head += f" and {others} other entries" if others else ""
    lines.append(head + (":" if self.skipped else "."))
    lines += [f"  {path}: {reason}" for path, reason in self.skipped[:max_listed]]
    if len(self.skipped) > max_listed:
      lines.append(f"  ... and {len(self.skipped) - max_listed} more (see metadata.json).")
    if self.ignored:
      shown = ", ".join(self.ignored[:10]) + (" ..." if len(self.ignored) > 10 else "")
      lines.append(f"Ignored {len(self.ignored)} non-image entries: {shown}")
    return "\n".join(lines)


@dataclasses.dataclass
class _Plan:
  """Everything the tfds builder needs, decided before anything is written."""
  src: str
  files: list[tuple[str, int]]  # (relative path, label); label 0 when unconditional.
  class_names: list[str]
  image_shape: tuple[int, int, int]
  resolution: int | None
  strict: bool
  metadata: dict[str, Any]
  num_threads: int
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  class_counts: list[int] = dataclasses.field(default_factory=list)


def _is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# How each kind of file that is not a regular file is named when it is skipped.
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
  """Why a file of this `st_mode` is not read as an image; None for a regular file."""
  if stat.S_ISREG(mode):
    return None
  if stat.S_ISDIR(mode):
    return "a folder, not an image file"
  kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
  return f"{kind}, not a regular file"


class NotRegularFileError(OSError):
  """A path the image readers will not open: it is not a regular file."""


def _open_regular(path: str) -> io.BufferedReader:
  """Opens `path` for reading if it is a regular file (or a symlink to one).

  The stat comes first, so nothing opens a FIFO or a device; O_NONBLOCK and the fstat of what
  was opened cover a file swapped for a FIFO since then, so no open ever waits for a writer.

  Raises:
    NotRegularFileError: naming what `path` is instead.
  """
  reason = _not_regular(os.stat(path).st_mode)
  if reason:
    raise NotRegularFileError(reason)
  nonblock = getattr(os, "O_NONBLOCK", 0)
  fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_NOCTTY", 0))
  try:
    reason = _not_regular(os.fstat(fd).st_mode)
    if reason:
      raise NotRegularFileError(reason)
    if nonblock:
      os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


class _Tree(NamedTuple):
  """What `_walk` found below a source folder; paths relative to it, in walk order."""
  images: list[str]  # Regular files (or symlinks to them) named like images.
  others: list[str]  # Entries of any kind not named like images; never opened.
  special: list[tuple[str, str]]  # (path, reason): named like images but not regular files.
  folders: list[str]  # Every folder scanned, real or through a symlink.
  skipped: list[tuple[str, str]]  # (path, reason): broken symlinks, loops, unreadable entries.


def _walk(src: str) -> _Tree:
  """Walks `src` top-down like `os.walk` (sorted, hidden entries passed over), without opening
  a file, and follows symlinked folders once the real tree is done (see the module docstring).

  Folders are told apart by (st_dev, st_ino) of what their path resolves to, so each is
  scanned at most once, however many links lead to it.
  """
  def key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino

  visited = {key(os.stat(src))}
  holders = set()  # The folders above src: a link to one would scan src again, and more.
  path = os.path.realpath(src)
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    holders.add(key(os.stat(path)))
  tree = _Tree([], [], [], [], [])
  links = collections.deque()  # (relative path, stat of the folder it leads to)
  pending = [""]
  while pending or links:
    if not pending:  # The real tree is done: the next symlinked folder.
      rel, st = links.popleft()
      target = os.readlink(os.path.join(src, rel))
      if key(st) in visited:
        tree.skipped.append((rel, f"a symlink to a folder already scanned (-> {target})"))
      elif key(st) in holders:
        tree.skipped.append((rel, f"a symlink to a folder holding the source (-> {target}); "
                                  "following it would scan the source again"))
      else:
        visited.add(key(st))
        tree.folders.append(rel)
        pending.append(rel)
      continue
    rel_dir = pending.pop()
    try:
      with os.scandir(os.path.join(src, rel_dir)) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
      if not rel_dir:
        raise
      tree.skipped.append((rel_dir + os.sep, f"unreadable folder ({type(e).__name__}: {e})"))
      continue
    subfolders = []
    for entry in entries:
      rel = os.path.join(rel_dir, entry.name)
      try:
        st = os.stat(entry.path)  # Follows symlinks; opens nothing.
      except OSError as e:
        if entry.is_symlink():
          tree.skipped.append(
              (rel, f"a broken symlink (-> {os.readlink(entry.path)}: {e.strerror})"))
        else:
          tree.skipped.append((rel, f"unreadable ({type(e).__name__}: {e})"))
        continue
      if stat.S_ISDIR(st.st_mode):
        if entry.is_symlink():
          links.append((rel, st))
        elif key(st) in visited:  # A bind mount of a folder already scanned.
          tree.skipped.append((rel + os.sep, "a folder already scanned"))
        else:
          visited.add(key(st))
          tree.folders.append(rel)
          subfolders.append(rel)
      elif not _is_image(entry.name):
        tree.others.append(rel)
      elif stat.S_ISREG(st.st_mode):
        tree.images.append(rel)
      else:
        tree.special.append((rel, _not_regular(st.st_mode)))
    pending += reversed(subfolders)  # Popped in sorted order: os.walk's top-down order.
  return tree


def scan_folder(src: str, unconditional: bool = False
                ) -> tuple[list[tuple[str, int]], list[str], list[str], list[tuple[str, str]]]:
  """Lists the images of a source folder with their labels, opening none of them.

  Args:
    src: the source folder.
    unconditional: ignore sub-folders as classes; take every image below `src`.

  Returns:
    (files, class_names, ignored, skipped): files as (path relative to `src`, label id) pairs;
    class names in id order (empty when unconditional); ignored entries (non-image files,
    image-free sub-folders, loose images beside class sub-folders) as relative paths;
    skipped entries that would have been read but cannot be, as (relative path, reason):
    special files named like images, broken symlinks, folders named like images that hold
    none, symlinks to folders already scanned or holding `src`, unreadable folders.

  Raises:
    FileNotFoundError: `src` is not a folder.
    FolderDatasetError: `src` holds no images.
  """
  if not os.path.isdir(src):
    raise FileNotFoundError(f"Source folder {src} does not exist or is not a folder.")
  tree = _walk(src)
  # `x.png/` holding no images is named: it could be taken for an image that went missing.
  hollow = [d + os.sep for d in tree.folders
            if _is_image(d) and not any(p.startswith(d + os.sep) for p in tree.images)]
  skipped = tree.skipped + [(d, "a folder, not an image file (it holds no images)")
                            for d in hollow]
  ignored = list(tree.others)
  if unconditional:
    files, class_names = [(p, 0) for p in tree.images], []
    skipped += tree.special
  else:
    per_class = {d: [] for d in tree.folders if os.sep not in d}
    loose = []
    for p in tree.images:
      head, _, tail = p.partition(os.sep)
      (per_class[head] if tail else loose).append(p)
    for d, images in per_class.items():
      if not images and d + os.sep not in hollow:
        ignored.append(d + os.sep)
    class_names = sorted(d for d, images in per_class.items() if images)
    if class_names:
      files = [(p, i) for i, n in enumerate(class_names) for p in per_class[n]]
      # Loose files beside class folders belong to no class, whatever kind of file they are.
      ignored += loose + [p for p, _ in tree.special if os.sep not in p]
      skipped += [(p, r) for p, r in tree.special if os.sep in p]
    else:
      files = [(p, 0) for p in loose]
      skipped += tree.special
  if not files:
    raise FolderDatasetError(
        f"No images found in {src} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
        "directly or in class sub-folders).", sorted(skipped))
  return files, class_names, sorted(ignored), sorted(skipped)


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_threads: int) -> Iterator[Any]:
  """Maps `fn` over `items` on a thread pool, in order, with a bounded number in flight."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    window = collections.deque()
    for item in items:
      window.append(pool.submit(fn, item))
      if len(window) >= 4 * num_threads:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


class UnsupportedImageError(ValueError):
  """An image whose pixels cannot be converted meaningfully to 8-bit RGB or grey."""


def _probe(path: str) -> tuple[tuple[int, int] | None, str | None]:
  """Reads an image's header: ((width, height), None) or (None, reason it is unusable)."""
  try:
    with _open_regular(path) as f, Image.open(f) as im:
      size, mode = im.size, im.mode
      im.verify()  # Structure and checksums, without decoding the pixels.
  except NotRegularFileError as e:
    return None, str(e)
  except Exception as e:  # PIL raises many types for bad files.
    return None, f"unreadable ({type(e).__name__}: {e})"
  if mode in _REFUSED_MODES:
    return None, f"unsupported mode {mode} ({_REFUSED_MODES[mode]})"
  return size, None


def to_8bit(im: Image.Image, channels: int) -> Image.Image:
  """Converts a decoded image of any PIL mode to 8-bit "RGB" (channels=3) or "L" (channels=1).

  PIL's own `convert` clips wider samples to 255 (a 16-bit image turns almost white), so:
    * `I;16*` (16-bit grey) and `I` (32-bit int, how PIL opens 16-bit PGM/PPM): samples in
      0..65535 are scaled to 8 bits by round(v / 257); other `I` values are refused.
    * `F` (32-bit float): values in [0, 1] are scaled by round(v * 255); others are refused
      (their range is unknown).
    * alpha (`RGBA`, `LA`, `PA`, `RGBa`) or a transparency key (`P`, `L`, `RGB` with tRNS):
      composited on a white background (`BACKGROUND`), not dropped, so hidden colours under
      transparent pixels never show.
    * `CMYK`, `YCbCr`, `HSV`, `P`, `1`, `L`, `RGB`: PIL's conversion. `LAB` is refused.

  Raises:
    UnsupportedImageError: naming the mode that cannot be converted and why.
  """
  mode = im.mode
  if mode in _REFUSED_MODES:
    raise UnsupportedImageError(f"unsupported mode {mode} ({_REFUSED_MODES[mode]})")
  if mode == "I" or mode.startswith("I;16"):
    v = np.asarray(im).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
      raise UnsupportedImageError(
          f"mode {mode} with values {v.min()}..{v.max()}: only 16-bit samples (0..65535) are "
          "converted; save it as an 8- or 16-bit image")
    im = Image.fromarray(((v + 128) // 257).astype(np.uint8), "L")  # round(v / 257)
  elif mode == "F":
    v = np.asarray(im, np.float64)
    if v.size and not (np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1):
      raise UnsupportedImageError(
          f"mode F (32-bit float) with values {np.nanmin(v):g}..{np.nanmax(v):g}: only floats in "
          "[0, 1] are converted; save it as an 8- or 16-bit image")
    im = Image.fromarray(np.round(v * 255).astype(np.uint8), "L")
  elif {"A", "a"} & set(im.getbands()) or "transparency" in im.info:
    try:
      rgba = im.convert("RGBA")
    except ValueError as e:  # e.g. "La", which PIL cannot convert.
      raise UnsupportedImageError(f"unsupported mode {mode} ({e})") from None
    background = Image.new("RGBA", im.size, (BACKGROUND,) * 3 + (255,))
    im = Image.alpha_composite(background, rgba)
  try:
    return im.convert("L" if channels == 1 else "RGB")
  except ValueError as e:
    raise UnsupportedImageError(f"unsupported mode {mode} ({e})") from None


def _size_problem(size: tuple[int, int], expected: tuple[int, int] | None,
                  resolution: int | None, allow_upscale: bool) -> str | None:
  w, h = size
  if resolution is None:
    if size != expected:
      return (f"size {w}x{h} (WxH) differs from the dataset's {expected[0]}x{expected[1]} "
              "(pass --resolution to resize every image)")
  elif min(size) < resolution and not allow_upscale:
    return (f"too small: {w}x{h}, shorter side below --resolution={resolution} "
            "(pass --allow_upscale to upscale it)")
  return None


def _load(path: str, channels: int, resolution: int | None) -> bytes:
  """Decodes, converts and resizes one image; returns it PNG-encoded."""
  with _open_regular(path) as f, Image.open(f) as im:
    im.load()  # Decodes everything: truncated files fail here.
    im = to_8bit(im, channels)
  if resolution is not None:
    im = Image.fromarray(transforms.center_crop_arr(im, resolution))
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TensorFlow-free tfds builder over a `_Plan`; one subclass per dataset name."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, plan: _Plan, **kwargs):
    self._plan = plan
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"image": tfds.features.Image(shape=self._plan.image_shape, encoding_format="png")}
    if self._plan.class_names:
      features["label"] = tfds.features.ClassLabel(names=self._plan.class_names)
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Images from {self._plan.src}, built by `python -m diffit_jax.data build`.",
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(self._plan.metadata))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {SPLIT: self._generate_examples()}

  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
  # prepared to DIR.partial-..." for every build; nothing is downloaded here and the folder
  # it names is temporary, so both are left out (the build report says what was written).
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _generate_examples(self):
    plan = self._plan
    h, w, c = plan.image_shape
    counts = [0] * max(1, len(plan.class_names))

    def load(item):
      rel, label = item
      try:
        return rel, label, _load(os.path.join(plan.src, rel), c, plan.resolution), None
      except (UnsupportedImageError, NotRegularFileError) as e:
        return rel, label, None, str(e)
      except Exception as e:  # Decoding errors come in many types.
        return rel, label, None, f"unreadable ({type(e).__name__}: {e})"

    lines = logging_utils.ProgressLines("writing images", len(plan.files))
    for rel, label, png, problem in _ordered_map(load, plan.files, plan.num_threads):
      lines.update()
      if problem is None:
        with Image.open(io.BytesIO(png)) as im:
          if (im.height, im.width) != (h, w):  # Guards the fixed feature shape.
            problem = f"decoded size {im.width}x{im.height} differs from its header"
      if problem is not None:
        if plan.strict:
          raise FolderDatasetError("Build rejected (--strict):", [(rel, problem)])
        plan.skipped.append((rel, problem))
        continue
      counts[label] += 1
      example = {"image": png}
      if plan.class_names:
        example["label"] = label
      yield rel, example
    plan.class_counts = counts if plan.class_names else []
    # Saved with the dataset info once generation is done.
    self.info.metadata["skipped"] = [list(s) for s in plan.skipped]
    self.info.metadata["class_counts"] = plan.class_counts


def _dataset_name(dst: str, name: str | None) -> str:
  raw = name or os.path.basename(os.path.normpath(dst))
  clean = re.sub(r"[^a-z0-9]+", "_", raw.lower()).strip("_")
  if not clean or not clean[0].isalpha():
    clean = "folder_" + clean
  return clean


def _temp_name(dst: str, kind: str) -> str:
  """`DST.partial-HOST-PID-RANDOM` (or `.old-`): names the writer, so a later run can tell
  whether it is still running."""
  return f"{dst}.{kind}-{files.host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_builds(dst: str) -> tuple[list[str], list[str]]:
  """Removes the temporary folders that killed builds of `dst` left behind.

  A folder `DST.partial-HOST-PID-*` (a dataset being written) or `DST.old-HOST-PID-*` (the
  dataset an `overwrite` build replaced) is removed when it was made on this host by a
  process that is no longer running. Folders of live builds, of other hosts, and of other
  names are kept. A stale `.old-` folder is kept while `dst` is missing (the build was killed
  between its two renames: it is the last complete dataset), and so are the
  `DST.partial-RANDOM` folders of older versions, which name no writer; both are reported.

  Args:
    dst: the dataset directory (absolute).

  Returns:
    (removed folders, one note per stale-looking folder that was kept).
  """
  parent, base = os.path.split(dst)
  named = re.compile(re.escape(base) + r"\.(partial|old)-([A-Za-z0-9._]+)-(\d+)-[0-9a-f]{8}")
  unnamed = re.compile(re.escape(base) + r"\.(partial|old)-[0-9a-f]{8}")
  removed, kept = [], []
  for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
    path = os.path.join(parent, entry)
    if unnamed.fullmatch(entry):
      kept.append(f"Kept {path}: an older diffit_jax left it without naming its writer; "
                  "delete it if no build is writing it.")
      continue
    match = named.fullmatch(entry)
    if not match or match.group(2) != files.host_name() or files.is_running(int(match.group(3))):
      continue
    if match.group(1) == "old" and not os.path.exists(dst):
      kept.append(f"Kept {path}: the dataset a killed --overwrite build was replacing; "
                  f"rename it to {dst} to restore it.")
      continue
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
      removed.append(path)
  return removed, kept


def build_folder_dataset(
    src: str,
    dst: str,
    *,
    resolution: int | None = None,
    strict: bool = False,
    name: str | None = None,
    channels: int = 3,
    unconditional: bool = False,
    allow_upscale: bool = False,
    overwrite: bool = False,
    num_threads: int | None = None,
    source: str | None = None,
) -> BuildReport:
  """Builds an ArrayRecord tfds dataset (split "train") from a folder of images.

  Before writing, the folders that killed builds of `dst` left behind are removed
  (`remove_stale_builds`), each with a printed line.

  Args:
    src: source folder (class sub-folders, or images directly; see module docstring).
    dst: the dataset directory to create (it will hold dataset_info.json and the shards).
    resolution: bring every image to resolution x resolution with ADM's center crop; None
      keeps the size, which must then be the same for all images.
    strict: reject the whole build on any unreadable or odd-sized image, or any entry the
      scan skips (a FIFO named like an image, a broken symlink, ...), instead of skipping it.
    name: dataset name stored in the info (default: from `dst`'s base name).
    channels: 3 (RGB) or 1 (grey).
    unconditional: ignore sub-folders as classes.
    allow_upscale: with `resolution`, upscale images whose shorter side is below it
      instead of skipping them.
    overwrite: replace an existing `dst`.
    num_threads: decoding threads (default: CPU count, at most 16).
    source: what the dataset was built from, as its metadata records it (default: `src`).

  Returns:
    A `BuildReport` (counts, classes, skipped files with reasons).

  Raises:
    FileNotFoundError: `src` does not exist.
    FileExistsError: `dst` exists and not `overwrite`.
    FolderDatasetError: no images, no usable image, or (with `strict`) any bad image.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}.")
  if resolution is not None and resolution <= 0:
    raise ValueError(f"resolution must be positive, got {resolution}.")
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; choose another --out or pass --overwrite.")
  if dst == src or dst.startswith(src + os.sep):
    raise ValueError(f"--out {dst} must not lie inside the source folder {src}.")
  num_threads = num_threads or min(16, os.cpu_count() or 1)
  files, class_names, ignored, unread = scan_folder(src, unconditional)

  good, problems, expected = _check_images(src, files, num_threads, resolution, allow_upscale)
  if strict and (unread or problems):
    what = [f"{len(unread)} entries cannot be read as images"] if unread else []
    what += [f"{len(problems)} of {len(files)} images are unusable"] if problems else []
    raise FolderDatasetError(
        f"Build rejected (--strict): {' and '.join(what)}; fix or remove them, or drop --strict "
        "to skip them:", unread + problems)
  problems = unread + problems
  if not good:
    raise FolderDatasetError(f"None of the {len(files)} images in {src} is usable:", problems)

  side_h, side_w = (resolution, resolution) if resolution else (expected[1], expected[0])
  plan = _Plan(
      src=src, files=good, class_names=class_names, image_shape=(side_h, side_w, channels),
      resolution=resolution, strict=strict, num_threads=num_threads, skipped=list(problems),
      metadata={"source": source or src, "image_shape": [side_h, side_w, channels],
                "resolution": resolution, "channels": channels,
                "center_crop": "adm" if resolution else None, "allow_upscale": allow_upscale})

  num_written = _write_dataset(plan, dst, _dataset_name(dst, name), len(files))
  return BuildReport(
      dataset_dir=dst, num_written=num_written, image_shape=plan.image_shape,
      class_names=class_names, class_counts=plan.class_counts, skipped=plan.skipped,
      ignored=ignored)


def _check_images(src: str, files: list[tuple[str, int]], num_threads: int,
                  resolution: int | None, allow_upscale: bool
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, str]], Any]:
  """Pass 1 of a build, headers only: (usable files, (file, problem) pairs, the size all
  images must share when there is no `resolution`), before anything is written."""
  lines = logging_utils.ProgressLines("checking images", len(files))
  probes = []
  for probe in _ordered_map(lambda f: _probe(os.path.join(src, f[0])), files, num_threads):
    probes.append(probe)
    lines.update()
  sizes = collections.Counter(size for size, _ in probes if size is not None)
  expected = sizes.most_common(1)[0][0] if sizes and resolution is None else None
  good, problems = [], []
  for (rel, label), (size, problem) in zip(files, probes):
    problem = problem or _size_problem(size, expected, resolution, allow_upscale)
    if problem:
      problems.append((rel, problem))
    else:
      good.append((rel, label))
  return good, problems, expected


def _write_dataset(plan: _Plan, dst: str, dataset_name: str, num_files: int) -> int:
  """Pass 2 of a build: writes `plan` to a temporary folder, then swaps it in as `dst`
  (after removing what killed builds of `dst` left); returns the number of images written."""
  builder_cls = types.new_class(
      "FolderDataset", (_FolderBuilder,), {"skip_registration": True},
      lambda ns: ns.update(name=dataset_name))
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  removed, kept = remove_stale_builds(dst)
  for path in removed:
    print(f"Removed {path}, left by a killed build of {dst} (its process is gone).")
  for note in kept:
    print(note)
  tmp = _temp_name(dst, "partial")
  try:
    builder = builder_cls(plan=plan, data_dir=tmp, file_format="array_record")
    builder.download_and_prepare()
    num_written = (sum(plan.class_counts) if plan.class_names
                   else builder.info.splits[SPLIT].num_examples)
    if num_written == 0:
      raise FolderDatasetError(f"None of the {num_files} images in {plan.src} is usable:",
                               plan.skipped)
    if os.path.exists(dst):  # overwrite: swap in, then drop the old dataset.
      old = _temp_name(dst, "old")
      os.rename(dst, old)
      os.rename(builder.data_dir, dst)
      shutil.rmtree(old)
    else:
      os.rename(builder.data_dir, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return num_written
