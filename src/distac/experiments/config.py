"""Experiment configuration: which backbone, which tasks, which sources, which methods.

Configs are YAML files (``src/distac/configs/experiments/*.yaml``, or any path) read into
:class:`ExperimentConfig`; every value can be overridden with ``--set``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distac.config import build_dataclass, load_config
from distac.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "experiments"

#: How each kind of source is fine-tuned, relative to the suite's base recipe.
DEFAULT_RECIPES: dict[str, dict[str, Any]] = {
    "base": {},
    "lr_x10": {"lr_multiplier": 10.0},
    "label_smoothing": {"loss": {"kind": "label_smoothing", "alpha": 0.1}},
    "mixup": {"loss": {"kind": "mixup"}},
    "focal": {"loss": {"kind": "focal", "gamma": 2.0}},
}


@dataclass
class ExperimentConfig:
    name: str
    family: str
    backbone: str
    tasks: list[str]
    model_options: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, int | None] = field(default_factory=lambda: {"train": None, "validation": None, "test": None})
    seed: int = 0
    device: str = "auto"
    finetune: dict[str, Any] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_RECIPES))
    #: scenario -> {"recipe": name, "long_tasks": [...] (norm mismatch only)}
    scenarios: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "original": {"recipe": "base"},
            "norm_mismatch": {"recipe": "base", "long_recipe": "lr_x10", "long_tasks": None},
            "low_confidence": {"recipe": "label_smoothing"},
        }
    )
    methods: list[str] = field(
        default_factory=lambda: ["task_arithmetic", "ties", "consensus_ta", "emr", "tsvm", "iso_cts", "wudi"]
    )
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: list[float] | None = None  # default: 0.0 .. 1.0 step 0.05
    #: DisTaC settings shared by all scenarios, and per-scenario overrides (temperatures)
    condition: dict[str, Any] = field(default_factory=dict)
    condition_per_scenario: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "norm_mismatch": {"teacher_temperature": 1.0, "student_temperature": 1.0},
            "low_confidence": {"teacher_temperature": 1.0, "student_temperature": 2.0},
        }
    )
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: extra studies: scale_curve (Fig. 3), scaling_alone (App. E.4), label_smoothing_sweep (Fig. 4), ...
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError(f"experiment {self.name!r}: no tasks")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"experiment {self.name!r}: duplicate tasks in {self.tasks}")
        for scenario, spec in self.scenarios.items():
            for key in ("recipe", "long_recipe"):
                if key in spec and spec[key] not in self.recipes:
                    raise ConfigError(
                        f"scenario {scenario!r}: unknown recipe {spec[key]!r}; known {sorted(self.recipes)}"
                    )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def coefficient_grid(self) -> list[float]:
        if self.grid is not None:
            return [float(x) for x in self.grid]
        return [round(i * 0.05, 2) for i in range(21)]


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown experiment {name_or_path!r}: not a file and not one of {known}")


def load_experiment(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    path = resolve_config_path(name_or_path)
    values = load_config(path, overrides)
    return build_dataclass(ExperimentConfig, values, where=str(path))


def available_experiments() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
