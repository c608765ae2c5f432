"""Output locations checked before the work that fills them."""
from __future__ import annotations

import os
import tempfile


def writable_directory(path: str, flag: str) -> str:
    """Makes ``path`` (absolute) if needed and checks that it takes files; raises ``ValueError``
    ``"{flag} {path} is not writable: {reason}"`` otherwise (a file in the path, no permission)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable: {e.strerror or e}") from None
    return path
