"""A decode function that crashes or hangs on request, to test the worker pool's isolation.

Workers import it by module name, so it lives in a module rather than in a test function.
"""

from __future__ import annotations

import os
import time
from typing import Any

from carv_attrib.video.decode import decode_clip


def decode(path: str, policy: Any) -> Any:
    name = os.path.basename(path)
    if "abort" in name:
        os.abort()  # what a crash inside ffmpeg looks like to the parent: SIGABRT
    if "segv" in name:
        import ctypes

        ctypes.string_at(0)  # SIGSEGV
    if "hang" in name:
        time.sleep(3600)
    return decode_clip(path, policy)
