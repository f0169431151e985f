"""hardneg's pipeline: config, stage runner, local and Ray execution, resume."""

from pipeline.api import mine, run_mine
from pipeline.config import MineConfig

__all__ = ["MineConfig", "mine", "run_mine"]
