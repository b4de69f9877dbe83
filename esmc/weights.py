"""Loading and saving ESMC weights: the public names, in one place.

The work is done by :mod:`esmc.checkpoints` (``locate``: where the weights are; ``layouts``:
the published layouts and their key renaming; ``load``: the one loader); this module binds it
to :class:`esmc.ESMC`, the class users load, so ``load_pretrained`` gives what
``ESMC.from_pretrained`` gives.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from esmc.checkpoints import WeightsError
from esmc.checkpoints.layouts import RULES, conversion_plan, detect_layout, legacy_name
from esmc.checkpoints import load
from esmc.checkpoints.load import default_device, default_dtype, save_safetensors
from esmc.checkpoints.locate import (
    HUB_CHECKPOINTS,
    SHIPPED_DIR,
    SHIPPED_MODELS,
    HubCheckpoint,
    hub_error,
    locate,
    shipped_weights,
)
from esmc.pretrained import ESMC

__all__ = [
    "HUB_CHECKPOINTS",
    "RULES",
    "SHIPPED_DIR",
    "SHIPPED_MODELS",
    "HubCheckpoint",
    "WeightsError",
    "conversion_plan",
    "default_device",
    "default_dtype",
    "detect_layout",
    "hub_error",
    "legacy_name",
    "load_local",
    "load_pretrained",
    "locate",
    "save_safetensors",
    "shipped_weights",
]


def load_pretrained(
    name_or_path: str | os.PathLike = "esmc-tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> ESMC:
    """:meth:`ESMC.from_pretrained`: see :func:`esmc.checkpoints.load.load_checkpoint`."""
    return load.load_checkpoint(ESMC, name_or_path, device, dtype, revision, token)


def load_local(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    name: str = "custom",
    filename: str | None = None,
) -> ESMC:
    """An :class:`ESMC` from a local weight file or repo-like directory (no hub, no registry):
    see :func:`esmc.checkpoints.load.load_local`."""
    return load.load_local(ESMC, path, device=device, dtype=dtype, name=name, filename=filename)
