"""Baseline tests run torch single-threaded, then restore the session's setting.

Their arrays are small (≤ 2,000 × 27), so a second thread buys nothing, while OpenMP's default
spin-waiting makes every multi-threaded array operation 10–50× slower whenever another process
competes for the 2 cores (measured: test_interface 1.5 s alone, 57 s beside another test run).
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
