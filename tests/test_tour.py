"""The tour, notebooks/tour.ipynb: it runs top to bottom in a fresh kernel on a fresh clone
with the network refused, its pictures inline; the committed notebook holds no outputs."""
from __future__ import annotations

import re

import nbformat
import pytest
import torch

from helpers import ROOT, fresh_clone, offline_guard

NOTEBOOK = ROOT / "notebooks" / "tour.ipynb"


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_committed_tour_holds_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    cells = code_cells(notebook)
    assert cells and all(not c.outputs and c.execution_count is None for c in cells)


@pytest.mark.slow
def test_the_tour_runs_top_to_bottom_on_a_fresh_clone(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    clone = fresh_clone(tmp_path)
    for name, value in dict(PYTHONPATH=str(offline_guard(tmp_path)), HF_HUB_OFFLINE="1",
                            TOUR_TRAIN_SECONDS="3", TOUR_OUTPUT=str(tmp_path / "tour"),
                            OMP_NUM_THREADS=str(torch.get_num_threads())).items():
        monkeypatch.setenv(name, value)  # the kernel's environment
    notebook = nbformat.read(clone / "notebooks" / "tour.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(clone / "notebooks")}}).execute()
    cells = code_cells(notebook)
    pictures = {k: len(re.findall(r"^show\(|plt\.show\(\)", c.source, flags=re.M))
                for k, c in enumerate(cells)}
    assert sum(pictures.values()) >= 9
    for k, count in pictures.items():  # every picture is inline
        shown = sum("image/png" in out.get("data", {}) for out in cells[k].outputs)
        assert shown == count, cells[k].source
    printed = "".join(out.get("text", "") for c in cells for out in c.outputs)
    assert "ddpm-1000" in printed and "dpm-solver-20-eta1" in printed
    assert "the same images: True" in printed
    assert (tmp_path / "tour" / "hub" / "model.safetensors").is_file()
    assert not (clone / "runs").exists()  # the shipped model stays the default of generate.py
