"""``distac merge``: merge fine-tuned checkpoints with any method, on real files.

Two kinds of input:

* plain checkpoints (HF directories, safetensors, state dicts): ``--pretrained`` is required; the
  merged state dict is written with the pretrained model's config, ready for ``from_pretrained``.
  Heads and BatchNorm statistics are excluded from the task vectors by default (``--include`` /
  ``--exclude`` globs change that) and copied from the pretrained checkpoint.
* distac model directories (``distac finetune`` output): the pretrained backbone is rebuilt from
  their spec unless ``--pretrained`` is given, ``--search`` picks the coefficient on each task's
  validation split, and one merged model per task (shared backbone + that task's head) is written.
  For CNNs each merged model's BatchNorm statistics are re-estimated on unlabeled training inputs
  of its task (``--batchnorm-statistics``); plain checkpoints keep the pretrained model's.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import typer

from distac.commands.common import (
    DATA_ROOT_OPTION,
    DEVICE_OPTION,
    MERGE_RECORD,
    METHOD_SET_OPTION,
    console,
    print_table,
    require_distinct_sources,
)

#: ``distac merge --help``. Paragraphs are single lines: the help keeps a line break where the text has one.
#: What the output holds is spelled out because it is not one model when the sources are distac models.
MERGE_HELP = (
    "Merge task vectors of fine-tuned models; write the merged model(s) and merge.json into --output."
    "\n\nWhat OUTPUT holds depends on the sources:"
    "\n\n* distac model directories: one complete distac model per task, OUTPUT/<task>/ (the merged backbone "
    "with that task's own head), and the record OUTPUT/merge.json. Each task keeps its own head (and BatchNorm "
    "statistics), so each needs its own model; the merged backbone is copied into every one, so OUTPUT takes "
    "about T times the disk of one model. distac evaluate, diagnose and calibrate take OUTPUT itself for its "
    "per-task models."
    "\n\n* plain checkpoints: one merged checkpoint (model.safetensors or shards, the --pretrained model's "
    "config and tokenizer, merge.json); the per-task methods emr and tall_masks write one such checkpoint per "
    "task, OUTPUT/<task>/, and OUTPUT/merge.json."
    "\n\n* --streaming: one merged checkpoint, written shard by shard."
)


def register(app: typer.Typer) -> None:
    @app.command("merge", help=MERGE_HELP)
    def merge(
        finetuned: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints or distac model directories."),
        method: str = typer.Option(..., "--method", "-m", help="Merging method, e.g. task_arithmetic, ties, emr."),
        output: Path = typer.Option(
            ...,
            "--output",
            "-o",
            help="Output directory (written atomically); for distac model dirs one model per task, OUTPUT/<task>/ "
            "(see above).",
        ),
        pretrained: Path | None = typer.Option(
            None, "--pretrained", "-p", help="Pretrained checkpoint (theta_pre); optional for distac model dirs."
        ),
        coefficient: float | None = typer.Option(
            None, "--coefficient", "-l", help="Scaling coefficient lambda (default: the method's paper default)."
        ),
        search: bool = typer.Option(
            False,
            "--search",
            help="distac model dirs only: merge at every lambda of --grid, score each on the tasks' validation "
            "splits (the mean over tasks of its score divided by the source's own) and keep the best; then "
            "print the test scores (and normalized ones) of the merge at that lambda. Both use at most "
            "--validation-examples examples per task.",
        ),
        grid: str = typer.Option(DEFAULT_GRID, "--grid", help="Coefficient grid start:stop:step for --search."),
        hyper: list[str] = METHOD_SET_OPTION,
        include: list[str] = typer.Option([], "--include", help="Glob of parameters to merge (repeatable)."),
        exclude: list[str] = typer.Option(
            [], "--exclude", help="Glob of parameters never merged (repeatable), besides heads and BN statistics."
        ),
        names: list[str] = typer.Option(
            [], "--name", help="Task names for the sources, in order (default: dir names)."
        ),
        streaming: bool = typer.Option(
            False, "--streaming", help="Merge tensor by tensor from (sharded) safetensors: memory ~ one model."
        ),
        max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Output shard size, e.g. 2GB, 500MB."),
        device: str = DEVICE_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
        validation_examples: int | None = typer.Option(
            None,
            "--validation-examples",
            help="--search: score at most this many validation examples per task, and report test scores on at "
            "most as many test examples (a subsample: use distac evaluate for the full test split). "
            "Default: all.",
        ),
        batchnorm_statistics: str = typer.Option(
            "auto",
            "--batchnorm-statistics",
            help="distac model dirs with BatchNorm: re-estimate each merged model's running statistics on "
            "unlabeled training inputs of its task (auto, recompute) or keep the source's (keep).",
        ),
    ) -> None:
        """Merge task vectors of fine-tuned models and write the result into ``output`` (see MERGE_HELP)."""
        from distac.checkpoints import check_output_path, validate_checkpoint
        from distac.config import apply_overrides
        from distac.merging.registry import get_method
        from distac.models.base import SPEC_FILE
        from distac.models.batchnorm import BATCHNORM_CHOICES

        if batchnorm_statistics not in BATCHNORM_CHOICES:
            raise typer.BadParameter(
                f"--batchnorm-statistics must be one of {', '.join(BATCHNORM_CHOICES)}, got {batchnorm_statistics!r}"
            )
        hyperparameters = apply_overrides({}, hyper)
        get_method(method, **hyperparameters)  # validate the method name and hyperparameters before any work
        if not finetuned:
            raise typer.BadParameter("give at least one fine-tuned checkpoint")
        check_output_path(output, [*finetuned, pretrained])  # an output over an input would delete it
        if output.suffix in {".safetensors", ".bin", ".pt", ".pth"}:
            raise typer.BadParameter(f"--output {output}: the merged model is a directory; give a directory name")
        from distac.peft_sources import is_adapter_dir

        for path in [*finetuned, *([pretrained] if pretrained is not None else [])]:
            if not is_adapter_dir(path):  # adapters are checked by distac.peft_sources when read
                validate_checkpoint(path)  # missing, unknown or corrupt files fail now, before loading anything
        require_distinct_sources(finetuned)
        task_names = names or [Path(os.path.abspath(p)).name for p in finetuned]  # '.' names its folder
        bad_names = [n for n in task_names if not _is_plain_name(n)]
        if bad_names:  # names become output sub-directories (per-task methods) and JSON keys
            raise typer.BadParameter(
                f"task names must be plain folder names (no '/', not '.' or '..', not hidden): {bad_names}"
            )
        if names and (len(task_names) != len(finetuned) or len(set(task_names)) != len(task_names)):
            raise typer.BadParameter("--name must be given once per source, with distinct names")
        if not names and len(set(task_names)) != len(task_names):
            shared = sorted({n for n in task_names if task_names.count(n) > 1})
            raise typer.BadParameter(
                f"sources share the folder name(s) {shared}, which name their tasks in the output: "
                "name each source with --name"
            )
        distac_models = all((p / SPEC_FILE).is_file() for p in finetuned)
        _check_flag_combinations(
            streaming=streaming,
            search=search,
            coefficient=coefficient,
            grid=grid,
            device=device,
            patterns=bool(include or exclude),
            distac_models=distac_models,
        )
        shard_bytes = parse_size(max_shard_size)
        if validation_examples is not None and validation_examples < 1:
            raise typer.BadParameter(f"--validation-examples must be at least 1, got {validation_examples}")
        if streaming:
            record = _streaming(
                pretrained,
                finetuned,
                method,
                coefficient,
                output,
                shard_bytes,
                include,
                exclude,
                hyperparameters,
                task_names,
            )
        elif distac_models:
            record = _merge_distac_models(
                finetuned,
                task_names,
                method,
                hyperparameters,
                output,
                pretrained,
                coefficient,
                search,
                parse_grid(grid),
                device,
                data_root,
                validation_examples,
                batchnorm_statistics,
            )
        else:
            if search:
                raise typer.BadParameter("--search needs distac model directories (they know their task and head)")
            if pretrained is None:
                raise typer.BadParameter("--pretrained is required for plain checkpoints")
            record = _merge_checkpoints(
                pretrained,
                finetuned,
                task_names,
                method,
                hyperparameters,
                output,
                coefficient,
                include,
                exclude,
                shard_bytes,
                device,
            )
        console.print(f"merged {len(finetuned)} sources with {method} (lambda={record['coefficient']}) -> {output}")


def _is_plain_name(name: str) -> bool:
    return bool(name) and Path(name).name == name and name not in (".", "..") and not name.startswith(".")


DEFAULT_GRID = "0:1:0.05"


def _check_flag_combinations(
    *,
    streaming: bool,
    search: bool,
    coefficient: float | None,
    grid: str,
    device: str,
    patterns: bool,
    distac_models: bool,
) -> None:
    """Refuse flags that would be silently ignored, before any work."""
    from distac.models.inference import pick_device

    pick_device(device)  # a device this machine does not have is an error, whatever the path
    if search and streaming:
        raise typer.BadParameter("--search evaluates merged models on validation data; --streaming cannot")
    if search and coefficient is not None:
        raise typer.BadParameter("--search chooses lambda itself; drop --coefficient/-l, or drop --search")
    if grid != DEFAULT_GRID and not search:
        raise typer.BadParameter("--grid is the coefficient grid of --search; add --search or drop --grid")
    if streaming and device not in ("auto", "cpu"):
        raise typer.BadParameter(f"--streaming merges tensor by tensor on the CPU; drop --device {device}")
    if streaming and distac_models:
        raise typer.BadParameter(
            "--streaming merges plain (sharded) checkpoints tensor by tensor; distac model directories keep a head "
            "(and BatchNorm statistics) per task, which a single streamed checkpoint cannot: drop --streaming "
            "(they merge in memory, one backbone at a time)"
        )
    if patterns and distac_models:
        raise typer.BadParameter(
            "--include/--exclude apply to plain checkpoints; distac model directories merge their backbone "
            "(heads and BatchNorm statistics stay per task)"
        )


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count; it must be positive."""
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    upper = text.strip().upper()
    size: float | None = None
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            try:
                size = float(upper[: -len(unit)]) * units[unit]
            except ValueError:
                pass
            break
    if size is None:
        try:
            size = float(int(upper))
        except ValueError:
            raise typer.BadParameter(f"cannot parse size {text!r} (use e.g. 5GB, 500MB)") from None
    if not math.isfinite(size) or size < 1:
        raise typer.BadParameter(f"--max-shard-size must be a positive size (e.g. 5GB, 500MB), got {text!r}")
    return int(size)


#: More coefficient points than anyone can afford to evaluate is a typo in --grid, not a search.
MAX_GRID_POINTS = 1000


def parse_grid(text: str) -> list[float]:
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"--grid must be start:stop:step, got {text!r}") from None
    if not all(math.isfinite(x) for x in (start, stop, step)):
        raise typer.BadParameter(f"--grid {text!r}: start, stop and step must be finite numbers")
    if step <= 0 or stop < start:
        raise typer.BadParameter(f"--grid {text!r}: need step > 0 and stop >= start")
    count = int(round((stop - start) / step)) + 1
    if count > MAX_GRID_POINTS:  # each point is a merge plus a validation pass over every task
        raise typer.BadParameter(f"--grid {text!r} has {count} points; at most {MAX_GRID_POINTS} (use a larger step)")
    return [round(start + i * step, 6) for i in range(count)]


def grid_edge_note(best: float, grid: list[float]) -> str | None:
    """A one-line note when ``--search`` chose an end of its grid, or None.

    The search only sees the grid: a best value at its largest point, or at its smallest non-zero one,
    means the validation score was still rising toward that end, and a better lambda may lie beyond it
    (a larger one, or one between 0 and the smallest). Saying so costs one line; silently taking the
    edge for the optimum hides a grid that was too short. Lambda 0 is the pretrained backbone, no
    edge to extend."""
    if len(grid) < 2 or best == 0:
        return None
    positive = [value for value in grid if value > 0]
    if best == max(grid):
        return (
            f"note: lambda={best} is the largest value of the grid; the best lambda may be larger. "
            "Try a grid that goes further (--grid start:stop:step)"
        )
    if positive and best == min(positive):
        return (
            f"note: lambda={best} is the smallest non-zero value of the grid; the best lambda may be smaller. "
            "Try a finer grid below it (--grid start:stop:step)"
        )
    return None


def _record(
    method: str,
    hyper: dict[str, Any],
    coefficient: float,
    sources: list[Path],
    names: list[str],
    pretrained: Any,
    seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from distac.environment import environment_record

    return {
        "method": method,
        "hyperparameters": hyper,
        "coefficient": coefficient,
        "pretrained": os.path.abspath(pretrained) if pretrained is not None else "from the sources' spec",
        "sources": [{"name": n, "path": os.path.abspath(p)} for n, p in zip(names, sources, strict=True)],
        "seconds": seconds,
        "environment": environment_record(),
        **extra,
    }


def _merge_checkpoints(
    pretrained: Path,
    finetuned: list[Path],
    names: list[str],
    method: str,
    hyper: dict[str, Any],
    output: Path,
    coefficient: float | None,
    include: list[str],
    exclude: list[str],
    shard_bytes: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Load theta_pre and every source, merge their task vectors on ``device`` (TSV-M, Iso-CTS and
    WUDI are much faster on a GPU), and save the merged model(s) from the CPU."""
    from distac.atomic import atomic_directory, atomic_write_json
    from distac.checkpoints import align_to_pretrained, check_state_finite, load_state_dict, save_state_dict
    from distac.merging.base import apply_merge
    from distac.merging.registry import get_method
    from distac.models.inference import pick_device
    from distac.peft_sources import load_source
    from distac.task_vectors import ParameterSelector, TaskVector

    target = pick_device(device)
    selector = ParameterSelector.from_patterns(include, exclude)
    start = time.perf_counter()
    pre = load_state_dict(pretrained)
    vectors = []
    left_out: dict[str, list[str]] = {}
    for name, path in zip(names, finetuned, strict=True):
        state = load_source(path, pre, base_source=pretrained)  # a checkpoint or a LoRA adapter dir on pre
        check_state_finite(state, path)
        state = align_to_pretrained(state, (selector or ParameterSelector()).select(pre), path)
        extra = [k for k in state if k not in pre]  # task heads the base model lacks: not in the output
        if extra:
            left_out[name] = extra
        vectors.append(
            TaskVector.from_state_dicts(
                pre, state, selector, pretrained_source=pretrained, finetuned_source=path
            ).deltas
        )
    # every method's ``device`` runs the maths there, key by key, and returns results on the inputs' CPU
    options = {"device": str(target), **hyper} if target.type != "cpu" else hyper
    merger = get_method(method, **options)
    result = merger.merge(vectors, task_names=names, pretrained=pre)
    coef = merger.default_coefficient if coefficient is None else coefficient
    record = _record(
        method,
        merger.hyperparameters,
        coef,
        finetuned,
        names,
        pretrained,
        time.perf_counter() - start,
        {"info": result.info, "task_conditional": result.per_task is not None, "left_out": left_out},
    )
    if left_out:
        shown = sorted({k for keys in left_out.values() for k in keys})
        console.print(
            f"note: {len(shown)} parameter(s) of the sources that {pretrained} lacks are not in the merged model "
            f"(task heads?): {shown[:4]}{' ...' if len(shown) > 4 else ''}; merge.json lists them per source"
        )
    what = f"the {method} merge at lambda={coef} (a coefficient too large for the weights' dtype?)"
    if result.per_task is None:
        merged = apply_merge(pre, result, coef)
        check_state_finite(merged, what)  # a model distac itself would refuse to load is never written
        save_state_dict(
            merged, output, max_shard_bytes=shard_bytes, copy_config_from=pretrained, extra_json={MERGE_RECORD: record}
        )
        return record
    with atomic_directory(output) as tmp:  # all per-task models appear together, or none does
        for task in names:
            merged = apply_merge(pre, result, coef, task=task)
            check_state_finite(merged, f"{what}, task {task}")
            save_state_dict(
                merged,
                tmp / str(task),
                max_shard_bytes=shard_bytes,
                copy_config_from=pretrained,
                extra_json={MERGE_RECORD: record},
            )
        atomic_write_json(tmp / MERGE_RECORD, record)  # the record at the top too, as for one merged model
    return record


def _merge_distac_models(
    finetuned: list[Path],
    names: list[str],
    method: str,
    hyper: dict[str, Any],
    output: Path,
    pretrained: Path | None,
    coefficient: float | None,
    search: bool,
    grid: list[float],
    device: str,
    data_root: Path | None,
    validation_examples: int | None,
    batchnorm_statistics: str = "auto",
) -> dict[str, Any]:
    from distac.atomic import atomic_directory, atomic_write_json
    from distac.checkpoints import load_state_dict
    from distac.data import load_model_task
    from distac.experiments.merge_eval import EvalSettings, TaskModelBank, evaluate_method, individual_scores
    from distac.models import build_model, load_model, save_model
    from distac.models.batchnorm import estimation_inputs, recompute_batchnorm_statistics, resolve_batchnorm_choice
    from distac.models.registry import check_pretrained_fits, check_same_backbone

    start = time.perf_counter()
    models = {n: load_model(p) for n, p in zip(names, finetuned, strict=True)}
    check_same_backbone({str(p): m for p, m in zip(finetuned, models.values(), strict=True)})
    first = next(iter(models.values()))
    selector = first.task_vector_selector()
    if pretrained is not None:
        pre_state = load_state_dict(pretrained)
        check_pretrained_fits(pre_state, first, pretrained)
    else:
        pre_state = build_model(first.spec, pretrained=True).state_dict()
    pre = {k: v for k, v in pre_state.items() if selector(k, v)}
    vectors = {n: {k: m.state_dict()[k].float() - pre[k].float() for k in pre} for n, m in models.items()}
    extra: dict[str, Any] = {}
    recompute = resolve_batchnorm_choice(batchnorm_statistics, first)
    tasks = {}
    if search or recompute:  # the task data: validation for the search, unlabeled inputs for BatchNorm
        tasks = {n: load_model_task(m.spec, data_root, default=n) for n, m in models.items()}
        for n, m in models.items():
            m.check_task(tasks[n], "validation")
    settings = EvalSettings(
        device=device,
        validation_examples=validation_examples,
        test_examples=validation_examples,
        batchnorm_statistics=batchnorm_statistics,
    )
    if search:
        bank = TaskModelBank(models, tasks, settings)
        ind_val = individual_scores(bank, "validation")
        ind_test = individual_scores(bank, "test")
        evaluation = evaluate_method(
            method,
            pre,
            vectors,
            bank,
            individual_val=ind_val,
            individual_test=ind_test,
            grid=grid,
            hyperparameters=hyper,
        )
        coefficient = evaluation.coefficient
        if evaluation.lambda_t_search is not None:  # TALL masks / Consensus TA: the lambda_t chosen per task
            hyper = {**hyper, "lambda_t": evaluation.lambda_t_search["best"]}
        extra = {
            "lambda_t_search": evaluation.lambda_t_search,
            "search": evaluation.search,
            "test": evaluation.test,
            "absolute": evaluation.absolute,
            "normalized": evaluation.normalized,
        }
        subsample = (  # the test scores are a subsample too: say so where they are shown
            f"; at most {validation_examples} validation and test examples per task"
            if validation_examples is not None
            else ""
        )
        print_table(
            f"{method}: test scores at lambda={coefficient} (chosen on validation{subsample})",
            ["task", "score", "normalized"],
            [[t, r["score"], r["normalized"]] for t, r in evaluation.test.items()],
        )
        searched = [point["coefficient"] for point in (evaluation.search or {}).get("curve", [])]
        note = grid_edge_note(coefficient, searched)
        if note:
            console.print(note, markup=False)
    from distac.merging.base import apply_merge
    from distac.merging.registry import get_method

    merger = get_method(method, **hyper)
    result = merger.merge([vectors[n] for n in names], task_names=names, pretrained=pre)
    coef = merger.default_coefficient if coefficient is None else coefficient
    record = _record(
        method,
        merger.hyperparameters,
        coef,
        finetuned,
        names,
        pretrained,
        time.perf_counter() - start,
        {"info": result.info, "batchnorm_statistics": "recompute" if recompute else "keep", **extra},
    )
    with atomic_directory(output) as tmp:  # all merged models appear together, or none does
        for name, model in models.items():
            merged = apply_merge(pre, result, coef, task=name if result.per_task is not None else None)
            model.load_state_dict(merged, strict=False)
            if recompute:
                recompute_batchnorm_statistics(
                    model,
                    estimation_inputs(tasks[name].unlabeled(), settings.batchnorm_examples),
                    batch_size=settings.batch_size,
                    device=device,
                )
            save_model(model.cpu(), tmp / name, extra={MERGE_RECORD: record})
        atomic_write_json(tmp / MERGE_RECORD, record)
    return record


def _streaming(
    pretrained: Path | None,
    finetuned: list[Path],
    method: str,
    coefficient: float | None,
    output: Path,
    shard_bytes: int,
    include: list[str],
    exclude: list[str],
    hyper: dict[str, Any],
    names: list[str] | None = None,
) -> dict[str, Any]:
    if pretrained is None:
        raise typer.BadParameter("--streaming needs --pretrained")
    from distac.merging.streaming import streaming_merge
    from distac.task_vectors import ParameterSelector

    selector = ParameterSelector.from_patterns(include, exclude)
    return streaming_merge(
        pretrained,
        finetuned,
        method=method,
        coefficient=coefficient,
        output=output,
        max_shard_bytes=shard_bytes,
        selector=selector,
        hyperparameters=hyper,
        task_names=names,
    )
