"""Scale-out sampling: the environment copies split over rollout workers, in this process, in local processes
or as Ray actors.

``DistributedSampler`` merges the workers' rollouts; a pool runs the same ``RolloutWorker`` code:
``InProcessPool`` (``sampler='workers'``, one worker after the other in this process: the reference the
others equal bit for bit), ``ProcessPool`` (``'processes'``) or ``RayPool`` (``'ray'``). Ray is optional
and imported only when a ``RayPool`` is built (natpg's ``[ray]`` extra). See docs/distributed.md.
"""

from .processes import ProcessPool
from .ray_pool import RayPool, check_ray_installed, require_ray
from .sampler import DistributedSampler, InProcessPool, WorkerPool, make_sampler
from .workers import RolloutWorker, WorkerFailure, WorkerPlan, WorkerResult, WorkerSpec

__all__ = ["DistributedSampler", "InProcessPool", "ProcessPool", "RayPool", "RolloutWorker", "WorkerFailure",
           "WorkerPlan", "WorkerPool", "WorkerResult", "WorkerSpec", "check_ray_installed", "make_sampler",
           "require_ray"]
