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
_LITERAL = re.compile(r"<mask>|<unk>")


class TokenizationError(ValueError):
    """A sequence that cannot be encoded; the message names the problem."""


def encode(sequence: str, *, max_length: int | None = None) -> torch.Tensor:
    """Encode ``sequence`` as ``<cls> ids... <eos>`` (int64, length ``len + 2``).

    ``_`` and the literal ``<mask>`` become the mask id. ``max_length`` bounds the
    number of tokens including BOS and EOS.
    """
    return torch.tensor(encode_ids(sequence, max_length=max_length), dtype=torch.long)


def encode_ids(sequence: str, *, max_length: int | None = None) -> list[int]:
    """Like :func:`encode`, as a plain list of ints.

    The length is checked first, from the string's size, before any character is read; the
    literals ``<mask>`` and ``<unk>`` (what :func:`decode` writes for id 3) are one residue each.
    """
    if not isinstance(sequence, str):
        raise TokenizationError(f"sequence must be a string, got {type(sequence).__name__}")
    if max_length is not None and len(sequence) > max_length - 2:
        residues = len(sequence)
        if "<" in sequence:
            residues -= 5 * sequence.count("<mask>") + 4 * sequence.count("<unk>")
        check_residue_count(residues, max_length)
    ids = [BOS_ID]
    pos = 0
    residue = 0
    while pos < len(sequence):
        literal = _LITERAL.match(sequence, pos) if sequence[pos] == "<" else None
        if literal is not None:
            ids.append(TOKEN_TO_ID[literal.group()])
            pos = literal.end()
        else:
            char = sequence[pos]
            token_id = _CHAR_TO_ID.get(char)
            if token_id is None:
                raise TokenizationError(_invalid_character(char, pos, residue))
            ids.append(token_id)
            pos += 1
        residue += 1
    if residue == 0:
        raise TokenizationError("sequence is empty")
    ids.append(EOS_ID)
    return ids


def check_residue_count(residues: int, max_length: int) -> None:
    """Raise unless ``residues`` (BOS/EOS not counted) fit ``max_length`` tokens."""
    if residues > max_length - 2:
        raise TokenizationError(
            f"sequence has {residues} residues; the limit is {max_length - 2} "
            f"({max_length} tokens including BOS and EOS)"
        )


def check_token_count(count: int, max_length: int) -> None:
    """Raise unless ``count`` token ids (BOS/EOS included) fit ``max_length``."""
    if count > max_length:
        raise TokenizationError(
            f"token sequence has {count} ids; the limit is {max_length} including BOS and EOS"
        )


def _invalid_character(char: str, pos: int, residue: int) -> str:
    where = f"{char!r} at position {pos} (residue {residue})"
    if char.upper() in _CHAR_TO_ID and char.upper() != char:
        return (
            f"lowercase character {where}: sequences are upper-case; upper-case them first "
            "(sequence.upper(), or the esmc CLI's --uppercase)"
        )
    return (
        f"invalid character {where}; allowed: {RESIDUES} . - | and _ or <mask> for a mask, "
        "<unk> for an unknown residue"
    )


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
    """Check a token sequence supplied by a caller: BOS ... EOS, ids in the vocabulary.

    The length is checked first, before any id is read.
    """
    if max_length is not None:
        check_token_count(len(ids), max_length)
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
