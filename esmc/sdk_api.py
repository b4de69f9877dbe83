"""The official ``esm`` SDK's types beside this library's: what :class:`esmc.ESMC`'s SDK
methods (in :mod:`esmc.pretrained`) use to take either family and answer in the same one.

Code written against ``esm.models.esmc.ESMC`` (and the generation methods of the SDK's
``ESM3InferenceClient``) runs with only the import changed: ``encode``, ``decode``,
``logits``, ``generate``, ``batch_generate``, ``forward_and_sample``, their async twins and
``raw_model``.

Inputs may be this library's types (:mod:`esmc.types`) or the official ``esm.sdk.api``
ones; every output is built from the same family as the input, so results flow back into
``esm`` utilities, ``isinstance`` checks included. Tracks other than the sequence (which
the SDK fills in by default, e.g. ``get_default_sampling_config``) are ignored, as the
reference ESMC ignores them.

Differences from the reference, on purpose: tokenization is strict (an unknown character
raises :class:`esmc.TokenizationError` instead of becoming ``<unk>``); ``decode`` also takes
1-D tokens (the reference asserts a batch dimension); generation draws from a per-request
generator seeded by ``seed`` (or, when None, by a draw from torch's global generator, so
``torch.manual_seed`` makes a script reproducible). With ``seed=s``, a single prompt gives
the tokens the reference gives after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import attrs
import torch

from esmc import tokenizer
from esmc import types as esmc_types
from esmc.generation import default_sampling_config

_OFFICIAL_PREFIX = "esm."
_SDK_MODULE = "esm.sdk.api"
_MAX_DRAWN_SEED = 2**63 - 1
ERROR_BAD_REQUEST = 400
ERROR_NO_MASKS = 500  # the reference's code for "Cannot sample sequence when input has no masks"


# -- types of either family ----------------------------------------------------------------


def family_of(obj: Any) -> ModuleType:
    """``esm.sdk.api`` for an object of the official package, else :mod:`esmc.types`."""
    if type(obj).__module__.startswith(_OFFICIAL_PREFIX):
        return importlib.import_module(_SDK_MODULE)
    return esmc_types


def convert(obj: Any, cls: type) -> Any:
    """An instance of the attrs class ``cls`` from ``obj``'s same-named fields (recursively).

    Fields ``cls`` lacks are dropped; fields ``obj`` lacks keep ``cls``'s defaults.
    """
    values = {}
    for field in attrs.fields(cls):
        if not hasattr(obj, field.name):
            continue
        value = getattr(obj, field.name)
        if attrs.has(type(value)):
            target = getattr(importlib.import_module(cls.__module__), type(value).__name__, None)
            value = convert(value, target) if target is not None else value
        values[field.name] = value
    return cls(**values)


def mirror(obj: Any, like: Any) -> Any:
    """``obj`` (an :mod:`esmc.types` instance) as the same-named class of ``like``'s family."""
    family = family_of(like)
    if family is esmc_types:
        return obj
    return convert(obj, getattr(family, type(obj).__name__))


def as_logits_config(config: Any) -> esmc_types.LogitsConfig:
    """This library's LogitsConfig from ours, the official one (any version) or None."""
    if config is None:
        return esmc_types.LogitsConfig()
    if isinstance(config, esmc_types.LogitsConfig):
        return config
    return convert(config, esmc_types.LogitsConfig)


def sequence_tokens(input: Any) -> torch.Tensor:
    """The token ids of a tensor, or of a protein tensor (ours, the official one, or its
    batched form): (L,) or (B, L)."""
    tokens = input if isinstance(input, torch.Tensor) else getattr(input, "sequence", None)
    if not isinstance(tokens, torch.Tensor):
        raise ValueError("expected token ids: a tensor or a protein tensor with a sequence track")
    return tokens


def as_sampling_config(config: Any) -> esmc_types.SamplingConfig:
    """This library's SamplingConfig: the sequence track and the embedding flags only.

    None means the reference's default (sample the sequence at its masks).
    """
    if config is None:
        return default_sampling_config()
    track = getattr(config, "sequence", None)
    return esmc_types.SamplingConfig(
        sequence=None if track is None else convert(track, esmc_types.SamplingTrackConfig),
        return_per_residue_embeddings=bool(getattr(config, "return_per_residue_embeddings", False)),
        return_mean_embedding=bool(getattr(config, "return_mean_embedding", False)),
    )


def as_generation_config(config: Any) -> esmc_types.GenerationConfig:
    if isinstance(config, esmc_types.GenerationConfig):
        return config
    return convert(config, esmc_types.GenerationConfig)


def library_input(input: Any) -> esmc_types.ESMProteinTensor:
    """A protein or protein tensor of either family as this library's tokens (CPU)."""
    tokens = getattr(input, "sequence", None)
    if isinstance(tokens, str):
        tokens = tokenizer.encode(tokens)
    if not isinstance(tokens, torch.Tensor):
        raise ValueError("the prompt has no sequence track: give an ESMProtein or ESMProteinTensor")
    return esmc_types.ESMProteinTensor(sequence=tokens.detach().to("cpu"))


def like_input(input: Any, tokens: torch.Tensor) -> Any:
    """``input`` with its sequence replaced by ``tokens`` (decoded for a protein)."""
    if isinstance(input.sequence, str):
        return attrs.evolve(input, sequence=tokenizer.decode(tokens))
    return attrs.evolve(input, sequence=tokens.to(input.sequence.device))


def drawn_seed() -> int:
    """A seed drawn from torch's global generator (``torch.manual_seed`` makes it repeat)."""
    return int(torch.randint(0, _MAX_DRAWN_SEED, (), dtype=torch.int64))


def protein_error(family: ModuleType, code: int, message: str) -> Exception:
    """The SDK's ``ESMProteinError`` (or this library's) with an HTTP-style code."""
    return family.ESMProteinError(error_code=code, error_msg=message)
