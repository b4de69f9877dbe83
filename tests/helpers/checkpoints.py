"""Write an ESMC's weights in each published layout, laid out like the hub repos.

The mappings here are written from the table of docs/checkpoints.md, apart from
the loader's, so that loading what these write checks the loader against the table; the
``transformers`` layout is written by ``transformers`` itself (``save_pretrained``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from esmc import ESMC

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def shape_config(model: ESMC, spelling: str = "esm") -> dict:
    c = model.config
    if spelling == "esm":
        return {"d_model": c.d_model, "n_heads": c.n_heads, "n_layers": c.n_layers}
    return {
        "hidden_size": c.d_model,
        "num_attention_heads": c.n_heads,
        "num_hidden_layers": c.n_layers,
    }


def legacy_state_dict(model: ESMC) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_legacy_repo(
    model: ESMC, root: Path, name: str = "esmc_test_2024_12_v0", with_config: bool = False
) -> Path:
    """``root/data/weights/<name>.pth`` as the EvolutionaryScale repos hold it; the .pth path."""
    path = root / "data" / "weights" / f"{name}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(legacy_state_dict(model), path)
    if with_config:
        (root / "config.json").write_text(json.dumps(shape_config(model)))
    return path


# -- research safetensors (biohub/ESMC-*) ------------------------------------------------------

_RESEARCH_SUFFIXES = {
    "attn.layernorm_qkv.0.weight": "attn.layernorm_qkv.layer_norm_weight",
    "attn.layernorm_qkv.0.bias": "attn.layernorm_qkv.layer_norm_bias",
    "attn.layernorm_qkv.1.weight": "attn.layernorm_qkv.weight",
    "attn.q_ln.weight": "attn.q_ln.weight",
    "attn.k_ln.weight": "attn.k_ln.weight",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "ffn.0.weight": "ffn.layer_norm_weight",
    "ffn.0.bias": "ffn.layer_norm_bias",
    "ffn.1.weight": "ffn.fc1_weight",
    "ffn.3.weight": "ffn.fc2_weight",
}


def research_key(key: str) -> str:
    block = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", key)
    if block:
        return f"esmc.transformer.blocks.{block.group(1)}.{_RESEARCH_SUFFIXES[block.group(2)]}"
    if key.startswith("sequence_head."):
        return "lm_head." + key.removeprefix("sequence_head.")
    return "esmc." + key  # embed.weight, transformer.norm.weight


def research_state_dict(model: ESMC) -> dict[str, torch.Tensor]:
    """Research names plus the TransformerEngine ``*_extra_state`` entries (empty uint8)."""
    state = {research_key(k): v for k, v in legacy_state_dict(model).items()}
    for i in range(model.config.n_layers):
        for module in ("attn.layernorm_qkv", "attn.out_proj", "ffn"):
            key = f"esmc.transformer.blocks.{i}.{module}._extra_state"
            state[key] = torch.empty(0, dtype=torch.uint8)
    return state


def write_research_repo(model: ESMC, root: Path, shards: int = 1) -> Path:
    """``model.safetensors`` (or ``shards`` files and an index), config.json in d_model spelling."""
    root.mkdir(parents=True, exist_ok=True)
    state = research_state_dict(model)
    config = {"architectures": ["ESMCForMaskedLM"], "model_type": "esmc", **shape_config(model)}
    (root / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        write_sharded(state, root, shards)
    return root


def write_sharded(state: dict[str, torch.Tensor], root: Path, shards: int) -> None:
    """Split ``state`` round-robin over ``shards`` files with a model.safetensors.index.json."""
    keys = list(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.nbytes for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


# -- transformers (EsmcForMaskedLM) ------------------------------------------------------------

_TRANSFORMERS_SUFFIXES = {
    "attn.layernorm_qkv.0.weight": ["input_layernorm.weight"],
    "attn.layernorm_qkv.0.bias": ["input_layernorm.bias"],
    "attn.layernorm_qkv.1.weight": [f"self_attn.{p}_proj.weight" for p in "qkv"],
    "attn.q_ln.weight": ["self_attn.q_norm.weight"],
    "attn.k_ln.weight": ["self_attn.k_norm.weight"],
    "attn.out_proj.weight": ["self_attn.o_proj.weight"],
    "ffn.0.weight": ["post_attention_layernorm.weight"],
    "ffn.0.bias": ["post_attention_layernorm.bias"],
    "ffn.1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "ffn.3.weight": ["mlp.down_proj.weight"],
}
_TRANSFORMERS_TOP = {
    "embed.weight": "esmc.embed_tokens.weight",
    "transformer.norm.weight": "esmc.norm.weight",
    "sequence_head.0": "lm_head.dense",
    "sequence_head.2": "lm_head.layer_norm",
    "sequence_head.3": "lm_head.decoder",
}


def transformers_state_dict(model: ESMC) -> dict[str, torch.Tensor]:
    """Our weights under EsmcForMaskedLM names: packed q;k;v and gate;up split in order."""
    state = {}
    for key, tensor in legacy_state_dict(model).items():
        block = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", key)
        if block:
            names = _TRANSFORMERS_SUFFIXES[block.group(2)]
            for name, part in zip(names, tensor.chunk(len(names))):
                state[f"esmc.layers.{block.group(1)}.{name}"] = part.clone()
            continue
        head, _, param = key.rpartition(".")
        if key in _TRANSFORMERS_TOP:
            state[_TRANSFORMERS_TOP[key]] = tensor
        else:
            state[f"{_TRANSFORMERS_TOP[head]}.{param}"] = tensor
    return state


def transformers_model(model: ESMC):
    """A real ``transformers`` EsmcForMaskedLM holding ``model``'s weights (loaded strictly)."""
    from transformers import EsmcForMaskedLM

    from helpers.models import transformers_config

    hf = EsmcForMaskedLM(transformers_config(model.config))
    hf.load_state_dict(transformers_state_dict(model), strict=True)
    return hf.eval()


def write_transformers_repo(model: ESMC, root: Path, max_shard_size: str = "300KB") -> Path:
    """``save_pretrained`` of an EsmcForMaskedLM: its true layout, sharded, hidden_size spelling."""
    transformers_model(model).save_pretrained(root, max_shard_size=max_shard_size)
    return root


# -- a Hugging Face cache holding a repo --------------------------------------------------------


def populate_hub_cache(cache: Path, repo_id: str, source: Path | None) -> Path:
    """Lay ``source``'s files out as the hub cache holds a snapshot of ``repo_id`` at main
    (an empty snapshot directory to write into when ``source`` is None)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    if source is None:
        snapshot.mkdir(parents=True)
    else:
        shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return snapshot
