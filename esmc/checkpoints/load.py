"""One loader for every local source: the network built on the meta device, keys and shapes
checked against the checkpoint, tensors read memory-mapped and converted one by one (packed
projections concatenated), then ``load_state_dict(strict=True, assign=True)``: a large model
is never held twice.

:func:`load_checkpoint` is locate -> load for any name or path; it builds the class it is
given (:class:`esmc.ESMC` from :meth:`esmc.ESMC.from_pretrained` and :mod:`esmc.weights`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esmc.checkpoints import WeightsError
from esmc.checkpoints.layouts import conversion_plan, detect_layout
from esmc.checkpoints.locate import CONFIG_FILE, checkpoint_files, locate
from esmc.config import OFFICIAL_NAMES, ESMCConfig
from esmc.model import ESMCNetwork
from esmc.quantize import quantize_int8

Network = TypeVar("Network", bound=ESMCNetwork)
DEFAULT_HEAD_DIM = 64  # every published ESMC; used when shapes come from the tensors alone


def load_checkpoint(
    model_class: type[Network],
    name_or_path: str | os.PathLike = "esmc-tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Network:
    """Load ESMC weights into a new ``model_class`` (the network or a class built on it), in
    eval mode.

    ``name_or_path``: ``esmc-tiny`` (shipped in the package), ``esmc-300m`` / ``esmc-600m`` /
    ``esmc-6b`` (Hugging Face hub; the official names in :data:`esmc.config.OFFICIAL_NAMES`,
    such as ``esmc_300m``, are aliases), any hub repo id, a local ``.pth`` / ``.safetensors``
    file, or a local directory laid out like a hub repo. ``revision`` and ``token`` apply to
    the hub (its cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured). Defaults: CUDA if
    available in bfloat16, else CPU in float32. ``dtype=torch.int8``: float32 weights whose
    block projections then become int8 (:func:`esmc.quantize.quantize_int8`; CPU only).
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    if dtype == torch.int8:
        model = load_checkpoint(model_class, name_or_path, device, torch.float32, revision, token)
        return quantize_int8(model)
    name = os.fspath(name_or_path)
    name = OFFICIAL_NAMES.get(name, name)
    path, filename = locate(name, revision=revision, token=token)
    return load_local(model_class, path, device=device, dtype=dtype, name=name, filename=filename)


def save_safetensors(model: ESMCNetwork, path: Path) -> None:
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


def load_local(
    model_class: type[Network],
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    name: str = "custom",
    filename: str | None = None,
) -> Network:
    """Load a local weight file, or a directory laid out like a hub repo, into a ``model_class``.

    ``filename``: the weight file inside the directory, when the caller knows it.
    """
    files, config_path = checkpoint_files(path, filename)
    with open_checkpoint(files) as reader:
        layout = detect_layout(reader.keys())
        plan = conversion_plan(reader.keys(), layout)
        config = model_config(config_path, reader, plan, name)
        with torch.device("meta"):
            model = model_class(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(plan, expected, path, layout)
        check_shapes(plan, expected, reader, path, config)
        state = {
            target: _read(reader, sources).to(device=device, dtype=dtype)
            for target, sources in plan.items()
        }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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
