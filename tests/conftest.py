"""Fixtures shared by the training tests (test_training, test_train_reward, test_checkpointing)."""
from __future__ import annotations

import pytest
import torch

from met3r_diffusers.testing import reset_accelerate_state


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run starts from a clean Accelerate singleton state (reset after the test)."""
    yield
    reset_accelerate_state()


@pytest.fixture
def one_thread():
    """Runs compared bit for bit use one thread (same arithmetic, and fast on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
