"""The ESMC sequence vocabulary: 33 ids in a 64-row table, strict about its input.

The reference maps unknown characters silently to ``<unk>``; this tokenizer raises
:class:`TokenizationError` naming the position and character instead.
"""

from __future__ import annotations

import re

import torch

SPECIAL_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>")
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"
VOCABULARY: tuple[str, ...] = (*SPECIAL_TOKENS, *RESIDUES, ".", "-", "|", "<mask>")

BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
CHAIN_BREAK_ID = 31
MASK_ID = 32
VOCAB_SIZE = len(VOCABULARY)  # 33 ids produced by the tokenizer
EMBED_ROWS = 64  # embedding table rows and logits per position
SPECIAL_IDS: tuple[int, ...] = (BOS_ID, PAD_ID, EOS_ID, UNK_ID, CHAIN_BREAK_ID, MASK_ID)
"""Ids never sampled during generation."""

TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCABULARY)}
_CHAR_TO_ID: dict[str, int] = {tok: i for tok, i in TOKEN_TO_ID.items() if len(tok) == 1}
_CHAR_TO_ID["_"] = MASK_ID
_MASK_LITERAL = re.compile(r"<mask>")


class TokenizationError(ValueError):
    """A sequence that cannot be encoded; the message names the problem."""


def encode(sequence: str, *, max_length: int | None = None) -> torch.Tensor:
    """Encode ``sequence`` as ``<cls> ids... <eos>`` (int64, length ``len + 2``).

    ``_`` and the literal ``<mask>`` become the mask id. ``max_length`` bounds the
    number of tokens including BOS and EOS.
    """
    return torch.tensor(encode_ids(sequence, max_length=max_length), dtype=torch.long)


def encode_ids(sequence: str, *, max_length: int | None = None) -> list[int]:
    """Like :func:`encode`, as a plain list of ints."""
    if not isinstance(sequence, str):
        raise TokenizationError(f"sequence must be a string, got {type(sequence).__name__}")
    ids = [BOS_ID]
    pos = 0
    residue = 0
    while pos < len(sequence):
        if sequence.startswith("<mask>", pos):
            ids.append(MASK_ID)
            pos += len("<mask>")
        else:
            char = sequence[pos]
            token_id = _CHAR_TO_ID.get(char)
            if token_id is None:
                raise TokenizationError(
                    f"invalid character {char!r} at position {pos} (residue {residue}); "
                    f"allowed: {RESIDUES} . - | and _ or <mask> for a mask"
                )
            ids.append(token_id)
            pos += 1
        residue += 1
    if residue == 0:
        raise TokenizationError("sequence is empty")
    ids.append(EOS_ID)
    if max_length is not None and len(ids) > max_length:
        raise TokenizationError(
            f"sequence has {len(ids) - 2} residues; the limit is {max_length - 2} "
            f"({max_length} tokens including BOS and EOS)"
        )
    return ids


def decode(ids: torch.Tensor | list[int]) -> str:
    """Decode token ids to a sequence: BOS/EOS/padding dropped, mask written as ``_``."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if values and values[0] == BOS_ID:
        values = values[1:]
    while values and values[-1] == PAD_ID:
        values.pop()
    if values and values[-1] == EOS_ID:
        values = values[:-1]
    out = []
    for i, token_id in enumerate(values):
        if not 0 <= token_id < VOCAB_SIZE or token_id in (BOS_ID, PAD_ID, EOS_ID):
            raise TokenizationError(f"token id {token_id} at position {i} is not a residue id")
        out.append("_" if token_id == MASK_ID else VOCABULARY[token_id])
    return "".join(out)


def validate_ids(ids: list[int] | torch.Tensor, *, max_length: int | None = None) -> None:
    """Check a token sequence supplied by a caller: BOS ... EOS, ids in the vocabulary."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if len(values) < 3:
        raise TokenizationError(
            f"token sequence has {len(values)} ids; it needs <cls>, at least one residue and <eos>"
        )
    if values[0] != BOS_ID or values[-1] != EOS_ID:
        raise TokenizationError(
            f"token sequence must start with <cls> ({BOS_ID}) and end with <eos> ({EOS_ID}); "
            f"got {values[0]} ... {values[-1]}"
        )
    for i, token_id in enumerate(values[1:-1], start=1):
        if not 0 <= token_id < VOCAB_SIZE or token_id in (BOS_ID, PAD_ID, EOS_ID):
            raise TokenizationError(
                f"token id {token_id} at position {i} is not a residue or mask id "
                f"(valid: 3..{VOCAB_SIZE - 1})"
            )
    if max_length is not None and len(values) > max_length:
        raise TokenizationError(
            f"token sequence has {len(values)} ids; the limit is {max_length} including BOS and EOS"
        )
