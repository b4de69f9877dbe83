"""The peers of :mod:`benchmarks.bench_peers`, each holding a model's weights in its own layout.

- :func:`official_esmc`: the official ``esm`` package's ESMC (SDPA attention);
- :func:`transformers_esmc`: ``transformers``' EsmcForMaskedLM;
- :func:`faesm_esmc`: ``faesm``'s ESMC (flash attention where ``flash_attn`` is installed,
  else SDPA); its module loads a hub tokenizer at import for one number, the pad id, which
  :func:`faesm_esmc` hands it offline;
- :func:`int8_esmc`: this project's model quantised to int8 (:mod:`esmc.quantize`, CPU only).
"""

from __future__ import annotations

import contextlib
import copy
import types

from esmc import ESMC
from esmc.tokenizer import PAD_ID
from esmc.weights import legacy_name


def official_esmc(model: ESMC):
    """The official ``esm`` ESMC (SDPA path) holding ``model``'s weights (legacy layout)."""
    import esm.sdk  # noqa: F401  (must come before esm.models.esmc: circular import)
    from esm.models.esmc import ESMC as ReferenceESMC
    from esm.tokenization import get_esmc_model_tokenizers

    c = model.config
    reference = ReferenceESMC(  # built on the CPU: its rotary buffers are not in the state dict
        d_model=c.d_model, n_heads=c.n_heads, n_layers=c.n_layers,
        tokenizer=get_esmc_model_tokenizers(), use_flash_attn=False,
    )
    reference.load_state_dict(model.state_dict(), strict=True)  # keeps the module's float32
    return reference.to(device=model.device, dtype=model.dtype).eval()


def transformers_esmc(model: ESMC):
    """``transformers`` EsmcForMaskedLM holding ``model``'s weights (strict load).

    Each transformers key takes its slice of our tensor through the project's loader rules
    (:func:`esmc.weights.legacy_name` gives our name, and the part of a packed tensor).
    """
    from transformers import EsmcConfig, EsmcForMaskedLM

    c = model.config
    config = EsmcConfig(
        hidden_size=c.d_model, num_attention_heads=c.n_heads, num_hidden_layers=c.n_layers,
        intermediate_size=c.ffn_hidden,
    )
    hf = EsmcForMaskedLM(config)  # on the CPU: its rotary buffers are not in the state dict
    ours = model.state_dict()
    state = {}
    for key in hf.state_dict():
        mapped = legacy_name(key, "transformers")
        if mapped is None:
            continue
        name, part, parts = mapped
        state[key] = ours[name].chunk(parts)[part]
    hf.load_state_dict(state, strict=True)  # keeps the module's float32
    return hf.to(device=model.device, dtype=model.dtype).eval()


def faesm_esmc(model: ESMC):
    """``faesm``'s ESMC holding ``model``'s weights (legacy layout, strict load)."""
    with _offline_pad_tokenizer():
        from faesm.esmc import ESMC as FaesmESMC
        from faesm.esmc import flash_attn_installed

    c = model.config
    peer = FaesmESMC(
        d_model=c.d_model, n_heads=c.n_heads, n_layers=c.n_layers,
        tokenizer=types.SimpleNamespace(pad_token_id=PAD_ID),
        use_flash_attn=flash_attn_installed and model.device.type == "cuda",
    )
    peer.load_state_dict(model.state_dict(), strict=True)  # keeps the module's float32
    return peer.to(device=model.device, dtype=model.dtype).eval()


@contextlib.contextmanager
def _offline_pad_tokenizer():
    """While ``faesm.esmc`` is first imported, ``AutoTokenizer.from_pretrained`` answers with
    the one thing faesm's ESMC reads from it, ``pad_token_id`` (1, ESM's and ESMC's pad),
    instead of downloading ``facebook/esm2_t33_650M_UR50D``: what a user without network
    does. Restored afterwards."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.__dict__["from_pretrained"]
    AutoTokenizer.from_pretrained = staticmethod(
        lambda *args, **kwargs: types.SimpleNamespace(pad_token_id=PAD_ID)
    )
    try:
        yield
    finally:
        AutoTokenizer.from_pretrained = original


def int8_esmc(model: ESMC) -> ESMC:
    """A copy of ``model`` (float32, CPU) with int8 block projections (:mod:`esmc.quantize`)."""
    from esmc.quantize import quantize_int8

    return quantize_int8(copy.deepcopy(model))
