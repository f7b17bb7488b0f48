"""A local Hydra launcher whose sweep goes on when one job's overrides cannot compose.

Hydra's basic launcher composes each job's config inside its loop, so one bad value
(``optim.lr=2e-5,abc``) ends the whole sweep there. This launcher records that job as
failed (``<job dir>/failed.json``, read by the sweep summary) and runs the rest.
Selected with ``hydra/launcher=engine`` (the default in conf/config.yaml).
"""

# No `from __future__ import annotations`: Hydra executes this module without registering it in
# sys.modules, and dataclasses cannot resolve postponed annotations there.
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class EngineLauncherConf:
    _target_: str = "hydra_plugins.engine_launcher.engine_launcher.EngineLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="engine", node=EngineLauncherConf, provider="engine")


class EngineLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from engine.sweep import record_failure

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally")
        runs: list[JobReturn] = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            try:
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except Exception as error:  # a bad override value: this job fails, the sweep goes on
                log.error(f"\t#{idx} failed to compose: {error}")
                job_dir = sweep_dir / _subdir(list(overrides), idx)
                job_dir.mkdir(parents=True, exist_ok=True)
                record_failure(job_dir, error, list(overrides))
                # COMPLETED with a NaN result: the sweep goes on, the summary reads failed.json.
                failed = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
                failed.return_value = float("nan")
                runs.append(failed)
                continue
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            runs.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=self.task_function,
                    config=sweep_config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs


def _subdir(overrides: list[str], idx: int) -> str:
    """The job's folder name as Hydra's override_dirname would make it (it could not be composed)."""
    from engine.config import job_dirname

    kept = sorted(o for o in overrides if not o.startswith(("hydra.", "resume=", "data.cache_dir=", "output_dir=")))
    return job_dirname(",".join(kept)) if kept else f"job_{idx}"


@dataclass
class EngineSweeperConf:
    _target_: str = "hydra_plugins.engine_launcher.engine_launcher.EngineSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="engine", node=EngineSweeperConf, provider="engine")


class EngineSweeper(BasicSweeper):
    """Hydra's grid sweeper, minus the up-front check that ends a whole sweep for one job's bad value:
    the launcher above composes each job and records the ones that fail."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None
