"""The paper's experiments as one resumable pipeline.

Stages, each cached in the run directory so an interrupted run resumes where it stopped:

1. ``sources/<recipe>/<task>/``: fine-tuned source models (distac model dirs) + their scores;
2. ``conditioned/<scenario>/<task>/``: DisTaC-conditioned sources;
3. ``merges/<scenario>/<variant>/<method>.json``: merge + coefficient search + test metrics;
4. ``results.json``, ``table1.md`` and plots.

The long stages (fine-tuning, conditioning) also checkpoint mid-run under ``work/`` and continue
from there, ending with the same weights as an uninterrupted run.

Scenarios (Table 1 of the paper): ``original`` (every source from the base recipe),
``norm_mismatch`` (one source fine-tuned with a 10x learning rate, averaged over the tasks in
``long_tasks``), ``low_confidence`` (every source trained with label smoothing 0.1); further
low-confidence causes (mixup, focal loss) are scenarios with another recipe.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from distac.atomic import atomic_write_json, exclusive, visible
from distac.checkpoints import StateDict
from distac.data import TaskData, load_task
from distac.environment import environment_record
from distac.errors import ConfigError
from distac.experiments.config import ExperimentConfig, scenario_kind, study_kind
from distac.experiments.merge_eval import (
    EvalSettings,
    TaskModelBank,
    evaluate_method,
    individual_scores,
    searches_tall_lambdas,
)
from distac.experiments.report import is_defined
from distac.models import ModelSpec, build_model, load_model, save_model
from distac.models.base import ClassifierModel
from distac.models.batchnorm import has_batchnorm
from distac.models.registry import resolve_backbone

log = logging.getLogger("distac.experiments")

#: Config keys that the cached stages depend on (see ``ExperimentRunner.check_cache_compatible``).
CACHE_DEFINING_KEYS = (
    "family",
    "backbone",
    "tasks",
    "model_options",
    "limits",
    "seed",
    "finetune",
    "grid",
    "condition",
    "condition_per_scenario",
    "evaluation",
)


class ExperimentRunner:
    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: str | Path,
        *,
        data_root: str | Path | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.data_root = data_root
        self.echo = echo
        self._tasks: dict[str, TaskData] = {}
        self._pretrained: StateDict | None = None
        self._has_batchnorm = False  # set with self._pretrained
        #: the config's recipes plus the ones studies add (label-smoothing strengths)
        self.recipes: dict[str, dict[str, Any]] = dict(config.recipes)
        self.timings: dict[str, float] = {}
        torch.manual_seed(config.seed)

    # ------------------------------------------------------------------------------------ data/models
    def task_data(self, task: str) -> TaskData:
        if task not in self._tasks:
            limits = self.config.limits
            data = load_task(task, self.data_root)
            self._tasks[task] = data.limit(
                limits.get("train"), limits.get("validation"), limits.get("test"), seed=self.config.seed
            )
            self._check_data_unchanged(self._tasks[task])
        return self._tasks[task]

    def _check_data_unchanged(self, data: TaskData) -> None:
        """The run dir's stages were made on this task's data: record a fingerprint of its splits the first
        time, and refuse other data later (another --data-root or $DISTAC_DATA whose ``sst2`` is another
        data set would otherwise be mixed silently with the cached stages). Moving the same data is fine."""
        from distac.resume import data_fingerprint

        file = self.run_dir / "data.json"
        current = {
            split: data_fingerprint(data.split(split).inputs, data.split(split).labels)
            for split in ("train", "validation", "test")
        }
        with exclusive(file):  # another run on this run dir may be recording its tasks
            recorded = json.loads(file.read_text()) if file.is_file() else {}
            previous = recorded.get(data.name)
            if previous is None:
                atomic_write_json(file, {**recorded, data.name: current})
        if previous is not None and previous != current:
            raise ConfigError(
                f"{self.run_dir} was made on other {data.name} data than {data.source or data.name} "
                f"(splits {', '.join(s for s in current if previous.get(s) != current[s])} differ; see {file}): "
                "use the data root it was made with, another --run-dir, or delete this one to start over"
            )

    def spec_for(self, task: str) -> ModelSpec:
        data = self.task_data(task)
        return ModelSpec(
            self.config.family,
            resolve_backbone(self.config.backbone),
            data.num_classes,
            task=data.name,
            class_names=data.class_names,
            options=dict(self.config.model_options),
        )

    def pretrained_backbone(self) -> StateDict:
        """theta_pre over the task-vector parameters (identical for every task)."""
        if self._pretrained is None:
            model = build_model(self.spec_for(self.config.tasks[0]), pretrained=True)
            self._has_batchnorm = has_batchnorm(model)
            selector = model.task_vector_selector()
            self._pretrained = {k: v.detach().clone() for k, v in model.state_dict().items() if selector(k, v)}
        return self._pretrained

    def task_vector(self, model: ClassifierModel) -> StateDict:
        pre = self.pretrained_backbone()
        state = model.state_dict()
        return {k: state[k].detach().float() - pre[k].float() for k in pre}

    # ------------------------------------------------------------------------------------ sources
    def recipe_config(self, recipe: str) -> Any:
        from distac.training.finetune import FinetuneConfig
        from distac.training.losses import LossConfig

        base = dict(self.config.finetune)
        spec = dict(self.recipes[recipe])
        multiplier = float(spec.pop("lr_multiplier", 1.0))
        loss = spec.pop("loss", base.pop("loss", {"kind": "ce"}))
        values = {**base, **spec}
        values["lr"] = float(values.get("lr", 1e-5)) * multiplier
        values.setdefault("seed", self.config.seed)
        values.setdefault("device", self.config.device)
        return FinetuneConfig(**values, loss=LossConfig(**loss))

    def source_dir(self, recipe: str, task: str) -> Path:
        return self.run_dir / "sources" / recipe / task

    def ensure_source(self, recipe: str, task: str) -> Path:
        """The fine-tuned source ``recipe/task`` under ``sources/``, made once and then reused."""
        out = self.source_dir(recipe, task)
        if not (out / "distac_model.json").is_file():
            with exclusive(out, self.echo):  # another run on this run dir may be making it: wait, then reuse
                if not (out / "distac_model.json").is_file():
                    self._finetune_source(recipe, task, out)
        cached = json.loads((out / "distac_model.json").read_text()).get("class_names")
        current = self.task_data(task).class_names
        if cached and cached != current:  # e.g. AG News, whose names distac permuted before 2026-11-27
            raise ConfigError(
                f"{out}: a cached source made with other class names for {task} ({cached} here, {current} now); "
                f"its head was built for those. Delete {out} (and the conditioned models and merges made from it) "
                "or use another --run-dir"
            )
        return out

    def _finetune_source(self, recipe: str, task: str, out: Path) -> None:
        from distac.training.finetune import finetune

        config = self.recipe_config(recipe)
        self.echo(f"fine-tuning {task} [{recipe}] lr={config.lr:g} loss={config.loss.kind} steps={config.steps}")
        model = build_model(self.spec_for(task), pretrained=True)
        start = time.perf_counter()
        work_dir = self.run_dir / "work" / "sources" / recipe / task
        result = finetune(model, self.task_data(task), config, work_dir=work_dir)
        record = {
            "recipe": recipe,
            "task": task,
            "seconds": time.perf_counter() - start,
            "config": _jsonable(config),
            "result": _jsonable(result),
        }
        save_model(model, out, extra={"finetune.json": record})
        self._prune_empty_work_dirs(work_dir)

    def _prune_empty_work_dirs(self, work_dir: Path) -> None:
        """Remove ``work_dir`` and its parents below the run dir while they are empty: a finished
        stage leaves no empty ``work/<scenario>/...`` folders. A folder that still holds anything
        (another stage's resume state, a user's file) stays."""
        for folder in (work_dir, *work_dir.parents):
            if self.run_dir not in folder.parents:  # never the run dir itself, nor anything above it
                return
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone: nothing above can be empty either
                if folder.exists():
                    return

    def load(self, path: Path) -> ClassifierModel:
        return load_model(path)

    # ------------------------------------------------------------------------------------ conditioning
    def ensure_conditioned(
        self,
        scenario: str,
        recipe: str,
        task: str,
        kappa: float,
        *,
        overrides: dict[str, Any] | None = None,
        tag: str = "",
    ) -> Path:
        """The DisTaC-conditioned copy of source ``recipe/task`` under ``conditioned/<scenario>/``.

        ``scenario`` picks the settings (temperatures) via ``condition_settings``; ``overrides``
        and a ``tag`` naming them give study variants (less or corrupted unlabeled data).
        """
        from distac.conditioning.distac import ConditionConfig

        name = f"{recipe}-{task}" + (f"-{tag}" if tag else "")
        out = self.run_dir / "conditioned" / scenario / name
        values = {**self.config.condition_settings(scenario), **(overrides or {})}
        config = replace(ConditionConfig(**values), kappa=kappa)
        if (out / "distac_model.json").is_file() and self._conditioned_batchnorm_current(out, config):
            return out
        with exclusive(out, self.echo):  # another run on this run dir may be making it: wait, then reuse
            if (out / "distac_model.json").is_file():
                if self._conditioned_batchnorm_current(out, config):
                    return out
                self.echo(f"  {scenario}/{name}: made with other BatchNorm settings; conditioning again")
            self._condition_source(scenario, recipe, task, kappa, config, name, tag, out)
        return out

    def _condition_source(
        self, scenario: str, recipe: str, task: str, kappa: float, config: Any, name: str, tag: str, out: Path
    ) -> None:
        from distac.conditioning.distac import condition

        self.echo(
            f"conditioning {task} [{recipe}, {scenario}] kappa={kappa:.3f} "
            f"T_t={config.teacher_temperature} T_s={config.student_temperature} steps={config.steps}"
        )
        teacher = self.load(self.ensure_source(recipe, task))
        start = time.perf_counter()
        work_dir = self.run_dir / "work" / scenario / name
        result = condition(teacher, self.pretrained_backbone(), self.task_data(task), config, work_dir=work_dir)
        record = {
            "scenario": scenario,
            "recipe": recipe,
            "task": task,
            "tag": tag,
            "kappa": kappa,
            "seconds": time.perf_counter() - start,
            "config": _jsonable(config),
            "history": _jsonable(result.history),
        }
        record["batchnorm_recomputed_layers"] = result.config.get("batchnorm_recomputed_layers", 0)
        save_model(result.student, out, extra={"condition.json": record})
        self._prune_empty_work_dirs(work_dir)

    def _conditioned_batchnorm_current(self, out: Path, config: Any) -> bool:
        """Whether a cached conditioned model treated BatchNorm statistics as ``config`` asks.

        A changed ``condition`` option is refused by ``check_cache_compatible``, but a changed default
        is not in the run's config: records older than ``batchnorm_statistics`` lack
        ``batchnorm_recomputed_layers`` (they kept the teacher's statistics, current only where nothing
        would be re-estimated: kappa 1), and records older than ``student_batchnorm`` (or made when
        its default was "frozen") lack or hold ``"frozen"`` in their config. Models without BatchNorm
        are unaffected by either, so their records stay current.
        """
        record = json.loads((out / "condition.json").read_text())
        self.pretrained_backbone()  # sets self._has_batchnorm
        if not self._has_batchnorm:
            return True
        if record.get("config", {}).get("student_batchnorm", "frozen") != config.student_batchnorm:
            return False
        if "batchnorm_recomputed_layers" in record:
            return True
        would_recompute = config.batchnorm_statistics == "recompute" or (
            config.batchnorm_statistics == "auto" and config.kappa != 1.0
        )
        return not would_recompute

    # ------------------------------------------------------------------------------------ merging
    def eval_settings(self) -> EvalSettings:
        values = {"device": self.config.device, **self.config.evaluation}
        return EvalSettings(**values)

    def merge_all(
        self,
        scenario_key: str,
        models: dict[str, ClassifierModel],
        individual_models: dict[str, ClassifierModel],
        methods: list[str] | None = None,
    ) -> dict[str, Any]:
        """Run every method (or ``methods``) on these sources; normalized accuracy is relative to
        ``individual_models``. Each method's record is cached in ``merges/<scenario_key>/``."""
        out_dir = self.run_dir / "merges" / scenario_key
        tasks = {t: self.task_data(t) for t in models}
        settings = self.eval_settings()
        ind_bank = TaskModelBank(individual_models, tasks, settings)
        ind_val_file, ind_test_file = out_dir / "individual_validation.json", out_dir / "individual_test.json"
        from distac.evaluation.metrics import TaskMetrics

        if ind_test_file.is_file():
            ind_val = {t: TaskMetrics(**m) for t, m in json.loads(ind_val_file.read_text()).items()}
            ind_test = {t: TaskMetrics(**m) for t, m in json.loads(ind_test_file.read_text()).items()}
        else:
            ind_val, ind_test = individual_scores(ind_bank, "validation"), individual_scores(ind_bank, "test")
            atomic_write_json(ind_val_file, {t: m.to_dict() for t, m in ind_val.items()})
            atomic_write_json(ind_test_file, {t: m.to_dict() for t, m in ind_test.items()})
        bank = TaskModelBank(models, tasks, settings)
        vectors = {t: self.task_vector(m) for t, m in models.items()}
        norms = {t: float(torch.sqrt(sum((v.double() ** 2).sum() for v in tv.values()))) for t, tv in vectors.items()}
        results: dict[str, Any] = {
            "individual": {
                "absolute": _mean(m.score for m in ind_test.values()),
                "normalized": 1.0,
                "test": {t: m.to_dict() for t, m in ind_test.items()},
            },
            "norms": norms,
        }
        pretrained_file = out_dir / "pretrained.json"
        # records made before BatchNorm statistics were re-estimated for merges lack the key: "keep"
        batchnorm = bank.batchnorm_mode()
        cached_pretrained = json.loads(pretrained_file.read_text()) if pretrained_file.is_file() else None
        if cached_pretrained is not None and cached_pretrained.get("batchnorm_statistics", "keep") == batchnorm:
            results["pretrained"] = cached_pretrained
        else:
            results["pretrained"] = evaluate_method(
                "task_arithmetic",
                self.pretrained_backbone(),
                vectors,
                bank,
                individual_val=ind_val,
                individual_test=ind_test,
                grid=None,
                coefficient=0.0,
            ).to_json()
            atomic_write_json(pretrained_file, results["pretrained"])
        for method in methods or self.config.methods:
            file = out_dir / f"{method}.json"
            grid = self.coefficient_grid_for(method)
            cached = self._current_merge_record(file, method, grid, batchnorm)
            if cached is None:
                with exclusive(file, self.echo):  # another run on this run dir may be merging it: wait, reuse
                    cached = self._current_merge_record(file, method, grid, batchnorm)
                    if cached is None:
                        if file.is_file():
                            self.echo(f"  {scenario_key}: {method} options changed; merging again")
                        cached = self._merge_and_record(method, file, grid, vectors, bank, ind_val, ind_test)
                        self.echo(
                            f"  {scenario_key:<40} {method:<16} abs={cached['absolute']:.4f} "
                            f"norm={cached['normalized']:.4f} lambda={cached['coefficient']:.2f}"
                        )
            results[method] = cached
        return results

    def _current_merge_record(
        self, file: Path, method: str, grid: list[float] | None, batchnorm: str
    ) -> dict[str, Any] | None:
        """The cached merge record in ``file`` if it was made as this config would make it now, else None."""
        if not file.is_file():
            return None
        cached = json.loads(file.read_text())
        current = (
            cached.get("info", {}).get("hyperparameters") == self._method_hyperparameters(method)
            and cached.get("batchnorm_statistics", "keep") == batchnorm
            and (cached.get("search") is not None) == (grid is not None)
            and (cached.get("lambda_t_search") is not None)
            == searches_tall_lambdas(method, self.config.method_options.get(method))
        )
        return cached if current else None

    def _merge_and_record(
        self,
        method: str,
        file: Path,
        grid: list[float] | None,
        vectors: dict[str, StateDict],
        bank: TaskModelBank,
        ind_val: dict[str, Any],
        ind_test: dict[str, Any],
    ) -> dict[str, Any]:
        """Merge with ``method`` (its coefficient searched over ``grid``), evaluate, and write the record."""
        start = time.perf_counter()
        evaluation = evaluate_method(
            method,
            self.pretrained_backbone(),
            vectors,
            bank,
            individual_val=ind_val,
            individual_test=ind_test,
            grid=grid,
            hyperparameters=self.config.method_options.get(method),
        )
        record = evaluation.to_json()
        record["seconds_total"] = time.perf_counter() - start
        atomic_write_json(file, record)
        return record

    def coefficient_grid_for(self, method: str) -> list[float] | None:
        """The validation grid for ``method``'s lambda, or None to merge at its default coefficient
        (the tuning-free methods, unless ``evaluation.search_tuning_free``)."""
        from distac.merging.registry import get_method

        tunes = type(get_method(method, **self.config.method_options.get(method, {}))).tunes_coefficient
        return self.config.coefficient_grid() if tunes or self.eval_settings().search_tuning_free else None

    def _method_hyperparameters(self, method: str) -> dict[str, Any]:
        """The method's hyperparameters as a merge record stores them (JSON round trip)."""
        from distac.merging.registry import get_method

        built = get_method(method, **self.config.method_options.get(method, {}))
        return json.loads(json.dumps(built.hyperparameters))

    # ------------------------------------------------------------------------------------ scenarios
    def kappa_for(self, norms: dict[str, float], task: str) -> float:
        from distac.conditioning.losses import scaling_coefficient

        names = list(norms)
        return float(scaling_coefficient([norms[t] for t in names], names.index(task)))

    def scenario_plan(
        self, scenario: str, spec: dict[str, Any], long_task: str | None = None
    ) -> tuple[str, dict[str, str], list[str], str]:
        """How ``scenario`` merges: the key its merges are cached under, each task's recipe, the tasks it
        conditions and its kappa rule. A norm-mismatch scenario has one plan per ``long_task`` (the
        one tuned with the long recipe, conditioned and shrunk). Studies that reuse a scenario's merges
        and conditioned models take its plan from here, so they share its cache keys and kappas."""
        recipe, tasks = spec.get("recipe", "base"), self.config.tasks
        kind = scenario_kind(scenario, spec)
        if kind == "norm_mismatch":
            long_task = long_task or (spec.get("long_tasks") or tasks)[0]
            long_recipe = spec.get("long_recipe", "lr_x10")
            recipes = {t: (long_recipe if t == long_task else recipe) for t in tasks}
            return f"{scenario}/long-{long_task}", recipes, [long_task], "shrink"
        condition_tasks = list(tasks) if spec.get("condition", True) and kind != "original" else []
        return scenario, {t: recipe for t in tasks}, condition_tasks, spec.get("kappa", "one")

    def kappas(self, rule: str, norms: dict[str, float], tasks: list[str]) -> dict[str, float]:
        """Each conditioned task's scale: ``shrink`` (longest vector to the mean norm of the others), else 1."""
        return {t: self.kappa_for(norms, t) if rule == "shrink" else 1.0 for t in tasks}

    def run_scenario(self, scenario: str) -> dict[str, Any]:
        spec = self.config.scenarios[scenario]
        methods = spec.get("methods")
        if scenario_kind(scenario, spec) == "norm_mismatch":
            per_choice = {}
            for long_task in spec.get("long_tasks") or self.config.tasks:
                key, recipes, condition_tasks, rule = self.scenario_plan(scenario, spec, long_task)
                per_choice[long_task] = self._run_sources(
                    scenario, key, recipes, condition_tasks=condition_tasks, kappa_rule=rule, methods=methods
                )
            return {"choices": per_choice, "average": _average_choices(per_choice)}
        key, recipes, condition_tasks, rule = self.scenario_plan(scenario, spec)
        return {
            "average": self._run_sources(
                scenario, key, recipes, condition_tasks=condition_tasks, kappa_rule=rule, methods=methods
            )
        }

    def _run_sources(
        self,
        scenario: str,
        key: str,
        recipes: dict[str, str],
        *,
        condition_tasks: list[str],
        kappa_rule: str,
        methods: list[str] | None = None,
    ) -> dict[str, Any]:
        """Merge these sources as they are (``plain``), then with ``condition_tasks`` conditioned
        (``distac``) and, for the shrink rule, with those sources only rescaled (``scaling_alone``)."""
        sources = {t: self.load(self.ensure_source(r, t)) for t, r in recipes.items()}
        plain = self.merge_all(f"{key}/plain", sources, sources, methods)
        out: dict[str, Any] = {"plain": plain}
        if not condition_tasks:
            return out
        kappas = self.kappas(kappa_rule, plain["norms"], condition_tasks)
        conditioned = dict(sources)
        for t, kappa in kappas.items():
            conditioned[t] = self.load(self.ensure_conditioned(scenario, recipes[t], t, kappa))
        out["distac"] = self.merge_all(f"{key}/distac", conditioned, sources, methods)
        out["kappas"] = kappas
        if kappa_rule == "shrink" and any(study_kind(s) == "scaling_alone" for s in self.config.studies):
            scaled = dict(sources)
            pre = self.pretrained_backbone()
            for t, kappa in kappas.items():
                model = self.load(self.ensure_source(recipes[t], t))
                state = model.state_dict()
                model.load_state_dict(
                    {k: (pre[k].float() + kappa * (state[k].float() - pre[k].float())).to(state[k].dtype) for k in pre},
                    strict=False,
                )
                scaled[t] = model
            out["scaling_alone"] = self.merge_all(f"{key}/scaled", scaled, sources, methods)
        return out

    # ------------------------------------------------------------------------------------ studies
    def scale_curve(self, scales: list[float] | None = None, recipe: str = "base") -> dict[str, Any]:
        """Figure 3 analog: each source's own test score at theta_pre + s * tau, for a grid of s.

        Shows why shrinking a long task vector alone loses accuracy (and so needs distillation),
        and how far a normal vector can be scaled before its task degrades. Forward passes only;
        cached in ``studies/scale_curve.json``.
        """
        file = self.run_dir / "studies" / f"scale_curve-{recipe}.json"
        settings = self.eval_settings()
        self.pretrained_backbone()  # sets self._has_batchnorm
        batchnorm = "recompute" if self._has_batchnorm and settings.batchnorm_statistics != "keep" else "keep"
        scales = [float(s) for s in (scales or [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0])]
        if file.is_file():
            cached = json.loads(file.read_text())
            if cached.get("batchnorm_statistics", "keep") == batchnorm and cached.get("scales") == scales:
                return cached
            self.echo(f"  {file.name}: made with other scales or BatchNorm statistics; computing it again")
        pre = self.pretrained_backbone()
        curves: dict[str, Any] = {}
        for task in self.config.tasks:
            model = self.load(self.ensure_source(recipe, task))
            bank = TaskModelBank({task: model}, {task: self.task_data(task)}, settings)
            tau = self.task_vector(model)
            points = []
            for scale in scales:
                backbone = {k: (pre[k].float() + scale * tau[k]).to(pre[k].dtype) for k in pre}
                metrics = bank.score(task, backbone, "test")
                points.append({"scale": scale, "score": metrics.score, "entropy": metrics.entropy})
            curves[task] = points
            self.echo(f"  scale curve {task}: " + " ".join(f"{p['scale']:g}:{p['score']:.3f}" for p in points))
        record = {"recipe": recipe, "scales": scales, "curves": curves, "batchnorm_statistics": batchnorm}
        atomic_write_json(file, record)
        return record

    def smoothing_recipe(self, alpha: float) -> str:
        """The recipe that fine-tunes with label smoothing ``alpha``: an existing one with exactly that
        loss if the config has it (so its sources are reused), else a new ``label_smoothing_<alpha>``."""
        if alpha == 0.0:
            return "base"
        wanted = {"loss": {"kind": "label_smoothing", "alpha": float(alpha)}}
        for name, spec in self.recipes.items():
            loss = spec.get("loss", {})
            if set(spec) == {"loss"} and loss.get("kind") == "label_smoothing" and loss.get("alpha") == alpha:
                return name
        name = f"label_smoothing_{alpha:g}"
        self.recipes[name] = wanted
        return name

    def label_smoothing_sweep(
        self,
        alphas: list[float] | None = None,
        methods: list[str] | None = None,
        distac_alphas: list[float] | None = None,
    ) -> dict:
        """Figure 4 analog: merged accuracy, with and without DisTaC, against the label-smoothing
        strength every source was fine-tuned with (alpha = 0 is the base recipe).

        Smoothed sources (alpha > 0) are conditioned as in the low-confidence scenario (kappa = 1,
        T_s > T_t); alpha = 0 is the plain merge of normal sources, the reference the others fall
        from. ``distac_alphas`` limits the conditioning to some strengths (a CPU budget). A scenario
        with the same recipe shares its sources, conditioned models and merges.
        """
        alphas = [float(a) for a in (alphas if alphas is not None else [0.0, 0.05, 0.1, 0.2, 0.3])]
        methods = methods or self.config.methods
        conditioned_alphas = {a for a in alphas if a > 0}
        if distac_alphas is not None:
            conditioned_alphas = {float(a) for a in distac_alphas}
        points = []
        for alpha in alphas:
            recipe = self.smoothing_recipe(alpha)
            key = next(
                (
                    name
                    for name, spec in self.config.scenarios.items()
                    if scenario_kind(name, spec) != "norm_mismatch" and spec.get("recipe", "base") == recipe
                ),
                f"label_smoothing_sweep/alpha-{alpha:g}",
            )
            self.echo(f"== label smoothing {alpha:g} [{recipe}]")
            run = self._run_sources(
                "low_confidence",
                key,
                {t: recipe for t in self.config.tasks},
                condition_tasks=list(self.config.tasks) if alpha in conditioned_alphas else [],
                kappa_rule="one",
                methods=methods,
            )
            points.append({"alpha": alpha, "recipe": recipe, **_summary(run, methods)})
        return {"alphas": alphas, "methods": methods, "points": points}

    def unlabeled_data_study(
        self,
        scenario: str | None = None,
        long_task: str | None = None,
        amounts: list[int] | None = None,
        corruptions: list[dict[str, Any]] | None = None,
        methods: list[str] | None = None,
    ) -> dict[str, Any]:
        """Tables 3-4 analog: how much, and how clean, must the unlabeled data be?

        The sources a ``scenario`` conditions are conditioned again on only ``amounts`` inputs and on
        corrupted inputs (blurred images / word dropout for text), then merged with ``methods``. In a
        norm-mismatch scenario (the default) that is the long source (``long_task`` tuned with the long
        recipe), shrunk to kappa < 1, where rescaling does much of the work; in a low-confidence
        scenario it is every source at kappa = 1, where the distillation does all of it.
        """
        if scenario is None:
            scenario = next(
                (n for n, s in self.config.scenarios.items() if scenario_kind(n, s) == "norm_mismatch"),
                "norm_mismatch",
            )
        spec = self.config.scenarios.get(scenario, {"recipe": "base", "long_recipe": "lr_x10"})
        kind = scenario_kind(scenario, spec)  # validated: norm_mismatch or low_confidence
        key, recipes, condition_tasks, rule = self.scenario_plan(scenario, spec, long_task)
        if not condition_tasks:
            raise ConfigError(f"unlabeled-data study: scenario {scenario!r} conditions no source (condition: false)")
        long_task = condition_tasks[0] if kind == "norm_mismatch" else None
        methods = methods or self.config.methods
        sources = {t: self.load(self.ensure_source(r, t)) for t, r in recipes.items()}
        plain = self.merge_all(f"{key}/plain", sources, sources, methods)
        kappas = self.kappas(rule, plain["norms"], condition_tasks)
        default_amount = self.config.condition.get("num_unlabeled") or len(self.task_data(condition_tasks[0]).train)
        variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = [("", {}, {"num_unlabeled": default_amount})]
        for amount in amounts or []:
            if int(amount) != default_amount:
                variants.append((f"n{int(amount)}", {"num_unlabeled": int(amount)}, {"num_unlabeled": int(amount)}))
        for corruption in corruptions or []:
            corruption_kind, strength = corruption["kind"], float(corruption.get("strength", 0.0))
            overrides = {"unlabeled_corruption": corruption_kind, "corruption_strength": strength}
            variants.append(
                (f"{corruption_kind}{strength:g}", overrides, {"num_unlabeled": default_amount, **overrides})
            )
        rows = [{"variant": "no conditioning", "merges": _method_scores(plain, methods)}]
        for tag, overrides, described in variants:
            conditioned, accuracies = dict(sources), []
            for task in condition_tasks:
                path = self.ensure_conditioned(
                    scenario, recipes[task], task, kappas[task], overrides=overrides, tag=tag
                )
                conditioned[task] = self.load(path)
                history = json.loads((path / "condition.json").read_text()).get("history", [])
                final = next((h for h in reversed(history) if isinstance(h, dict) and "val_accuracy" in h), {})
                if final.get("val_accuracy") is not None:
                    accuracies.append(float(final["val_accuracy"]))
            merged = self.merge_all(f"{key}/distac{'-' + tag if tag else ''}", conditioned, sources, methods)
            rows.append(
                {
                    "variant": tag or "default",
                    **described,
                    "conditioned_val_accuracy": _mean(accuracies) if accuracies else None,
                    "merges": _method_scores(merged, methods),
                }
            )
        return {
            "scenario": scenario,
            "kind": kind,
            "long_task": long_task,
            "conditioned_tasks": condition_tasks,
            "kappa": kappas[condition_tasks[0]],
            "kappas": kappas,
            "methods": methods,
            "rows": rows,
        }

    def check_cache_compatible(self) -> None:
        """Refuse to resume a run directory whose cached stages were made with other settings.

        Stages are cached by name (``sources/<recipe>/<task>``...), so a changed learning rate, data
        limit or backbone would otherwise silently reuse stale models. Adding scenarios, studies or
        methods is fine: they only add stages; a merge whose method options changed is redone.
        """
        file = self.run_dir / "config.json"
        if not file.is_file():
            return
        cached, current = json.loads(file.read_text()), self.config.to_json()
        for record in (cached, current):  # each merge record knows whether it was searched: redone per method
            evaluation = record.get("evaluation") or {}
            record["evaluation"] = {k: v for k, v in evaluation.items() if k != "search_tuning_free"}
        changed = [k for k in CACHE_DEFINING_KEYS if cached.get(k) != current.get(k)]
        old_recipes, new_recipes = cached.get("recipes", {}), current["recipes"]
        changed += [f"recipes.{r}" for r in old_recipes if r in new_recipes and old_recipes[r] != new_recipes[r]]
        # a scenario's conditioned models and merges are cached under its name: redefining it (recipe, kappa
        # rule, kind, conditioning) would reuse them; more long tasks or methods only add stages
        old_scenarios, new_scenarios = cached.get("scenarios") or {}, current.get("scenarios") or {}
        changed += [
            f"scenarios.{name}"
            for name in old_scenarios
            if name in new_scenarios and _defining(old_scenarios[name]) != _defining(new_scenarios[name])
        ]
        if changed:
            raise ConfigError(
                f"{self.run_dir} holds stages made with other settings ({', '.join(changed)}; see {file}): "
                "use another --run-dir, or delete this one to start over"
            )

    def open_run_dir(self) -> None:
        """Check that the run dir's cached stages fit this config, then record the config there. Every
        entry point calls it before making any stage, so an interrupted run resumed with other settings
        is refused instead of mixing sources made under both."""
        self.check_cache_compatible()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / "config.json", self.config.to_json())

    # ------------------------------------------------------------------------------------ all
    def run(self, scenarios: list[str] | None = None, studies: list[str] | None = None) -> dict[str, Any]:
        """Run ``scenarios`` (default: all in the config), then ``studies`` (default: all; ``[]``: none)."""
        selections = (("--scenario", scenarios, self.config.scenarios), ("--study", studies, self.config.studies))
        for flag, asked, known in selections:
            unknown = sorted(set(asked or []) - set(known))
            if unknown:
                raise ConfigError(f"{flag} {unknown}: not in experiment {self.config.name!r} ({sorted(known)})")
        start = time.perf_counter()
        self.open_run_dir()
        earlier = self.earlier_results(scenarios, studies)
        results: dict[str, Any] = {
            "experiment": self.config.name,
            "config": self.config.to_json(),
            "environment": environment_record(),
            "scenarios": dict(earlier["scenarios"]),
        }
        if earlier["carried_over"]:
            results["carried_over"] = earlier["carried_over"]
        made: set[tuple[str, str]] = set()
        for scenario in scenarios or list(self.config.scenarios):
            self.echo(f"== scenario {scenario}")
            results["scenarios"][scenario] = self.run_scenario(scenario)
            made.add(("scenarios", scenario))
            self._write_results(results, made)
        results["scenarios"] = {s: results["scenarios"][s] for s in self.config.scenarios if s in results["scenarios"]}
        study_results: dict[str, Any] = dict(earlier["studies"])
        for study, options in self.config.studies.items():
            if studies is not None and study not in studies:
                continue
            options = dict(options or {})
            kind = study_kind(study)
            if kind == "scaling_alone":  # part of the norm-mismatch scenario runs
                continue
            self.echo(f"== study {study}")
            if kind == "scale_curve":
                study_results[study] = self.scale_curve(options.get("scales"), options.get("recipe", "base"))
            elif kind == "label_smoothing_sweep":
                study_results[study] = self.label_smoothing_sweep(**options)
            elif kind == "unlabeled_data":
                study_results[study] = self.unlabeled_data_study(**options)
            results["studies"] = study_results
            made.add(("studies", study))
            self._write_results(results, made)
        if study_results:
            results["studies"] = study_results
        results["wall_seconds"] = time.perf_counter() - start
        results["stage_seconds"] = self.stage_seconds()
        self._write_results(results, made)
        return results

    def _write_results(self, results: dict[str, Any], made: set[tuple[str, str]]) -> None:
        """Write ``results`` to the run dir's results.json, keeping what another run on this run dir wrote
        there meanwhile (``--scenario mixup`` and ``--scenario focal`` run side by side would otherwise
        each drop the other's column): scenarios and studies this run did not make are taken from the
        file when it holds a report of the same configuration. ``results`` is updated in place."""
        file = self.run_dir / "results.json"
        with exclusive(file):
            try:
                on_disk = json.loads(file.read_text()) if file.is_file() else {}
            except (OSError, ValueError):
                on_disk = {}  # an unreadable report is rebuilt from this run alone
            if on_disk.get("config") == results["config"]:
                for section in ("scenarios", "studies"):
                    known = getattr(self.config, section)
                    theirs = {
                        n: r for n, r in (on_disk.get(section) or {}).items() if n in known and (section, n) not in made
                    }
                    if theirs:
                        merged = {**(results.get(section) or {}), **theirs}
                        results[section] = {n: merged[n] for n in known if n in merged}
            atomic_write_json(file, results)

    def earlier_results(self, scenarios: list[str] | None, studies: list[str] | None) -> dict[str, Any]:
        """The scenarios and studies of this run dir's results.json that this run does not redo, so a
        rerun with ``--scenario X`` updates X in the report instead of dropping the other columns. The
        report must come from the same configuration (method options included), else nothing is kept;
        the names kept are listed under ``carried_over``."""
        kept: dict[str, Any] = {"scenarios": {}, "studies": {}, "carried_over": []}
        file = self.run_dir / "results.json"
        if (scenarios is None and studies is None) or not file.is_file():
            return kept
        try:
            previous = json.loads(file.read_text())
        except (OSError, ValueError):
            return kept  # an unreadable report is rebuilt from this run alone
        if previous.get("config") != self.config.to_json():  # e.g. other method options: not comparable
            self.echo(f"{file}: made with other settings; the new report holds only what this run does")
            return kept
        for name, result in (previous.get("scenarios") or {}).items():
            if scenarios is not None and name not in scenarios and name in self.config.scenarios:
                kept["scenarios"][name] = result
                kept["carried_over"].append(f"scenario {name}")
        for name, result in (previous.get("studies") or {}).items():
            if studies is not None and name not in studies and name in self.config.studies:
                kept["studies"][name] = result
                kept["carried_over"].append(f"study {name}")
        return kept

    def stage_seconds(self) -> dict[str, float]:
        """Compute spent on the cached stages, whichever run made them (a resumed run's own wall
        time covers only what it did): fine-tuning, conditioning and merging incl. evaluation."""
        totals = {"finetune": 0.0, "condition": 0.0, "merge_and_evaluate": 0.0}
        for stage, pattern, key in (
            ("finetune", "sources/*/*/finetune.json", "seconds"),
            ("condition", "conditioned/*/*/condition.json", "seconds"),
            ("merge_and_evaluate", "merges/**/*.json", "seconds_total"),
        ):
            for file in visible(self.run_dir.glob(pattern), self.run_dir):
                value = json.loads(file.read_text())
                if isinstance(value, dict) and isinstance(value.get(key), int | float):
                    totals[stage] += float(value[key])
        return totals


def _defining(scenario: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a scenario's definition its cached stages depend on (not its long tasks or methods,
    which only add stages of their own)."""
    return {k: v for k, v in scenario.items() if k not in ("long_tasks", "methods")}


def _mean(values: Any) -> float:
    """Mean of the defined values (:func:`~distac.experiments.report.is_defined`); NaN if none is."""
    values = [v for v in values if is_defined(v)]
    return sum(values) / len(values) if values else float("nan")


def _method_scores(block: dict[str, Any], methods: list[str]) -> dict[str, dict[str, float]]:
    return {m: {"absolute": block[m]["absolute"], "normalized": block[m]["normalized"]} for m in methods}


def _summary(run: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Absolute / normalized test score per method of a ``_run_sources`` result, plus the sources'
    mean test entropy (the confidence the merge starts from)."""
    out: dict[str, Any] = {v: _method_scores(run[v], methods) for v in ("plain", "distac") if v in run}
    individual = run["plain"]["individual"] if "plain" in run else None
    if individual:
        out["individual"] = individual["absolute"]
        out["source_entropy"] = _mean(m.get("entropy", float("nan")) for m in individual["test"].values())
        out["source_ece"] = _mean(m.get("ece", float("nan")) for m in individual["test"].values())
    return out


def _average_choices(per_choice: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Average absolute/normalized accuracy over the choices of the long source, per variant and method."""
    out: dict[str, Any] = {}
    for variant in ("plain", "distac", "scaling_alone"):
        runs = [c[variant] for c in per_choice.values() if variant in c]
        if not runs:
            continue
        merged: dict[str, Any] = {}
        for method in runs[0]:
            if method == "norms":
                continue
            merged[method] = {
                "absolute": _mean(r[method]["absolute"] for r in runs),
                "normalized": _mean(r[method]["normalized"] for r in runs),
                "choices": len(runs),
            }
        out[variant] = merged
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
