"""Warnings attributed to the user's line, not to clipedge's."""

from __future__ import annotations

import sys
import warnings


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` pointing at the first caller outside clipedge, however deep the call
    chain (`clipedge.load` -> the model -> the plan), so the warning shows the user's own line
    and `-W error` / filters by module work on it."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "clipedge":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
