"""The server's limits and options, with their defaults (the ``nvclip-fast serve`` flags' defaults).

No dependency beyond the standard library: the command line reads these without importing the ASGI
stack.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
# NV-CLIP NIM accepts at most 64 inputs per request.
DEFAULT_MAX_ITEMS = 64
# One image, after base64 decoding. Photographs for CLIP are typically well under 1 MiB.
DEFAULT_MAX_IMAGE_BYTES = 16 * MIB
# A whole request body, counted while it is read (before any JSON parsing).
DEFAULT_MAX_BODY_BYTES = 64 * MIB
# Images and texts accepted and not yet embedded; past this a request gets 503 with Retry-After.
DEFAULT_MAX_QUEUED = 1024
# Texts of concurrent requests are run together on the text tower: up to this many per batch,
# waiting at most this long for more to arrive (the image queue's own default delay is 2 ms too).
DEFAULT_TEXT_BATCH = 64
DEFAULT_TEXT_DELAY_MS = 2.0
# SIGTERM: in-flight requests get this long to finish before they are cancelled.
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# What a 503 (queue full, model loading, shutting down) asks clients to wait before retrying.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Settings:
    """How one server behaves: the name it serves under, the API key and the limits."""

    model_name: str | None = None  # None: the Encoder's model name
    api_key: str | None = None  # None: no authentication
    max_items: int = DEFAULT_MAX_ITEMS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queued: int = DEFAULT_MAX_QUEUED
    text_batch: int = DEFAULT_TEXT_BATCH
    text_delay_ms: float = DEFAULT_TEXT_DELAY_MS
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    random_weights: bool = False  # the model's weights are random: say so at start and in /v1/models

    def __post_init__(self) -> None:
        for name in ("max_items", "max_image_bytes", "max_body_bytes", "max_queued", "text_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_queued < self.max_items:
            raise ValueError(
                f"max_queued ({self.max_queued}) must be at least max_items ({self.max_items}), "
                "or a full request could never be accepted"
            )
        if self.text_delay_ms < 0 or self.drain_timeout_s < 0:
            raise ValueError(
                f"text_delay_ms and drain_timeout_s must be >= 0, got {self.text_delay_ms}, "
                f"{self.drain_timeout_s}"
            )
        if self.api_key == "":
            raise ValueError("api_key is empty: give a key, or None for no authentication")
