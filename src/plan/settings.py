"""moetron-plan's config schema: the trainer's (`RootConfig`) plus a `plan` node with the
efficiency factors (moetron.plan.hardware) and what to search, registered as `plan_schema` for
conf/plan.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from moetron.plan.hardware import Efficiency
from moetron.train.config import RootConfig, register_configs


@dataclass
class PlanSettings(Efficiency):
    """moetron-plan's own settings (conf/plan.yaml): the efficiency factors (moetron.plan.hardware
    documents each default), what to search, and the run to cost."""
    tokens: float = 14.8e12  # tokens of the run whose days and cost are shown (the report's 14.8T)
    recompute: Optional[bool] = None  # None: searched; true: the report's selective recompute
    micro_batches: list[int] = field(default_factory=lambda: [1, 2, 4])  # micro-batch sizes tried
    top: int = 10  # rows of the table


@dataclass
class PlanRoot(RootConfig):
    plan: PlanSettings = field(default_factory=PlanSettings)


def register_plan_configs() -> None:
    """The trainer's schemas, and `plan_schema`."""
    register_configs()
    ConfigStore.instance().store(name="plan_schema", node=PlanRoot)
