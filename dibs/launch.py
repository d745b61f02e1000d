"""How many CPU threads a run's torch uses, so that runs launched side by side do not thrash each other.

``threads`` (``conf/config.yaml``) is ``auto`` or a number of threads:

- a number ``n`` sets ``torch.set_num_threads(n)`` and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for the processes
  the run starts (the verifier's workers, Lightning's other ranks);
- ``auto`` keeps torch's default, except where the launcher runs several runs at once on this machine's cores:
  Hydra's joblib launcher with ``n_jobs`` > 1 (or -1, every core) gives each run ``max(1, cpus // n_jobs)``,
  and a submitit launcher with ``cpus_per_task`` gives each process at most that many. ``auto`` never raises
  torch's default, so an ``OMP_NUM_THREADS`` set lower by hand still holds.

``cpus`` are the cores this process may run on (its affinity mask, e.g. a SLURM or container limit), not the
machine's. Every run logs what it chose: ``torch threads: 1 (threads=auto: joblib launcher, n_jobs=2 on 2 CPUs)``.

``set_up_process`` also undoes what a joblib worker changes for the processes a run starts: loky makes its own
start method multiprocessing's default there, and a process started with another context (the verifier's
forkserver workers) is told to use it, cannot find it and dies, so the verifier would wait for ever.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "THREAD_VARIABLES",
    "apply_threads",
    "available_cpus",
    "launcher_share",
    "reset_start_method",
    "resolve_threads",
    "set_up_process",
]

log = logging.getLogger("dibs")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by the child processes' torch at start-up


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _joblib_jobs(n_jobs: Any, cpus: int) -> int:
    """joblib's count of concurrent jobs: -1 is every core, -2 all but one, and so on."""
    n = int(n_jobs) if n_jobs is not None else 1
    return max(1, cpus + 1 + n) if n < 0 else max(1, n)


def launcher_share(launcher: Mapping[str, Any] | None, cpus: int) -> tuple[int, str] | None:
    """(threads per process, why) when the Hydra launcher config ``launcher`` shares this machine's cores
    between runs or bounds each process's, else None (one run at a time: torch's default is right)."""
    if not launcher:
        return None
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        jobs = _joblib_jobs(launcher.get("n_jobs", -1), cpus)
        if jobs > 1:
            return max(1, cpus // jobs), f"joblib launcher, n_jobs={launcher.get('n_jobs')} on {cpus} CPUs"
        return None
    if "hydra_submitit_launcher" in target and launcher.get("cpus_per_task"):
        return int(launcher["cpus_per_task"]), f"submitit launcher, cpus_per_task={launcher['cpus_per_task']}"
    return None


def resolve_threads(setting: Any, *, launcher: Mapping[str, Any] | None, cpus: int, default: int) -> tuple[int, str]:
    """(the number of torch threads, why) for the config value ``threads``; ``default`` is torch's own count."""
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 1:
            raise ValueError(f"threads={setting}: must be auto or a number >= 1")
        return setting, f"threads={setting}"
    if setting != "auto":
        raise ValueError(f"threads={setting!r}: must be auto or a number >= 1")
    share = launcher_share(launcher, cpus)
    if share is None:
        return default, "threads=auto: torch's default"
    n, why = share
    if default < n:  # never more than torch would use by itself (OMP_NUM_THREADS set lower by hand)
        return default, f"threads=auto: {why}, capped by torch's default of {default}"
    return n, f"threads=auto: {why}"


def _hydra_launcher() -> dict[str, Any] | None:
    """The launcher config of the running Hydra job, or None outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    node = HydraConfig.get().get("launcher")
    if node is None:
        return None
    return {key: node.get(key) for key in ("_target_", "n_jobs", "cpus_per_task")}  # only these are resolved


def apply_threads(setting: Any) -> int:
    """Set torch's CPU threads for this run from the config value ``threads`` and log the choice; returns it."""
    import torch

    default = torch.get_num_threads()
    n, why = resolve_threads(setting, launcher=_hydra_launcher(), cpus=available_cpus(), default=default)
    if n != default:
        torch.set_num_threads(n)
    if why != "threads=auto: torch's default":  # the processes this run starts get the same count
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(n)))
    log.info("torch threads: %d (%s)", torch.get_num_threads(), why)
    return n


def reset_start_method() -> str | None:
    """In a joblib (loky) worker, put multiprocessing's default start method back to the platform's; returns the
    start method replaced (``loky``), or None where there was nothing to do."""
    if multiprocessing.get_start_method(allow_none=True) != "loky":
        return None
    multiprocessing.set_start_method(None, force=True)  # the platform's default, chosen on first use
    return "loky"


def set_up_process(threads: Any) -> int:
    """Everything a run does first about the process its launcher gave it: the start method, then the threads."""
    reset_start_method()
    return apply_threads(threads)
