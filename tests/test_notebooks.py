"""Every notebook in `notebooks/` runs top to bottom in SMOKE mode, and is committed clean.

SMOKE mode (`DIFFIT_SMOKE=1`, read by each notebook's first code cell) swaps the real
checkpoints for tiny random stand-ins in the same file formats, so a notebook runs on a
CPU in about a minute and downloads nothing. Each notebook runs as on Colab after its
install cell: in a fresh kernel of a virtual environment that holds diffit_jax installed
from a wheel (the `installed_python` fixture of tests/conftest.py), with no checkout on
any path, in an empty working directory; any cell error fails the test with the cell's
traceback.
"""

import glob
import json
import os
import shutil
import sys

import pytest

from helpers import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 600
SMOKE_SWITCH = 'os.environ.get("DIFFIT_SMOKE") == "1"'


def ids(path: str) -> str:
  return os.path.basename(path)


def test_notebooks_exist():
  assert NOTEBOOKS, f"no notebooks in {os.path.join(REPO, 'notebooks')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_clean_with_a_smoke_switch(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
  assert not dirty, (f"{ids(path)}: code cells {dirty} have outputs or execution counts; clear "
                     "them before committing (Jupyter: Edit > Clear outputs of all cells).")
  assert SMOKE_SWITCH in code[0].source, (
      f"{ids(path)}: the first code cell must hold the SMOKE switch, turned on by the test "
      f"suite through `SMOKE = SMOKE or {SMOKE_SWITCH}`.")


def kernel_manager(tmp_path, python):
  """A kernel of the interpreter `python`, with SMOKE on and JAX on the CPU."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  spec_dir = tmp_path / "kernels" / "diffit-smoke"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "diffit_jax smoke", "language": "python",
      "env": {"DIFFIT_SMOKE": "1", "JAX_PLATFORMS": "cpu",
              # nothing may be downloaded in SMOKE mode
              "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1",
              # only the installed wheel: no checkout on the path
              "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"},
  }))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return AsyncKernelManager(kernel_name="diffit-smoke", kernel_spec_manager=specs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_runs_in_smoke_mode_from_the_installed_wheel(path, tmp_path, installed_python):
  nb = nbformat.read(path, as_version=4)
  workdir = tmp_path / "work"
  workdir.mkdir()
  client = nbclient.NotebookClient(nb, km=kernel_manager(tmp_path, installed_python),
                                   timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute()  # raises CellExecutionError, with the failing cell's traceback
  assert os.path.isdir(workdir / "diffit_work")
  # The install cell found the wheel's diffit_jax, in the fresh environment.
  printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                    for out in cell.outputs)
  venv = os.path.dirname(os.path.dirname(installed_python))
  assert f"diffit_jax from {venv}" in printed, printed[:2000]


def test_notebook_01_fetches_the_weights_from_the_hub_by_name(tmp_path, monkeypatch):
  """SOURCE="hub" (its default) asks the Hub for NVIDIA's file and the VAE's two files, by
  name, through a stand-in `huggingface_hub` (nothing is downloaded)."""
  import importlib.machinery
  import types

  from IPython.core.inputtransformer2 import TransformerManager

  calls = []

  def hf_hub_download(repo_id, filename, *, local_dir):
    calls.append((repo_id, filename))
    os.makedirs(local_dir, exist_ok=True)
    path = os.path.join(local_dir, filename)
    open(path, "wb").close()
    return path

  hub = types.ModuleType("huggingface_hub")
  hub.__spec__ = importlib.machinery.ModuleSpec("huggingface_hub", None)
  hub.hf_hub_download = hf_hub_download
  monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
  nb = nbformat.read(os.path.join(REPO, "notebooks", "01_sample_official_checkpoint.ipynb"),
                     as_version=4)
  (cell,) = [c for c in nb.cells if c.get("id") == "weights"]
  scope = {"os": os, "importlib": importlib, "shutil": shutil, "SMOKE": False,
           "WORK": str(tmp_path)}
  exec(TransformerManager().transform_cell(cell.source), scope)  # pylint: disable=exec-used
  assert calls == [("nvidia/DiffiT", "diffit_256.safetensors"),
                   ("stabilityai/sd-vae-ft-ema", "config.json"),
                   ("stabilityai/sd-vae-ft-ema", "diffusion_pytorch_model.safetensors")]
  assert scope["DIFFIT_FILE"] == str(tmp_path / "hub" / "diffit_256.safetensors")
  assert sorted(os.listdir(scope["VAE_DIR"])) == ["config.json",
                                                  "diffusion_pytorch_model.safetensors"]
