"""The tokenizer: reference ids for every character, strict errors, decode round trip."""

from __future__ import annotations

import pytest

from esmc.tokenizer import (
    MASK_ID,
    RESIDUES,
    TOKEN_TO_ID,
    VOCABULARY,
    TokenizationError,
    decode,
    encode,
    encode_ids,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def reference_tokenizer():
    import esm.sdk  # noqa: F401  (import order avoids the reference's circular import)
    from esm.tokenization import EsmSequenceTokenizer

    return EsmSequenceTokenizer()


@pytest.mark.parity
def test_vocabulary_equals_reference(reference_tokenizer):
    assert TOKEN_TO_ID == reference_tokenizer.get_vocab()
    assert len(VOCABULARY) == 33


@pytest.mark.parity
@pytest.mark.parametrize("char", [*RESIDUES, ".", "-", "|"])
def test_every_character_id_equals_reference(reference_tokenizer, char):
    from esm.utils.encoding import tokenize_sequence

    reference = tokenize_sequence(char, reference_tokenizer, add_special_tokens=True).tolist()
    assert encode_ids(char) == reference == [0, TOKEN_TO_ID[char], 2]


@pytest.mark.parity
def test_whole_sequence_with_masks_equals_reference(reference_tokenizer):
    from esm.utils.encoding import tokenize_sequence

    sequence = "MKT_LL<mask>" + RESIDUES + ".-|_"
    reference = tokenize_sequence(sequence, reference_tokenizer, add_special_tokens=True)
    assert encode(sequence).tolist() == reference.tolist()


def test_mask_spellings():
    assert encode_ids("_") == [0, MASK_ID, 2]
    assert encode_ids("<mask>") == [0, MASK_ID, 2]
    assert encode_ids("A_<mask>C") == [0, 5, 32, 32, 23, 2]


@pytest.mark.parametrize(
    ("sequence", "position", "char"),
    [("MkT", 1, "'k'"), ("MK T", 2, "' '"), ("MKT*", 3, "'*'"), ("a", 0, "'a'")],
)
def test_invalid_character_names_position_and_character(sequence, position, char):
    with pytest.raises(TokenizationError) as info:
        encode(sequence)
    message = str(info.value)
    assert f"position {position}" in message
    assert char in message


def test_empty_sequence_is_an_error():
    with pytest.raises(TokenizationError, match="empty"):
        encode("")


def test_overlong_sequence_is_an_error():
    encode("A" * 8, max_length=10)  # 8 residues + BOS + EOS fit
    with pytest.raises(TokenizationError) as info:
        encode("A" * 9, max_length=10)
    assert "9 residues" in str(info.value)
    assert "limit is 8" in str(info.value)


@pytest.mark.parametrize("sequence", ["M", "MKTAYIAKQRQISFVKSHFSRQ", "A_C__D", RESIDUES + ".-|"])
def test_decode_round_trip(sequence):
    assert decode(encode(sequence)) == sequence


def test_decode_writes_mask_as_underscore_and_drops_padding():
    assert decode([0, 5, 32, 6, 2, 1, 1]) == "A_G"
