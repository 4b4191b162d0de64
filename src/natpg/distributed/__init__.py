"""Scale-out sampling: the environment copies split over rollout workers, in-process or as Ray actors.

``sampler='ray'`` (``RaySampler``) runs each worker as a Ray actor; ``sampler='workers'``
(``WorkerSampler``) runs the same ``RolloutWorker`` code one worker after the other in this process
and is the reference the Ray sampler equals bit for bit. Ray is optional and imported only when a
``RaySampler`` is built (``pip install 'natpg[ray]'``). See docs/distributed.md.
"""

from .sampler import (DistributedSampler, RaySampler, WorkerFailure, WorkerSampler, check_ray_installed,
                      make_sampler, require_ray)
from .workers import RolloutWorker, WorkerResult, WorkerSpec

__all__ = ["DistributedSampler", "RaySampler", "RolloutWorker", "WorkerFailure", "WorkerResult", "WorkerSampler",
           "WorkerSpec", "check_ray_installed", "make_sampler", "require_ray"]
