"""Where the weights are: a registry name, a Hugging Face repo id or a local path becomes a
local file or directory (a hub download is a snapshot directory in the Hugging Face cache,
laid out like the repo), and a directory becomes the weight files to read.

Weight files of a directory: ``model.safetensors.index.json`` and its shards, one
``*.safetensors``, or one ``.pth`` such as ``data/weights/<name>.pth``; ``config.json``
beside them gives the shape.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

from esmc.checkpoints import WeightsError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "shipped"
"""Weights that ship inside the package: ``<name>.safetensors`` plus ``config.json``."""
SHIPPED_MODELS = ("esmc-tiny",)


@dataclasses.dataclass(frozen=True)
class HubCheckpoint:
    repo_id: str
    filename: str | None = None  # a legacy .pth inside the repo; None: the repo's safetensors


HUB_CHECKPOINTS: dict[str, HubCheckpoint] = {
    "esmc-300m": HubCheckpoint(
        "EvolutionaryScale/esmc-300m-2024-12", "data/weights/esmc_300m_2024_12_v0.pth"
    ),
    "esmc-600m": HubCheckpoint(
        "EvolutionaryScale/esmc-600m-2024-12", "data/weights/esmc_600m_2024_12_v0.pth"
    ),
    "esmc-6b": HubCheckpoint("biohub/ESMC-6B"),
}
HUB_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", "*.pth")
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def locate(name: str, *, revision: str | None, token: str | bool | None) -> tuple[Path, str | None]:
    """A local file or directory holding ``name``'s weights, downloading from the hub if needed.

    Returns the path and, for registry checkpoints, the weight file inside the directory.
    """
    if name in SHIPPED_MODELS:
        return shipped_weights(name), None
    if name in HUB_CHECKPOINTS:
        checkpoint = HUB_CHECKPOINTS[name]
        patterns = (CONFIG_FILE, checkpoint.filename) if checkpoint.filename else HUB_PATTERNS
        directory = download(checkpoint.repo_id, revision=revision, token=token, patterns=patterns)
        return directory, checkpoint.filename
    path = Path(name).expanduser()
    if path.exists():
        return path, None
    if _looks_like_path(name):
        raise WeightsError(f"weights not found: {path} does not exist")
    if _REPO_ID.fullmatch(name):
        return download(name, revision=revision, token=token, patterns=HUB_PATTERNS), None
    known = ", ".join([*SHIPPED_MODELS, *HUB_CHECKPOINTS])
    raise WeightsError(
        f"unknown model {name!r}: use one of {known}, a Hugging Face repo id (owner/name), "
        "or the path of a local .pth / .safetensors file or directory"
    )


def shipped_weights(name: str) -> Path:
    path = SHIPPED_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise WeightsError(
            f"the shipped {name} weights are missing ({path}): this copy of the package was "
            f"built before they were trained; train them with "
            f"`python -m esmc.training.train_tiny --out {SHIPPED_DIR}`, reinstall the package, "
            "or pass another model name or path"
        )
    return path


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith((".pth", ".pt", ".safetensors", ".json"))
    )


def download(
    repo_id: str, *, revision: str | None, token: str | bool | None, patterns: Iterable[str]
) -> Path:
    """Snapshot the weight files of ``repo_id`` into the Hugging Face cache; the local directory."""
    import huggingface_hub

    try:
        directory = huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=list(patterns)
        )
    except (OSError, ValueError) as exc:  # hub errors derive from these
        raise hub_error(repo_id, revision, exc) from exc
    return Path(directory)


def hub_error(repo_id: str, revision: str | None, exc: Exception) -> WeightsError:
    """A :class:`WeightsError` saying what to do about a failed hub download."""
    import huggingface_hub
    from huggingface_hub import errors

    url = f"https://huggingface.co/{repo_id}"
    login = (
        "log in with `huggingface-cli login` (or `hf auth login`), set HF_TOKEN, "
        "or pass token=..."
    )
    if isinstance(exc, errors.GatedRepoError):
        return WeightsError(
            f"{repo_id} is a gated repository: accept its licence at {url} with your account, "
            f"then {login}"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return WeightsError(f"revision {revision!r} does not exist in {repo_id} ({url})")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return WeightsError(
            f"repository {repo_id} was not found on the Hugging Face hub; check the name, "
            f"or if it is private, {login}"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return WeightsError(_not_cached_message(repo_id, huggingface_hub.is_offline_mode()))
    if isinstance(exc, errors.HFValidationError):
        return WeightsError(f"{repo_id!r} is not a valid Hugging Face repo id: {exc}")
    return WeightsError(f"downloading {repo_id} from the Hugging Face hub failed: {exc}")


def _not_cached_message(repo_id: str, offline: bool) -> str:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if offline:
        return (
            f"{repo_id} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
            "download it once with network access (unset HF_HUB_OFFLINE), point HF_HOME or "
            "HF_HUB_CACHE at a cache that holds it, or pass a local path"
        )
    return (
        f"cannot reach the Hugging Face hub to download {repo_id}, and it is not in the cache "
        f"({cache}): check the network connection, or copy the cache from a machine that has "
        "it and set HF_HUB_OFFLINE=1, or pass a local path"
    )


def checkpoint_files(path: Path, filename: str | None = None) -> tuple[list[Path], Path | None]:
    """The weight files to read and the ``config.json`` that goes with them (if any)."""
    if path.is_file():
        config = path.parent / CONFIG_FILE
        return [path], config if config.is_file() else None
    if not path.is_dir():
        raise WeightsError(f"weights not found: {path} does not exist")
    config = path / CONFIG_FILE
    return weight_files(path, filename), config if config.is_file() else None


def weight_files(directory: Path, filename: str | None = None) -> list[Path]:
    """Weight files of a repo-like directory: an index and its shards, safetensors, or a .pth."""
    if filename is not None:
        path = directory / filename
        if not path.is_file():
            raise WeightsError(f"weights not found: {filename} is missing from {directory}")
        return [path]
    index = directory / INDEX_FILE
    if index.is_file():
        return _shards(index)
    safetensors = sorted(directory.glob("*.safetensors"))
    pth = sorted(directory.rglob("*.pth"))
    for found, kind in ((safetensors, ".safetensors"), (pth, ".pth")):
        if len(found) == 1:
            return found
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(directory)) for p in found[:5])
            raise WeightsError(
                f"{directory} holds several {kind} files ({names}) and no {INDEX_FILE}: "
                "pass the path of the one to load"
            )
    raise WeightsError(
        f"no weights in {directory}: expected {INDEX_FILE} with its shards, a .safetensors "
        "file, or a .pth file (e.g. data/weights/<name>.pth)"
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise WeightsError(
            f"{index} lists shards that are missing: {', '.join(missing[:5])}; "
            "the download is incomplete: fetch the repo again"
        )
    return shards
