"""natpg — natural policy gradient methods for PyTorch and Gymnasium."""

from . import fisher, policies
from .agent import ACKTR, NAC, NPG, PPO, TRPO, VPG, Agent, load
from .config import Config
from .evaluation import evaluate
from .deployment import export
from .rollout import NonFiniteEnvError
from .train import TrainingFault
from .video import record_video

__all__ = ["ACKTR", "NAC", "NPG", "PPO", "TRPO", "VPG", "Agent", "Config", "NonFiniteEnvError", "TrainingFault", "evaluate", "export", "fisher", "load", "policies", "record_video"]
__version__ = "0.1.0"
