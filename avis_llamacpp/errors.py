"""Exception hierarchy for avis_llamacpp, so callers can catch plugin errors precisely."""

from __future__ import annotations

__all__ = [
    "AVISError",
    "InvalidArgumentError",
    "SelectorError",
    "ImageError",
    "VideoError",
    "ModelLoadError",
    "ContextOverflowError",
    "CaptureError",
    "EncodeError",
    "PolicyFileError",
    "SnapshotMismatchError",
    "ClosedError",
]


class AVISError(Exception):
    """Base class of every error raised by avis_llamacpp, for one catch-all handler."""


class InvalidArgumentError(AVISError, ValueError):
    """An argument has the wrong shape, type or range; also a ValueError for generic handlers."""


class SelectorError(InvalidArgumentError):
    """A token selector returned an unusable kept set (not integers, out of range, duplicated, empty)."""


class ImageError(AVISError, ValueError):
    """An image could not be read, decoded or is unusable (empty, bad size, bad format)."""


class VideoError(ImageError):
    """A video could not be read or decoded, has no video stream, or is over a size / length limit (or PyAV, the
    `[video]` extra, is missing); an ImageError, so handlers of bad images catch bad videos too."""


class ModelLoadError(AVISError):
    """A language model or multimodal projector file could not be loaded."""


class ContextOverflowError(AVISError):
    """The prompt plus image tokens and generation budget do not fit in the context window."""


class CaptureError(AVISError):
    """Vision-encoder key capture failed or returned tensors of an unexpected shape."""


class EncodeError(AVISError, RuntimeError):
    """The vision encoder failed or produced unusable (non-finite) embeddings for an image."""


class PolicyFileError(AVISError):
    """A policy / difficulty-predictor file is missing, malformed or of an unsupported version."""


class SnapshotMismatchError(AVISError):
    """A saved state snapshot does not match the current model, prompt or image tokens."""


class ClosedError(AVISError, RuntimeError):
    """The object was closed (its llama.cpp handles freed); create a new one to run more queries."""
