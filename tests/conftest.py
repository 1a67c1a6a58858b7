"""Shared fixtures (the helpers themselves are in tests/helpers.py). Everything runs on
the CPU and never touches the network; subprocess-heavy tests are marked `slow`
(`pytest -m "not slow"` is the edit loop). pytest.ini runs the files on every core
(pytest-xdist, `-n auto`, a file's tests on one worker); `-n 0` runs them in this process."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import helpers


def _threads() -> int:
    """Threads per test process: $TEST_THREADS, else the cores shared among pytest-xdist's
    workers (at most 2: the tiny models gain nothing from more)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    return int(os.environ.get("TEST_THREADS", 0)) or max(1, min(2, (os.cpu_count() or 1) // workers))


torch.set_num_threads(_threads())
os.environ.setdefault("OMP_NUM_THREADS", str(_threads()))  # the scripts keep to it (utils/machine.py)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker a core, at most 4 (each holds MNIST, a model and
    an evaluator: about 1.5 GB); none on one core or for one file, where starting workers
    costs more than they save."""
    files = {str(arg).split("::")[0] for arg in config.args}
    if len(files) == 1 and files.pop().endswith(".py"):
        return 0
    cores = os.cpu_count() or 1
    return min(4, cores) if cores > 1 else 0


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from utils.datasets import open_dataset

    open_dataset("mnist", helpers.DATA_DIR, download=False)  # fails loudly without the data
    return helpers.DATA_DIR


@pytest.fixture
def tiny(tmp_path, data_dir):
    def make(**changes):
        return helpers.tiny_config(tmp_path, data_dir, **changes)
    return make


@pytest.fixture(scope="session")
def mnist():
    from utils.datasets import open_dataset

    return open_dataset("mnist", helpers.DATA_DIR, download=False)


@pytest.fixture(scope="session")
def quick_evaluator(mnist):
    """An Evaluator with the shipped classifier (loaded, not trained: seconds)."""
    from evaluation.metrics import Evaluator

    return Evaluator(mnist, device="cpu", progress=False, log=helpers.quiet)


@pytest.fixture
def shared_evaluator(monkeypatch, quick_evaluator):
    """The scripts' and the trainer's evaluations use the session's Evaluator."""
    from sampling import jobs
    from training import trainer

    monkeypatch.setattr(jobs, "make_evaluator_factory",
                        lambda args, progress: (lambda config: quick_evaluator))
    monkeypatch.setattr(trainer, "Evaluator", lambda *a, **k: quick_evaluator)
    return quick_evaluator


def pytest_collection_modifyitems(config, items):
    """The files with the most `slow` tests first: pytest-xdist hands out whole files in
    this order (pytest.ini: --no-loadscope-reorder; by default it would put the files with
    the most tests first), so the long ones start early and the short ones fill every
    worker's end."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: a file's tests keep their order
