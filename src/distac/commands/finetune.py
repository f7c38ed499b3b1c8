"""``distac finetune``: fine-tune a source model on a real task (and create harmful sources on purpose)."""

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
)


def register(app: typer.Typer) -> None:
    from distac.models.base import model_family_help

    @app.command("finetune")
    def finetune_command(
        task: str = typer.Option(..., "--task", "-t", help="Task name (e.g. sst2, mnist) or dataset path."),
        output: Path = typer.Option(..., "--output", "-o", help="Output distac model directory."),
        family: str = typer.Option(
            "hf-text", "--family", help=f"Model family (it must read the task's kind of data): {model_family_help()}."
        ),
        backbone: str = typer.Option(
            "all-MiniLM-L6-v2",
            "--backbone",
            help="Backbone: HF dir/name, CLIP dir, efficientnet-lite0, a local timm model directory, or a timm / "
            "torchvision:<name> with --backbone-weights.",
        ),
        steps: int | None = typer.Option(None, help="Optimizer steps (default 200)."),
        lr: float | None = typer.Option(None, help="Peak learning rate (a 10x value makes a long task vector)."),
        batch_size: int | None = typer.Option(None, help="Batch size."),
        loss: str | None = typer.Option(
            None, help="ce, label_smoothing, mixup or focal (the latter three lower confidence)."
        ),
        alpha: float | None = typer.Option(None, help="Label-smoothing alpha (paper: 0.1)."),
        gamma: float | None = typer.Option(None, help="Focal-loss gamma."),
        max_length: int = typer.Option(128, help="Max tokens per text example."),
        image_size: int | None = typer.Option(None, help="Resize images to this size (default: the backbone's)."),
        backbone_weights: str | None = typer.Option(
            None,
            "--backbone-weights",
            help="timm / torchvision: the pretrained weights of a named backbone (a state-dict file, read without "
            "pickle), or 'hub' to download them. Not needed for efficientnet-lite0 or a local timm model directory.",
        ),
        train_examples: int | None = typer.Option(None, help="Use at most this many training examples."),
        seed: int | None = typer.Option(None, help="Random seed."),
        head: str | None = typer.Option(
            None,
            help="train (default): head and backbone train together; probe: fit the head as a linear probe on "
            "the pretrained features first (LP-FT); frozen_probe: fit it, then freeze it and train the backbone "
            "only (the paper's CLIP set-up for models without a zero-shot head).",
        ),
        work_dir: Path | None = typer.Option(None, help="Checkpoint directory for resume (default <output>.work)."),
        device: str | None = CONFIGURABLE_DEVICE_OPTION,
        config: Path | None = CONFIG_OPTION,
        overrides: list[str] = SET_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Fine-tune backbone + task head (CLIP: image encoder only) with AdamW and a cosine schedule
        (--head frozen_probe: backbone only, under a linear-probe head).

        Resumable: the state is saved in --work-dir every `checkpoint_every` steps (`--set
        checkpoint_every=N`, default 100) and a rerun of the same command continues from it.
        Runs on several GPUs (or CPU processes) under `accelerate launch -m distac.cli finetune ...`;
        only the main process writes the output."""
        from distac.checkpoints import check_output_path
        from distac.config import build_dataclass, load_config
        from distac.data import load_task, task_dataset_path
        from distac.distributed import is_main_process
        from distac.models import ModelSpec, build_model, save_model
        from distac.models.base import check_family_fits_task, model_family
        from distac.models.registry import resolve_backbone
        from distac.training.finetune import FinetuneConfig, finetune
        from distac.training.losses import LossConfig

        check_output_path(output, [backbone] if Path(backbone).exists() else [])
        model_family(family)  # an unknown --family, before the data loads
        for flag, value in {
            "--train-examples": train_examples,
            "--max-length": max_length,
            "--image-size": image_size,
        }.items():
            if value is not None and value < 1:
                raise typer.BadParameter(f"{flag} must be at least 1, got {value}")
        values = load_config(config, overrides)
        loss_values = merged_options(values.pop("loss", {}) or {}, kind=loss, alpha=alpha, gamma=gamma)
        # --train-examples is the config's max_train_examples (the flag wins over a config value): fine-tuning
        # takes the subset (the same stratified one, with cfg.seed, as TaskData.limit took here before) and
        # finetune.json records the number; limiting the data here left it null in the record
        values = merged_options(
            values,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            head=head,
            device=device,
            max_train_examples=train_examples,
        )
        cfg = build_dataclass(FinetuneConfig, {**values, "loss": build_dataclass(LossConfig, loss_values, "loss")})
        data = load_task(task, data_root)
        check_family_fits_task(family, data)  # before the backbone loads: a text model cannot read images
        dataset = task_dataset_path(task, data_root)  # a dataset of the user's own: recorded for later commands
        options = {"max_length": max_length} if family == "hf-text" else {}
        if image_size:
            options["image_size"] = image_size
        if backbone_weights:
            if family != "timm":
                raise typer.BadParameter("--backbone-weights is for --family timm (timm and torchvision backbones)")
            weights_path = Path(backbone_weights).expanduser()
            options["weights"] = str(weights_path.resolve()) if weights_path.exists() else backbone_weights
        spec = ModelSpec(
            family,
            resolve_backbone(backbone),
            data.num_classes,
            task=data.name,
            class_names=data.class_names,
            options=options,
            task_source=str(dataset) if dataset is not None else None,
        )
        model = build_model(spec)
        result = finetune(model, data, cfg, work_dir=work_dir or output.with_name(output.name + ".work"))
        if not is_main_process():
            return
        save_model(model, output, extra={"finetune.json": {"config": _asdict(cfg), "result": result.to_json()}})
        console.print(f"saved {output} (final loss {result.losses[-1]:.4f}, {result.seconds:.0f} s)")


def _asdict(cfg: object) -> dict:
    from dataclasses import asdict

    return asdict(cfg)  # type: ignore[arg-type]
