"""Fixtures shared by the model tests (import them into a test module to use them)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Model tests run small ops: on 2 shared cores, OpenMP threads spin-waiting on each other make
    2 threads up to ~20x slower than 1 (measured), so these modules run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
