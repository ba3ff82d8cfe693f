"""Per-clip failures: `ClipFailure` (kind, message, details), recorded in a stage's output and never
raised to the user, and the advice each command adds to one (`failure_message`).

The kinds are `FAILURE_KINDS`, described in `carv_attrib.video.decode`'s docstring (and README,
"encode"). This module sits below both the decoder (`video`) and the container probe (`probe`),
which raise them.
"""

from __future__ import annotations

from typing import Any

# Every per-clip status besides "ok" a latent row can hold, in the order README lists them: the
# decoder's and probe's (`decode`), the pool's (`timeout`, `crash`) and the VAE's (`encode_error`).
FAILURE_KINDS = (
    "missing",
    "not_a_file",
    "decode_error",
    "no_video",
    "still_image",
    "unsupported_codec",
    "truncated",
    "too_short",
    "timeout",
    "crash",
    "encode_error",
)


class ClipFailure(Exception):
    """A per-clip failure that is recorded in the output (status=kind), never raised to the user.

    `details` carries machine-readable facts (e.g. for too_short: available vs needed frames)."""

    def __init__(self, kind: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details or {}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # crosses process boundaries intact
        return (ClipFailure, (self.kind, self.message, self.details))


# What a user of each command can do about a clip too short for the frame policy.
# `encode --pad-short` changes no clip already encoded (only would-be too_short ones), so the same run
# takes it without --overwrite; --retry-failed encodes the clips that failed again.
TOO_SHORT_ADVICE = {
    "encode": "rerun with --pad-short --retry-failed to repeat its last frame (the encoded clips are "
    "kept), or lower --frames / --fps",
    "frames": "pass --pad-short to repeat its last frame, or lower --frames / --fps",
    "score": "use a longer query video; the run fixes the frame policy (encode the run again with "
    "--pad-short --retry-failed to accept short clips)",
}


# What a user can do about a picture given as a video: nothing a frame policy offers (--pad-short
# would only repeat it), so the advice names the fix outside the tool.
STILL_IMAGE_ADVICE = {
    "encode": "give a video file instead (--pad-short does not turn a picture into a clip)",
    "frames": "give a video file instead (--pad-short does not turn a picture into a clip)",
    "score": "score attributes videos: give the generated video file",
}
ADVICE = {"too_short": TOO_SHORT_ADVICE, "still_image": STILL_IMAGE_ADVICE}


def failure_message(failure: ClipFailure, command: str) -> str:
    """The failure's message, with advice the given command accepts where there is some."""
    advice = ADVICE.get(failure.kind, {}).get(command)
    return f"{failure.message}; {advice}" if advice else failure.message
