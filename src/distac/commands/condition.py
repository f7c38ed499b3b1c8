"""``distac condition``: DisTaC on one source (rescale + distill with unlabeled data)."""

from __future__ import annotations

from pathlib import Path

import typer

from distac.commands.common import (
    CONFIG_OPTION,
    CONFIGURABLE_DEVICE_OPTION,
    DATA_ROOT_OPTION,
    SET_OPTION,
    console,
    merged_options,
    require_distinct_sources,
)


def register(app: typer.Typer) -> None:
    @app.command("condition")
    def condition_command(
        source: Path = typer.Argument(..., help="The source to condition (distac model directory)."),
        output: Path = typer.Option(..., "--output", "-o", help="Conditioned model directory (atomic)."),
        kappa: str | None = typer.Option(
            None,
            "--kappa",
            help="Task-vector scale for the student start, in (0, 1]: DisTaC shrinks a too-long task vector, "
            "never stretches one (default: the config's, else 1); 'auto' = the mean norm of --others over the "
            "source's own, never above 1.",
        ),
        others: list[Path] = typer.Option([], "--others", help="The other sources (for --kappa auto)."),
        steps: int | None = typer.Option(None, help="Distillation steps (paper: 500)."),
        lr: float | None = typer.Option(None, help="Learning rate (paper: 1e-5)."),
        batch_size: int | None = typer.Option(None, help="Batch size (paper: 128)."),
        teacher_temperature: float | None = typer.Option(None, help="Teacher temperature T_t."),
        student_temperature: float | None = typer.Option(
            None, help="Student temperature T_s (> T_t raises confidence)."
        ),
        beta: float | None = typer.Option(None, help="L2 anchor weight beta (paper: 0.5)."),
        unlabeled: int | None = typer.Option(None, help="Number of unlabeled training inputs to use."),
        work_dir: Path | None = typer.Option(None, help="Checkpoint directory for resume (default <output>.work)."),
        task_name: str | None = typer.Option(
            None, "--task", "-t", help="Task (name or dataset path) to distill on (default: the source's task)."
        ),
        device: str | None = CONFIGURABLE_DEVICE_OPTION,
        config: Path | None = CONFIG_OPTION,
        overrides: list[str] = SET_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Shrink the task vector (kappa) and distill the original model into it; resumable.

        Runs on several GPUs (or CPU processes) under `accelerate launch -m distac.cli condition ...`;
        only the main process writes the output."""
        from distac.checkpoints import check_output_path
        from distac.conditioning.distac import ConditionConfig, condition
        from distac.conditioning.losses import scaling_coefficient
        from distac.config import build_dataclass, load_config
        from distac.data import load_model_task, load_task
        from distac.distributed import is_main_process
        from distac.models import build_model, load_model, save_model
        from distac.models.registry import backbone_state, check_same_backbone
        from distac.task_vectors import TaskVector

        check_output_path(output, [source, *others])  # the output directory replaces whatever is there
        values = load_config(config, overrides)
        configured_kappa = values.pop("kappa", 1)
        kappa = str(kappa if kappa is not None else configured_kappa)  # the flag, else the config's
        if others and kappa != "auto":
            raise typer.BadParameter("--others only serve --kappa auto; add it, or drop --others")
        if kappa == "auto":
            if not others:
                raise typer.BadParameter("--kappa auto needs --others")
            # the source among --others would count in the mean norm it is compared with (pulling kappa
            # towards 1), and another source given twice would count twice
            if any(other.resolve() == source.resolve() for other in others):
                raise typer.BadParameter(
                    f"--others holds the conditioned source {source} itself; give the other sources of the merge"
                )
            require_distinct_sources(others)
        else:
            kappa_value = _fixed_kappa(kappa)  # before any model is loaded
        teacher = load_model(source)
        selector = teacher.task_vector_selector()
        pretrained = backbone_state(build_model(teacher.spec))
        if kappa == "auto":
            other_models = {str(p): load_model(p) for p in others}
            check_same_backbone({str(source): teacher, **other_models})
            norms = [
                TaskVector.from_state_dicts(pretrained, m.state_dict(), selector).norm()
                for m in [teacher, *other_models.values()]
            ]
            kappa_value = scaling_coefficient(norms, 0)
        values = merged_options(
            values,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            teacher_temperature=teacher_temperature,
            student_temperature=student_temperature,
            beta=beta,
            num_unlabeled=unlabeled,
            device=device,
            kappa=kappa_value,
        )
        cfg = build_dataclass(ConditionConfig, values, "condition")
        # the source's own task falls back to the dataset it was fine-tuned on (a path it recorded)
        task = load_task(task_name, data_root) if task_name else load_model_task(teacher.spec, data_root, source.name)
        teacher.check_task(task, "validation", model_source=source)
        result = condition(teacher, pretrained, task, cfg, work_dir=work_dir or output.with_name(output.name + ".work"))
        if not is_main_process():
            return
        save_model(result.student, output, extra={"condition.json": result.to_json()})
        last = result.history[-1]
        console.print(
            f"conditioned {source} -> {output}: kappa={kappa_value:.3f}, "
            f"||tau||/||tau_0||={last['norm_ratio_to_original']:.3f}, val acc {last['val_accuracy']:.3f}, "
            f"entropy {last['entropy']:.3f}"
        )


def _fixed_kappa(kappa: str) -> float:
    """``--kappa`` (or the config's ``kappa``) as a number in (0, 1].

    DisTaC starts the student at theta_pre + kappa * tau to shrink a task vector that is too long for
    the merge; kappa > 1 would lengthen it (the harm being removed) and kappa <= 0 removes or flips
    it, and both used to run silently. ``ConditionConfig`` refuses them as well; this names the flag."""
    import math

    from distac.conditioning.distac import KAPPA_INTERVAL
    from distac.config import interval_text, outside_interval

    try:
        value = float(kappa)
    except ValueError:
        raise typer.BadParameter(f"--kappa must be a number in (0, 1] or 'auto', got {kappa!r}") from None
    if not math.isfinite(value) or outside_interval(value, **KAPPA_INTERVAL):
        raise typer.BadParameter(
            f"--kappa must be in {interval_text(**KAPPA_INTERVAL)}, got {kappa}: DisTaC only shrinks a task vector "
            "(kappa < 1 for a source longer than the others, 1 to keep its length), it never stretches or flips one"
        )
    return value
