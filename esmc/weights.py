"""Weights: saving and (temporary minimal) loading. Full loader to follow."""
from __future__ import annotations
import json
from pathlib import Path
import torch
from safetensors.torch import save_file


def save_safetensors(model, path: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "layout": "legacy"})
    c = model.config
    (Path(path).parent / "config.json").write_text(json.dumps({"d_model": c.d_model, "n_heads": c.n_heads, "n_layers": c.n_layers}))
