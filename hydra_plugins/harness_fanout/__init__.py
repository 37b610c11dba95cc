"""Hydra's entry to the harness's fan-out (``harness.run.fanout``): a sweeper that turns each composed sweep with
``fanout=true`` into one job per unit of work, launched in waves through whichever ``hydra/launcher`` is chosen.

Hydra instantiates sweepers only from the ``hydra_plugins`` package, hence this thin module; the logic lives in
``harness.run.fanout``. It imports nothing of the harness until a sweep runs (Hydra imports every plugin at start).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf


class UnitSweeper(BasicSweeper):
    """The basic sweeper's cartesian product of ``-m`` lists, each job then fanned out into its units when its config
    says ``fanout=true`` (others run as the basic sweeper runs them); the leaderboards are built here at the end."""

    def sweep(self, arguments: List[str]) -> Any:
        from harness.errors import HarnessError
        from harness.run.fanout import FannedSweep, fanned, launch_waves, merged_waves

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = self.split_arguments(parser.parse_overrides(self._parse_config() + list(arguments)), None)[0]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        try:
            plain, sweeps = [], []
            for job in jobs:
                config = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
                if fanned(config):
                    sweeps.append(FannedSweep(job, config))
                else:
                    plain.append(list(job))
            launch_waves(self.launcher, [plain] + merged_waves(sweeps))
            for fanned_sweep in sweeps:
                print(f"leaderboard: {fanned_sweep.finish()}", flush=True)
        except HarnessError as error:
            print(f"align-harness: error: {error}", file=sys.stderr)
            sys.exit(2)
        return None
