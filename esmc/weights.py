"""ESMC weights: one loader for registry names, Hugging Face repos, local files and directories.

Every source first becomes a local path (a hub download is a snapshot directory in the
Hugging Face cache, laid out like the repo), then one loader runs:

1. find the weight files (``model.safetensors.index.json`` and its shards, ``*.safetensors``,
   or a ``.pth`` such as ``data/weights/<name>.pth``) and ``config.json``;
2. detect the layout from the keys and rename every key into our (legacy) names with
   :func:`legacy_name`, the only place that knows the three layouts;
3. build :class:`ESMC` on the meta device, check keys and shapes, then read and convert
   tensor by tensor (q/k/v and gate/up concatenated per block) and
   ``load_state_dict(strict=True, assign=True)``: sources stay memory-mapped, so a large
   model is never held twice.

Layouts (see ``docs/ESMC-REFERENCE.md``): the legacy ``.pth`` of ``esm`` <= 3.3; the research
safetensors of ``biohub/ESMC-*`` (prefix ``esmc.``, TransformerEngine names, packed projections,
``*_extra_state`` entries); the ``transformers`` ``EsmcForMaskedLM`` layout (split q/k/v, gate/up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esmc.config import OFFICIAL_NAMES, ESMCConfig
from esmc.model import ESMC

SHIPPED_DIR = Path(__file__).parent / "weights"
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
DEFAULT_HEAD_DIM = 64  # every published ESMC; used when shapes come from the tensors alone
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit the model; the message says what to do."""


# -- public API ------------------------------------------------------------------------------


def load_pretrained(
    name_or_path: str | os.PathLike = "esmc-tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> ESMC:
    """Load ESMC weights in eval mode.

    ``name_or_path``: ``esmc-tiny`` (shipped in the package), ``esmc-300m`` / ``esmc-600m`` /
    ``esmc-6b`` (Hugging Face hub; the official names in :data:`OFFICIAL_NAMES`, such as
    ``esmc_300m``, are aliases), any hub repo id, a local ``.pth`` / ``.safetensors`` file,
    or a local directory laid out like a hub repo. ``revision`` and ``token`` apply to the hub
    (its cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured). Defaults: CUDA if available
    in bfloat16, else CPU in float32. ``dtype=torch.int8``: see :func:`esmc.quantize.quantize_int8`
    (CPU only).
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    if dtype == torch.int8:  # float32 weights, block projections then int8 (esmc.quantize)
        from esmc.quantize import quantize_int8

        return quantize_int8(load_pretrained(name_or_path, device, torch.float32, revision, token))
    name = os.fspath(name_or_path)
    name = OFFICIAL_NAMES.get(name, name)
    path, filename = locate(name, revision=revision, token=token)
    return load_local(path, device=device, dtype=dtype, name=name, filename=filename)


def save_safetensors(model: ESMC, path: Path) -> None:
    """Write ``model``'s state dict (legacy keys) to ``path`` and ``config.json`` beside it."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "layout": "legacy"})
    c = model.config
    shape = {"d_model": c.d_model, "n_heads": c.n_heads, "n_layers": c.n_layers}
    (Path(path).parent / CONFIG_FILE).write_text(json.dumps(shape))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (as the reference runs there), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# -- where the weights are -------------------------------------------------------------------


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


# -- one loader for every local source ---------------------------------------------------------


def load_local(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    name: str = "custom",
    filename: str | None = None,
) -> ESMC:
    """Load a local weight file, or a directory laid out like a hub repo.

    ``filename``: the weight file inside the directory, when the caller knows it.
    """
    files, config_path = checkpoint_files(path, filename)
    with open_checkpoint(files) as reader:
        layout = detect_layout(reader.keys())
        plan = conversion_plan(reader.keys(), layout)
        config = model_config(config_path, reader, plan, name)
        with torch.device("meta"):
            model = ESMC(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(plan, expected, path, layout)
        check_shapes(plan, expected, reader, path, config)
        state = {
            target: _read(reader, sources).to(device=device, dtype=dtype)
            for target, sources in plan.items()
        }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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


# -- reading tensors lazily ------------------------------------------------------------------


class CheckpointReader:
    """Names, shapes and (on demand) tensors of one checkpoint, however many files it spans."""

    def __init__(self) -> None:
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._loaders: dict[str, Callable[[], torch.Tensor]] = {}

    def add(self, key: str, shape: tuple[int, ...], loader: Callable[[], torch.Tensor]) -> None:
        if key in self._shapes:
            raise WeightsError(f"{key} appears in more than one weight file")
        self._shapes[key] = shape
        self._loaders[key] = loader

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._loaders[key]()


@contextlib.contextmanager
def open_checkpoint(files: list[Path]) -> Iterator[CheckpointReader]:
    """Memory-map ``files`` (.safetensors shards, or one .pth) for reading tensor by tensor."""
    reader = CheckpointReader()
    with contextlib.ExitStack() as stack:
        for path in files:
            if path.suffix == ".safetensors":
                _add_safetensors(reader, path, stack)
            else:
                _add_torch(reader, path)
        yield reader


def _add_safetensors(reader: CheckpointReader, path: Path, stack: contextlib.ExitStack) -> None:
    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"cannot read weights from {path}: {exc}") from exc
    for key in handle.keys():
        shape = tuple(handle.get_slice(key).get_shape())
        reader.add(key, shape, functools.partial(handle.get_tensor, key))


def _add_torch(reader: CheckpointReader, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # unpickling raises many kinds
        raise WeightsError(f"cannot read weights from {path}: {exc}") from exc
    tensors_only = isinstance(state, Mapping) and all(
        isinstance(v, torch.Tensor) for v in state.values()
    )
    if not tensors_only:
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    for key, tensor in state.items():
        reader.add(key, tuple(tensor.shape), functools.partial(_identity, tensor))


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _read(reader: CheckpointReader, sources: list[str]) -> torch.Tensor:
    """One of our tensors: a checkpoint tensor, or packed parts concatenated along dim 0."""
    if len(sources) == 1:
        return reader.get(sources[0])
    return torch.cat([reader.get(key) for key in sources])


# -- layouts and key renaming ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """A checkpoint key ``pattern`` (full match) -> our name ``target`` (``\\g<i>``: the block).

    ``part`` of ``parts``: the position of this key among the tensors packed into ``target``.
    """

    pattern: re.Pattern
    target: str
    part: int = 0
    parts: int = 1


def _rules(*rows: tuple) -> list[Rule]:
    return [Rule(re.compile(row[0].replace("{i}", r"(?P<i>\d+)")), *row[1:]) for row in rows]


_BLOCK = r"transformer.blocks.\g<i>"
_RESEARCH = r"esmc\.transformer\.blocks\.{i}"
_HF = r"esmc\.layers\.{i}"
RULES: dict[str, list[Rule]] = {
    "legacy": [],
    "research": _rules(
        (r"esmc\.embed\.weight", "embed.weight"),
        (r"esmc\.transformer\.norm\.weight", "transformer.norm.weight"),
        (
            _RESEARCH + r"\.attn\.layernorm_qkv\.layer_norm_(?P<p>weight|bias)",
            _BLOCK + r".attn.layernorm_qkv.0.\g<p>",
        ),
        (_RESEARCH + r"\.attn\.layernorm_qkv\.weight", _BLOCK + ".attn.layernorm_qkv.1.weight"),
        (_RESEARCH + r"\.attn\.(?P<m>q_ln|k_ln|out_proj)\.weight", _BLOCK + r".attn.\g<m>.weight"),
        (_RESEARCH + r"\.ffn\.layer_norm_(?P<p>weight|bias)", _BLOCK + r".ffn.0.\g<p>"),
        (_RESEARCH + r"\.ffn\.fc1_weight", _BLOCK + ".ffn.1.weight"),
        (_RESEARCH + r"\.ffn\.fc2_weight", _BLOCK + ".ffn.3.weight"),
        (r"lm_head\.(?P<m>[023])\.(?P<p>weight|bias)", r"sequence_head.\g<m>.\g<p>"),
    ),
    "transformers": _rules(
        (r"esmc\.embed_tokens\.weight", "embed.weight"),
        (r"esmc\.norm\.weight", "transformer.norm.weight"),
        (_HF + r"\.input_layernorm\.(?P<p>weight|bias)", _BLOCK + r".attn.layernorm_qkv.0.\g<p>"),
        (_HF + r"\.self_attn\.q_proj\.weight", _BLOCK + ".attn.layernorm_qkv.1.weight", 0, 3),
        (_HF + r"\.self_attn\.k_proj\.weight", _BLOCK + ".attn.layernorm_qkv.1.weight", 1, 3),
        (_HF + r"\.self_attn\.v_proj\.weight", _BLOCK + ".attn.layernorm_qkv.1.weight", 2, 3),
        (_HF + r"\.self_attn\.q_norm\.weight", _BLOCK + ".attn.q_ln.weight"),
        (_HF + r"\.self_attn\.k_norm\.weight", _BLOCK + ".attn.k_ln.weight"),
        (_HF + r"\.self_attn\.o_proj\.weight", _BLOCK + ".attn.out_proj.weight"),
        (_HF + r"\.post_attention_layernorm\.(?P<p>weight|bias)", _BLOCK + r".ffn.0.\g<p>"),
        (_HF + r"\.mlp\.gate_proj\.weight", _BLOCK + ".ffn.1.weight", 0, 2),
        (_HF + r"\.mlp\.up_proj\.weight", _BLOCK + ".ffn.1.weight", 1, 2),
        (_HF + r"\.mlp\.down_proj\.weight", _BLOCK + ".ffn.3.weight"),
        (r"lm_head\.dense\.(?P<p>weight|bias)", r"sequence_head.0.\g<p>"),
        (r"lm_head\.layer_norm\.(?P<p>weight|bias)", r"sequence_head.2.\g<p>"),
        (r"lm_head\.decoder\.(?P<p>weight|bias)", r"sequence_head.3.\g<p>"),
    ),
}
_IGNORED = re.compile(r".*_extra_state|.*rotary_emb\.(original_)?inv_freq")


def legacy_name(key: str, layout: str) -> tuple[str, int, int] | None:
    """Our (legacy) name for checkpoint ``key`` of ``layout``, as ``(name, part, parts)``.

    ``parts > 1``: our tensor is ``parts`` checkpoint tensors concatenated along dim 0, this
    key being number ``part`` (q, k, v -> ``layernorm_qkv.1``; gate, up -> ``ffn.1``).
    ``None``: an entry to ignore (TransformerEngine ``*_extra_state``, rotary buffers).
    A key no rule knows comes back unchanged, so that it surfaces as unexpected.
    """
    if _IGNORED.fullmatch(key):
        return None
    for rule in RULES[layout]:
        match = rule.pattern.fullmatch(key)
        if match:
            return match.expand(rule.target), rule.part, rule.parts
    return key, 0, 1


def detect_layout(keys: Iterable[str]) -> str:
    """``legacy``, ``research`` or ``transformers``, from the names of the tensors."""
    keys = list(keys)
    markers = {
        "transformers": ("esmc.embed_tokens.", "esmc.layers."),
        "research": ("esmc.embed.", "esmc.transformer."),
        "legacy": ("embed.", "transformer.blocks."),
    }
    for layout, prefixes in markers.items():
        if any(k.startswith(prefixes) for k in keys):
            return layout
    raise WeightsError(
        f"not an ESMC checkpoint (no embedding or transformer block keys); keys start with "
        f"{', '.join(keys[:5]) or 'nothing'}"
    )


def conversion_plan(keys: Iterable[str], layout: str) -> dict[str, list[str]]:
    """Our name -> the checkpoint keys that make it, in concatenation order."""
    groups: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    for key in keys:
        mapped = legacy_name(key, layout)
        if mapped is None:
            continue
        target, part, parts = mapped
        groups.setdefault(target, {})[part] = key
        sizes[target] = parts
    incomplete = [t for t, g in groups.items() if len(g) != sizes[t]]
    if incomplete:
        target = incomplete[0]
        raise WeightsError(
            f"missing keys: {target} is packed from {sizes[target]} {layout} tensors but the "
            f"checkpoint has only {sorted(groups[target].values())} "
            f"({len(incomplete)} such tensors incomplete); the checkpoint is truncated or corrupt"
        )
    return {t: [g[i] for i in sorted(g)] for t, g in groups.items()}


# -- shapes ----------------------------------------------------------------------------------

_SPELLINGS = (
    ("d_model", "n_heads", "n_layers"),
    ("hidden_size", "num_attention_heads", "num_hidden_layers"),
)
_BLOCK_INDEX = re.compile(r"transformer\.blocks\.(\d+)\.")


def model_config(
    config_path: Path | None, reader: CheckpointReader, plan: dict[str, list[str]], name: str
) -> ESMCConfig:
    """Shapes from ``config.json`` (either spelling), else inferred from the tensors."""
    dims = _config_dims(config_path) if config_path else None
    if dims is None:
        dims = _infer_dims(reader, plan)
    d_model, n_heads, n_layers = dims
    try:
        return ESMCConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, name=name)
    except ValueError as exc:
        raise WeightsError(f"invalid model shape {dims} for {name}: {exc}") from None


def _config_dims(path: Path) -> tuple[int, int, int] | None:
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from None
    for names in _SPELLINGS:
        if all(n in config for n in names):
            return tuple(int(config[n]) for n in names)
    return None  # a config.json without the model's shape: read it from the tensors


def _infer_dims(reader: CheckpointReader, plan: dict[str, list[str]]) -> tuple[int, int, int]:
    if "embed.weight" not in plan:
        raise WeightsError(
            "cannot tell the model's shape: no config.json with d_model/n_heads/n_layers "
            "and no embedding tensor; add a config.json beside the weights"
        )
    d_model = reader.shape(plan["embed.weight"][0])[-1]
    blocks = {int(m.group(1)) for t in plan if (m := _BLOCK_INDEX.match(t))}
    n_layers = max(blocks) + 1 if blocks else 0
    return d_model, max(1, d_model // DEFAULT_HEAD_DIM), n_layers


def check_keys(
    plan: dict[str, list[str]], expected: dict[str, tuple], path: Path, layout: str
) -> None:
    missing = [k for k in expected if k not in plan]
    unexpected = [plan[k][0] for k in plan if k not in expected]
    if not (missing or unexpected):
        return
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
    raise WeightsError(
        f"{path} ({layout} layout) does not match ESMC: {'; '.join(problems)}. Check that it is "
        "an ESMC checkpoint and that its config.json matches its tensors"
    )


def check_shapes(
    plan: dict[str, list[str]],
    expected: dict[str, tuple],
    reader: CheckpointReader,
    path: Path,
    config: ESMCConfig,
) -> None:
    wrong = []
    for target, sources in plan.items():
        got = _packed_shape([reader.shape(k) for k in sources])
        if got != expected[target]:
            wrong.append(f"{' + '.join(sources)}: expected {expected[target]}, got {got}")
    if wrong:
        raise WeightsError(
            f"{path} does not fit ESMC(d_model={config.d_model}, n_heads={config.n_heads}, "
            f"n_layers={config.n_layers}): wrong shapes ({len(wrong)}): {'; '.join(wrong[:5])}. "
            "Check that config.json describes these weights"
        )


def _packed_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | list:
    """Shape after concatenating along dim 0 (the list itself when the parts do not stack)."""
    if len(shapes) == 1:
        return tuple(shapes[0])
    if any(len(s) == 0 or s[1:] != shapes[0][1:] for s in shapes):
        return shapes
    return (sum(s[0] for s in shapes), *shapes[0][1:])
