import os

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "disabled")


@pytest.fixture
def float64():
    """Maths tests run in float64; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
