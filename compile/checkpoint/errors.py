"""CheckpointError and the path type the checkpoint modules share."""
from __future__ import annotations

from pathlib import Path
from typing import Union


PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint this compiler cannot read: the message says which key, file or architecture."""
