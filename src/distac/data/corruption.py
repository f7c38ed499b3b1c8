"""Degraded unlabeled inputs, for the paper's robustness study (Table 4: conditioning on blurred
images instead of the clean training images).

DisTaC only needs inputs the teacher can label; this module answers "how good must those inputs
be?". Images get a Gaussian blur (torchvision's kernel, the one the paper's transforms use). Text
has no blur, so its analog is word dropout: each word is removed with probability ``strength``,
which degrades the input the same way (information is lost, the distribution shifts) while the
teacher can still label it.
"""

from __future__ import annotations

import numpy as np

from distac.data.tasks import TextPair
from distac.errors import ConfigError

CORRUPTIONS = ("blur", "word_dropout")


def corrupt_unlabeled(
    inputs: list[TextPair] | np.ndarray, kind: str, strength: float, seed: int = 0
) -> list[TextPair] | np.ndarray:
    """Return a corrupted copy of ``inputs`` (never modifies them).

    ``blur``: Gaussian blur with standard deviation ``strength`` pixels (images only).
    ``word_dropout``: drop each word with probability ``strength`` (text only; one word is kept).
    """
    if kind not in CORRUPTIONS:
        raise ConfigError(f"unknown unlabeled-data corruption {kind!r}; known {list(CORRUPTIONS)}")
    is_image = isinstance(inputs, np.ndarray)
    if kind == "blur":
        if not is_image:
            raise ConfigError("corruption 'blur' needs image inputs; use 'word_dropout' for text")
        return blur_images(inputs, strength)
    if is_image:
        raise ConfigError("corruption 'word_dropout' needs text inputs; use 'blur' for images")
    return drop_words(inputs, strength, seed)


def blur_images(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (N, H, W[, C]) uint8 array; kernel size covers +-3 sigma (odd)."""
    if sigma <= 0:
        return images.copy()
    import torch
    from torchvision.transforms.functional import gaussian_blur

    tensor = torch.from_numpy(np.ascontiguousarray(images)).float()
    channels_last = tensor.ndim == 4
    tensor = tensor.permute(0, 3, 1, 2) if channels_last else tensor.unsqueeze(1)
    kernel = 2 * int(np.ceil(3 * sigma)) + 1
    kernel = min(kernel, 2 * (min(tensor.shape[-2:]) // 2) - 1)  # torchvision needs kernel <= image size
    blurred = gaussian_blur(tensor, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    blurred = blurred.permute(0, 2, 3, 1) if channels_last else blurred.squeeze(1)
    return blurred.round().clamp(0, 255).to(torch.uint8).numpy()


def drop_words(pairs: list[TextPair], probability: float, seed: int = 0) -> list[TextPair]:
    """Remove each whitespace-separated word with ``probability`` (at least one word survives)."""
    if not 0.0 <= probability < 1.0:
        raise ConfigError(f"word_dropout strength must be in [0, 1), got {probability}")
    rng = np.random.default_rng(seed)

    def drop(text: str | None) -> str | None:
        if text is None:
            return None
        words = text.split()
        if not words:
            return text
        keep = rng.random(len(words)) >= probability
        if not keep.any():
            keep[rng.integers(len(words))] = True
        return " ".join(w for w, k in zip(words, keep, strict=True) if k)

    return [(drop(a), drop(b)) for a, b in pairs]
