"""Warnings that point at the user's line, not at autoaccum's.

``warnings.warn(..., stacklevel=n)`` needs the caller to know how deep it is, which changes with
every refactor (and through torch's hooks). This walks out of the package instead.
"""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside autoaccum (the user's call)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
