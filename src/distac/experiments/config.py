"""Experiment configuration: which backbone, which tasks, which sources, which methods.

Configs are YAML files (``src/distac/configs/experiments/*.yaml``, or any path) read into
:class:`ExperimentConfig`; every value can be overridden with ``--set``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distac.conditioning.losses import LOW_CONFIDENCE_STUDENT_TEMPERATURE
from distac.config import build_dataclass, check_device_option, check_option, load_config
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

#: DisTaC temperatures per scenario kind (REFERENCE: T_s > T_t raises the students' confidence;
#: the bundled configs with published low-confidence pages pin the T_s = 2 they were made with).
DEFAULT_CONDITION_PER_SCENARIO: dict[str, dict[str, Any]] = {
    "norm_mismatch": {"teacher_temperature": 1.0, "student_temperature": 1.0},
    "low_confidence": {"teacher_temperature": 1.0, "student_temperature": LOW_CONFIDENCE_STUDENT_TEMPERATURE},
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
    #: named fine-tuning recipes; given ones are added to (or replace, by name) ``DEFAULT_RECIPES``
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
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
    #: (given ones extend ``DEFAULT_CONDITION_PER_SCENARIO``:
    #: ``--set condition_per_scenario.low_confidence.student_temperature=4`` keeps the teacher
    #: temperature and the norm-mismatch pair)
    condition_per_scenario: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: extra studies: scale_curve (Fig. 3), scaling_alone (App. E.4), label_smoothing_sweep (Fig. 4), ...
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A config that names one recipe or one temperature extends the defaults rather than dropping
        # the rest of them (which would silently run, say, norm mismatch with other temperatures).
        self.recipes = {**DEFAULT_RECIPES, **self.recipes}
        self.condition_per_scenario = {
            kind: {**DEFAULT_CONDITION_PER_SCENARIO.get(kind, {}), **values}
            for kind, values in {**DEFAULT_CONDITION_PER_SCENARIO, **self.condition_per_scenario}.items()
        }
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
        validate_sections(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def condition_settings(self, scenario: str) -> dict[str, Any]:
        """DisTaC settings for a scenario: shared ones, then its kind's (the low-confidence temperatures),
        then its own on top. A scenario's own entry used to replace its kind's, so ``mixup: {beta: 1.0}``
        silently dropped the low-confidence student temperature."""
        spec = self.scenarios.get(scenario, {})
        per = self.condition_per_scenario
        kind = scenario_kind(scenario, spec)
        own = per.get(scenario, {}) if scenario != kind else {}
        return {"seed": self.seed, "device": self.device, **self.condition, **per.get(kind, {}), **own}

    def coefficient_grid(self) -> list[float]:
        if self.grid is not None:
            return [float(x) for x in self.grid]
        return [round(i * 0.05, 2) for i in range(21)]


#: Keys a scenario may set (see ``Pipeline.run_scenario``).
SCENARIO_KEYS = ("recipe", "long_recipe", "long_tasks", "condition", "kappa", "kind", "methods")
#: What a scenario is an instance of: it decides the conditioning temperatures and kappa rule.
#: A scenario named after a kind needs no ``kind`` key; others (e.g. ``mixup``) must set it.
SCENARIO_KINDS = ("original", "norm_mismatch", "low_confidence")
#: Optional studies and the keys each accepts (see ``ExperimentRunner`` in pipeline.py). A study
#: entry is named after its kind, or ``<kind>@<label>`` to run one kind twice with other options
#: (``unlabeled_data@low_confidence: {scenario: low_confidence}``).
STUDY_KEYS: dict[str, tuple[str, ...]] = {
    "scaling_alone": (),
    "scale_curve": ("scales", "recipe"),
    "label_smoothing_sweep": ("alphas", "methods", "distac_alphas"),
    "unlabeled_data": ("scenario", "long_task", "amounts", "corruptions", "methods"),
}


def study_kind(name: str) -> str:
    """``unlabeled_data@low_confidence`` -> ``unlabeled_data``."""
    return name.split("@", 1)[0]


def scenario_kind(name: str, spec: dict[str, Any]) -> str:
    """The kind of a scenario: its ``kind`` key, else its name if that is a kind, else inferred."""
    if "kind" in spec:
        return str(spec["kind"])
    if name in SCENARIO_KINDS:
        return name
    if spec.get("long_recipe"):
        return "norm_mismatch"
    return "low_confidence" if spec.get("recipe", "base") != "base" else "original"


LIMIT_KEYS = ("train", "validation", "test")


def validate_sections(config: ExperimentConfig) -> None:
    """Check the nested sections now, so a typo or out-of-range value fails before any fine-tuning
    starts (the pipeline builds these configs only when it reaches each step)."""
    from distac.conditioning.distac import ConditionConfig
    from distac.experiments.merge_eval import EvalSettings
    from distac.merging.registry import get_method
    from distac.models.base import check_model_options
    from distac.models.registry import MODEL_FAMILIES
    from distac.training.finetune import FinetuneConfig
    from distac.training.losses import LossConfig

    if config.family not in MODEL_FAMILIES:
        raise ConfigError(f"experiment {config.name!r}: unknown model family {config.family!r}; known {MODEL_FAMILIES}")
    if not config.backbone:
        raise ConfigError(f"experiment {config.name!r}: empty backbone")
    check_model_options(config.family, config.model_options)
    if not config.methods or not isinstance(config.methods, list):
        raise ConfigError(f"experiment {config.name!r}: methods must be a non-empty list, got {config.methods!r}")
    if len(set(config.methods)) != len(config.methods):
        raise ConfigError(f"experiment {config.name!r}: a method is listed twice in {config.methods}")
    check_device_option("experiment", "device", config.device)
    if any(not t for t in config.tasks):
        raise ConfigError(f"experiment {config.name!r}: empty task name in {config.tasks}")
    bad_limits = sorted((k for k in config.limits if k not in LIMIT_KEYS), key=str)
    if bad_limits:
        raise ConfigError(f"limits: unknown split(s) {bad_limits}; valid: {list(LIMIT_KEYS)}")
    for split, limit in config.limits.items():
        check_option("limits", split, limit, low=1, integer=True, optional=True)
    check_option("experiment", "seed", config.seed, low=0, high=2**63 - 1, integer=True)
    for i, value in enumerate(config.grid or []):
        check_option("grid", str(i), value, low=-1e6, high=1e6)
    if config.grid is not None and not config.grid:
        raise ConfigError("grid: empty coefficient grid (use null for the default 0..1 step 0.05)")

    base = dict(config.finetune)
    base_loss = base.pop("loss", {"kind": "ce"})
    for name, recipe in config.recipes.items():
        spec = dict(recipe)
        multiplier = spec.pop("lr_multiplier", 1.0)
        check_option(f"recipes.{name}", "lr_multiplier", multiplier, low=0.0, low_inclusive=False)
        loss = build_dataclass(LossConfig, spec.pop("loss", base_loss), f"recipes.{name}.loss")
        values = {"seed": config.seed, "device": config.device, **base, **spec}
        build_dataclass(FinetuneConfig, {**values, "loss": loss}, f"finetune (recipe {name!r})")
        lr = values.get("lr", 1e-5)
        if isinstance(lr, int | float) and not isinstance(lr, bool):
            check_option(f"recipes.{name}", "lr x lr_multiplier", lr * multiplier, low=0.0, high=10.0)

    for scenario, spec in config.scenarios.items():
        unknown = sorted((k for k in spec if k not in SCENARIO_KEYS), key=str)
        if unknown:
            raise ConfigError(f"scenario {scenario!r}: unknown key(s) {unknown}; valid: {list(SCENARIO_KEYS)}")
        long_tasks = spec.get("long_tasks")
        if long_tasks is not None and (
            not isinstance(long_tasks, list) or any(t not in config.tasks for t in long_tasks)
        ):
            raise ConfigError(
                f"scenario {scenario!r}: long_tasks must be null or a list of the tasks {config.tasks}, "
                f"got {long_tasks!r}"
            )
        if "kappa" in spec and spec["kappa"] not in ("one", "shrink"):
            raise ConfigError(f"scenario {scenario!r}: kappa must be 'one' or 'shrink', got {spec['kappa']!r}")
        if "condition" in spec and not isinstance(spec["condition"], bool):
            raise ConfigError(f"scenario {scenario!r}: condition must be true/false, got {spec['condition']!r}")
        for method in spec.get("methods") or []:
            if method not in config.methods:
                raise ConfigError(f"scenario {scenario!r}: method {method!r} is not in methods {config.methods}")
        if "kind" in spec and spec["kind"] not in SCENARIO_KINDS:
            raise ConfigError(
                f"scenario {scenario!r}: kind must be one of {list(SCENARIO_KINDS)}, got {spec['kind']!r}"
            )
    for scenario in {*config.scenarios, *SCENARIO_KINDS}:
        build_dataclass(ConditionConfig, config.condition_settings(scenario), f"condition (scenario {scenario!r})")
    validate_studies(config)

    from distac.merging.registry import available_methods

    # options of a known method that this run leaves out (--set methods=[...] on a bundled config) are
    # checked and kept for when it is back; a name that is no method at all is a typo
    unknown = sorted((m for m in config.method_options if m not in available_methods()), key=str)
    if unknown:
        raise ConfigError(f"method_options: unknown merging method(s) {unknown}; known: {available_methods()}")
    for method in {*config.methods, *config.method_options}:
        get_method(method, **config.method_options.get(method, {}))
    settings = build_dataclass(EvalSettings, {"device": config.device, **config.evaluation}, "evaluation")
    check_option("evaluation", "batch_size", settings.batch_size, low=1, integer=True)
    check_option("evaluation", "validation_examples", settings.validation_examples, low=1, integer=True, optional=True)
    check_option("evaluation", "test_examples", settings.test_examples, low=1, integer=True, optional=True)


def validate_studies(config: ExperimentConfig) -> None:
    from distac.data.corruption import CORRUPTIONS

    for study, options in config.studies.items():
        kind = study_kind(study)
        if kind not in STUDY_KEYS:
            raise ConfigError(
                f"studies: unknown study {study!r}; known {sorted(STUDY_KEYS)} (optionally <kind>@<label>)"
            )
        options = options or {}
        if not isinstance(options, dict):
            raise ConfigError(f"studies.{study}: expected a mapping of options, got {options!r}")
        unknown = sorted(k for k in options if k not in STUDY_KEYS[kind])
        if unknown:
            raise ConfigError(f"studies.{study}: unknown key(s) {unknown}; valid: {list(STUDY_KEYS[kind])}")
        scenario = options.get("scenario")
        if scenario is not None:
            spec = config.scenarios.get(scenario)
            if spec is None or scenario_kind(scenario, spec) not in ("norm_mismatch", "low_confidence"):
                raise ConfigError(
                    f"studies.{study}.scenario: {scenario!r} is not a norm_mismatch or low_confidence scenario "
                    f"of this experiment ({sorted(config.scenarios)})"
                )
        for method in options.get("methods") or []:
            if method not in config.methods:
                raise ConfigError(f"studies.{study}.methods: {method!r} is not in methods {config.methods}")
        for name in ("alphas", "distac_alphas"):
            for i, alpha in enumerate(options.get(name) or []):
                check_option(f"studies.{study}.{name}", str(i), alpha, low=0.0, high=1.0, high_inclusive=False)
        for i, amount in enumerate(options.get("amounts") or []):
            check_option(f"studies.{study}.amounts", str(i), amount, low=1, integer=True)
        for i, corruption in enumerate(options.get("corruptions") or []):
            if not isinstance(corruption, dict) or corruption.get("kind") not in CORRUPTIONS:
                raise ConfigError(
                    f"studies.{study}.corruptions[{i}]: expected {{kind: one of {list(CORRUPTIONS)}, strength: x}}, "
                    f"got {corruption!r}"
                )
            check_option(f"studies.{study}.corruptions[{i}]", "strength", corruption.get("strength", 0.0), low=0.0)
        long_task = options.get("long_task")
        if long_task is not None and long_task not in config.tasks:
            raise ConfigError(f"studies.{study}.long_task: {long_task!r} is not one of the tasks {config.tasks}")


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
    # a bad value may come from the YAML or from a --set: name both, so the user looks in the right place
    where = str(path) if not overrides else f"{path} with --set {' '.join(overrides)}"
    return build_dataclass(ExperimentConfig, values, where=where)


def available_experiments() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
