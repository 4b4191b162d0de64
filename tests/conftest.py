import os
import subprocess
import sys
import time

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


@pytest.fixture
def exits_once_its_learner_is_gone():
    """``check(start_worker)``: ``start_worker(pid)`` starts a process that watches ``pid`` (a sleeping stand-in for
    the learner); it must live while that process does and exit with code 1 once it is killed."""

    def check(start_worker) -> None:
        learner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        worker = start_worker(learner.pid)
        try:
            time.sleep(1.0)
            assert worker.is_alive()  # the learner lives: the worker waits
            learner.kill()
            learner.wait()
            worker.join(timeout=30)
            assert not worker.is_alive() and worker.exitcode == 1
        finally:
            learner.kill()
            if worker.is_alive():
                worker.kill()

    return check
