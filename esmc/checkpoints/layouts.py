"""The published ESMC checkpoint layouts and the one function that renames their keys.

- ``legacy``: the ``.pth`` of ``esm`` <= 3.3 (``data/weights/esmc_300m_2024_12_v0.pth``);
  its names are ours, no renaming;
- ``research``: the safetensors of ``biohub/ESMC-*`` (prefix ``esmc.``, TransformerEngine
  names, q/k/v and gate/up already packed, ``*_extra_state`` entries ignored);
- ``transformers``: ``EsmcForMaskedLM`` of ``transformers`` (split q/k/v and gate/up, which
  are concatenated into our packed projections).

:func:`legacy_name` is the only place that knows them; ``docs/checkpoints.md`` has the table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from esmc.checkpoints import WeightsError


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
