"""The models a server serves, by name: which one a request's ``model`` field means, and what
every response says about the model that served it.

A request names a model by its served name or by an alias: a model served under a registry
name (``esmc-300m``) also answers to the official ``esm`` names of the same weights
(``esmc_300m``, ``esmc-300m-2024-12``), as the local API accepts them. An empty name means the
default model. Any other name is ``NOT_FOUND`` naming the served models: a model name is never
ignored.

Each response's metadata names the model (as the request named it, or the default's name when
it named none), the sha256 of its weights, its dtype and the server's version, so that a result
can be reproduced and a client can check it was served by what it asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from esmc.config import OFFICIAL_NAMES
from esmc_server.errors import ServiceError


class ModelNotFound(ServiceError):
    """The request names a model this server does not serve."""

    code = "NOT_FOUND"


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One served model's identity (plain values)."""

    name: str
    aliases: tuple[str, ...]
    weights_sha256: str
    weights_bytes: int
    dtype: str
    server_version: str

    def answers(self, asked: str) -> bool:
        return asked == self.name or asked in self.aliases


def aliases_of(name: str) -> tuple[str, ...]:
    """The other names of the weights ``name`` stands for (registry and official names)."""
    canonical = OFFICIAL_NAMES.get(name, name)
    names = {canonical, *(k for k, v in OFFICIAL_NAMES.items() if v == canonical)}
    names.discard(name)
    return tuple(sorted(names))


def weights_digest(model: torch.nn.Module) -> tuple[str, int]:
    """``(sha256 hex, bytes)`` over the model's parameters and buffers: each one's name,
    dtype, shape and bytes, in name order. Equal digests: the same weights, bit for bit."""
    digest = hashlib.sha256()
    total = 0
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.numpy().tobytes() if data.numel() else b"")
        total += data.numel()
    return digest.hexdigest(), total


def served_model(name: str, model: torch.nn.Module, dtype: str, version: str) -> ServedModel:
    sha, nbytes = weights_digest(model)
    return ServedModel(name, aliases_of(name), sha, nbytes, dtype, version)


class ModelTable:
    """The served models, the default first; :meth:`resolve` maps a request's name to one."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("a server serves at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must differ, got {names}")
        self.models = tuple(models)

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def index(self, asked: str) -> int:
        """The position of the model ``asked`` names ("" the default); ``ModelNotFound``
        naming the served models otherwise."""
        if not asked:
            return 0
        for i, model in enumerate(self.models):  # a served name wins over another's alias
            if asked == model.name:
                return i
        for i, model in enumerate(self.models):
            if asked in model.aliases:
                return i
        served = ", ".join(repr(m.name) for m in self.models)
        raise ModelNotFound(
            f"model {asked[:100]!r} is not served here; this server serves {served} "
            f"(an empty model means {self.default.name!r})"
        )
