"""Zero-shot variant-effect and likelihood scores: a plan of masked copies, then a reduce.

Every score is a log-ratio of the model's probabilities. Log-probabilities are ``log_softmax``
over the full 64-wide logits row of a position (as the ESM variant-prediction script does), or,
with ``normalization="amino-acids"``, over the 20 amino-acid logits only.

- ``wt-marginals``: one forward on the unmasked wild type; a variant scores
  ``sum_i log p(mt_i | wt) - log p(wt_i | wt)``.
- ``masked-marginals`` (ESM-1v): one forward per position some variant touches, with only that
  position masked; a variant scores ``sum_i log p(mt_i | wt, i masked) - log p(wt_i | wt, i
  masked)`` (ProteinGym's convention for multi-mutants). ``joint_masking`` masks all positions
  of a multi-substitution variant together in one forward instead.
- ``pseudo-likelihood``: ``PLL(s) = sum_i log p(s_i | s, i masked)`` (L forwards per
  sequence); a variant scores ``PLL(mutant) - PLL(wild type)``.

Variants are written as ProteinGym does: ``A23P``, 1-based positions over the residues,
substitutions joined by ``:`` (``A23P:D45N``). ``offset`` is subtracted from every position
(``offset=-1`` reads 0-based positions; ``offset=100`` when the wild type is a fragment whose
first residue is number 101 in the variants' numbering).

The work is split so that it can run anywhere: :func:`plan_scores` lists the masked copies
(token sequences) the scores need, each once; :meth:`ScoringPlan.read` turns one copy's logits
into the few log-probability rows the reduce needs; :meth:`ScoringPlan.reduce` computes the
scores from those rows. :func:`run_plan` runs a plan in-process, packing copies into batched
forwards; the server submits the same copies to its batcher.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Sequence

import torch

from esmc.inference import run_logits
from esmc.tokenizer import MASK_ID, TOKEN_TO_ID, encode_ids
from esmc.types import LogitsConfig

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
"""Column order of the site-saturation map (and the letters a substitution may introduce)."""
AMINO_ACID_IDS = torch.tensor([TOKEN_TO_ID[a] for a in AMINO_ACIDS])
METHODS = ("wt-marginals", "masked-marginals", "pseudo-likelihood")
NORMALIZATIONS = ("full", "amino-acids")
DEFAULT_BATCH_TOKENS = 4096

_SUBSTITUTION = re.compile(r"([^\d\s])(-?\d+)([^\d\s])")


class VariantError(ValueError):
    """A variant that cannot be scored; the message starts with the variant's text."""

    def __init__(self, variant: str, problem: str):
        super().__init__(f"variant {variant!r}: {problem}")
        self.variant = variant


class PlanTooLarge(ValueError):
    """A plan would need more masked copies than allowed."""

    def __init__(self, copies: int, limit: int, variants: int, method: str):
        super().__init__(
            f"{variants} variant(s) by {method} need {copies} masked copies (one sequence "
            f"forward each); the limit is {limit} per request"
        )
        self.copies = copies
        self.limit = limit


@dataclasses.dataclass(frozen=True)
class Substitution:
    wild_type: str  # one letter
    index: int  # 0-based residue index in the wild type
    mutant: str  # one of AMINO_ACIDS


@dataclasses.dataclass(frozen=True)
class Variant:
    text: str
    substitutions: tuple[Substitution, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(sorted(s.index for s in self.substitutions))

    def apply(self, sequence: str) -> str:
        residues = list(sequence)
        for s in self.substitutions:
            residues[s.index] = s.mutant
        return "".join(residues)


def parse_variant(text: str, wild_type: str, offset: int = 0) -> Variant:
    """``A23P`` or ``A23P:D45N`` against ``wild_type``; raises :class:`VariantError`."""
    parts = text.strip().split(":")
    subs: list[Substitution] = []
    seen: set[int] = set()  # indices substituted so far: the repeat check is O(1)
    for part in parts:
        match = _SUBSTITUTION.fullmatch(part.strip())
        if match is None:
            raise VariantError(
                text, f"cannot parse {part.strip()!r}; expected e.g. A23P, or A23P:D45N"
            )
        wt, position, mt = match.group(1), int(match.group(2)), match.group(3)
        index = position - offset - 1
        if not 0 <= index < len(wild_type):
            raise VariantError(
                text,
                f"position {position} is out of range: the wild type has {len(wild_type)} "
                f"residues, numbered {offset + 1}..{offset + len(wild_type)}",
            )
        if wild_type[index] != wt:
            raise VariantError(
                text,
                f"wild-type letter {wt} at position {position} does not match the sequence, "
                f"which has {wild_type[index]} there",
            )
        if mt not in AMINO_ACIDS:
            raise VariantError(
                text, f"{mt!r} is not an amino acid; a substitution introduces one of {AMINO_ACIDS}"
            )
        if index in seen:
            raise VariantError(text, f"position {position} is substituted twice")
        seen.add(index)
        subs.append(Substitution(wt, index, mt))
    return Variant(text, tuple(subs))


def parse_variants(texts: Iterable[str], wild_type: str, offset: int = 0) -> list[Variant]:
    return [parse_variant(t, wild_type, offset) for t in texts]


def all_single_substitutions(wild_type: str, offset: int = 0) -> list[str]:
    """The 19 x L single-substitution variants of the site-saturation map, position-major."""
    return [
        f"{wt}{i + 1 + offset}{aa}"
        for i, wt in enumerate(wild_type)
        for aa in AMINO_ACIDS
        if aa != wt
    ]


# -- plan ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskedCopy:
    """One sequence forward: which sequence, which residues masked, which rows the reduce reads."""

    sequence: int  # index into ScoringPlan.sequences (0: the wild type)
    masked: tuple[int, ...]  # 0-based residue indices replaced by <mask>
    reads: tuple[int, ...]  # 0-based residue indices whose log-probabilities are kept


@dataclasses.dataclass(frozen=True)
class ScoringResult:
    scores: torch.Tensor  # (variants,) float32, in input order
    saturation_map: torch.Tensor | None  # (L, 20) float32, columns AMINO_ACIDS
    position_log_probs: torch.Tensor | None  # (L,) log p(wt_i | wt, i masked), pseudo-likelihood
    pseudo_log_likelihood: float | None  # of the wild type
    pseudo_perplexity: float | None  # exp(-PLL / L)


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """The masked copies a set of scores needs (each once) and how to reduce their outputs."""

    method: str
    normalization: str
    sequences: tuple[str, ...]  # wild type first; pseudo-likelihood adds each distinct mutant
    variants: tuple[Variant, ...]
    copies: tuple[MaskedCopy, ...]
    saturation_map: bool
    joint_masking: bool
    _rows: dict = dataclasses.field(repr=False, compare=False)  # (seq, masked, i) -> (copy, row)

    @property
    def wild_type(self) -> str:
        return self.sequences[0]

    @property
    def total_tokens(self) -> int:
        return sum(len(self.sequences[c.sequence]) + 2 for c in self.copies)

    def tokens(self, k: int) -> torch.Tensor:
        """Copy ``k`` as ``<cls> ids... <eos>`` with its masked residues set to ``<mask>``."""
        copy = self.copies[k]
        ids = encode_ids(self.sequences[copy.sequence])
        for i in copy.masked:
            ids[i + 1] = MASK_ID
        return torch.tensor(ids, dtype=torch.long)

    def read(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """Copy ``k``'s logits (L+2, 64) -> the log-probability rows it contributes (reads, 64)."""
        rows = torch.tensor(self.copies[k].reads, dtype=torch.long) + 1  # skip BOS
        return log_probs(logits[rows].float(), self.normalization)

    def reduce(self, reads: Sequence[torch.Tensor]) -> ScoringResult:
        """The scores from every copy's :meth:`read` output, in the order of ``copies``."""
        if len(reads) != len(self.copies):
            raise ValueError(f"{len(reads)} read outputs for {len(self.copies)} copies")

        def lp(seq: int, masked: tuple[int, ...], i: int) -> torch.Tensor:  # (64,)
            k, row = self._rows[(seq, masked, i)]
            return reads[k][row]

        wt = self.wild_type
        context = self._context
        scores = torch.zeros(len(self.variants), dtype=torch.float64)
        if self.method == "pseudo-likelihood":
            plls = [self._pll(lp, s)[0] for s in range(len(self.sequences))]
            mutant = {seq: s for s, seq in enumerate(self.sequences)}
            of_mutations: dict[tuple, int] = {}  # each distinct mutant applied once
            for v, variant in enumerate(self.variants):
                key = _mutations(variant)
                if key not in of_mutations:
                    of_mutations[key] = mutant[variant.apply(wt)]
                scores[v] = plls[of_mutations[key]] - plls[0]
        else:
            for v, variant in enumerate(self.variants):
                masked_all = variant.positions
                for s in variant.substitutions:
                    row = lp(0, context(s.index, masked_all), s.index)
                    scores[v] += row[TOKEN_TO_ID[s.mutant]].double() - row[TOKEN_TO_ID[s.wild_type]]
        table = None
        if self.saturation_map:
            rows = torch.stack([lp(0, context(i, (i,)), i) for i in range(len(wt))])  # (L, 64)
            wt_ids = torch.tensor([TOKEN_TO_ID[a] for a in wt])
            table = rows[:, AMINO_ACID_IDS] - rows.gather(1, wt_ids[:, None])  # (L, 20)
        position_lp, pll, ppl = None, None, None
        if self.method == "pseudo-likelihood":
            pll, position_lp = self._pll(lp, 0)
            ppl = math.exp(-pll / len(wt))
        return ScoringResult(scores.float(), table, position_lp, pll, ppl)

    def _context(self, i: int, positions: tuple[int, ...]) -> tuple[int, ...]:
        """The residues masked in the copy that scores residue ``i`` of a variant at
        ``positions``."""
        if self.method == "wt-marginals":
            return ()
        if self.joint_masking and len(positions) > 1:
            return positions
        return (i,)

    def _pll(self, lp: Callable, s: int) -> tuple[float, torch.Tensor]:
        sequence = self.sequences[s]
        values = torch.stack(
            [lp(s, (i,), i)[TOKEN_TO_ID[a]] for i, a in enumerate(sequence)]
        )  # (L,)
        return float(values.double().sum()), values


def log_probs(logits: torch.Tensor, normalization: str = "full") -> torch.Tensor:
    """log_softmax over the 64-wide rows; ``amino-acids``: over the 20 amino acids only
    (every other entry -inf)."""
    logits = logits.float()
    if normalization == "full":
        return torch.log_softmax(logits, dim=-1)
    out = torch.full_like(logits, -math.inf)
    ids = AMINO_ACID_IDS.to(logits.device)
    out[..., ids] = torch.log_softmax(logits[..., ids], dim=-1)
    return out


def plan_scores(
    wild_type: str,
    variants: Sequence[str | Variant],
    method: str = "masked-marginals",
    *,
    offset: int = 0,
    joint_masking: bool = False,
    normalization: str = "full",
    saturation_map: bool = False,
    max_copies: int | None = None,
) -> ScoringPlan:
    """The masked copies that score ``variants`` (and the map, if asked) by ``method``.

    Positions no variant touches cost nothing (unless the map is asked for). Raises
    :class:`VariantError` for a bad variant, :class:`PlanTooLarge` past ``max_copies`` (checked
    before the copies are built) and ``ValueError`` for a bad wild type or option.
    """
    _check_options(method, normalization, wild_type)
    parsed = tuple(
        v if isinstance(v, Variant) else parse_variant(v, wild_type, offset) for v in variants
    )
    L = len(wild_type)
    sequences = [wild_type]
    wanted: dict[tuple[int, tuple[int, ...]], set[int]] = {}  # (seq, masked) -> reads

    def need(seq: int, masked: tuple[int, ...], reads: Iterable[int]) -> None:
        wanted.setdefault((seq, masked), set()).update(reads)

    if method == "wt-marginals":
        touched = range(L) if saturation_map else {s.index for v in parsed for s in v.substitutions}
        need(0, (), touched)
    elif method == "masked-marginals":
        for v in parsed:
            if joint_masking and len(v.substitutions) > 1:
                need(0, v.positions, v.positions)
            else:
                for i in v.positions:
                    need(0, (i,), (i,))
        for i in range(L) if saturation_map else ():
            need(0, (i,), (i,))
    else:  # pseudo-likelihood: every position of the wild type and of each distinct mutant
        distinct = {_mutations(v) for v in parsed} - {()}
        _check_size((len(distinct) + 1) * L, max_copies, len(parsed), method)
        index = {wild_type: 0}
        applied: set[tuple] = set()  # each distinct mutant applied once (O(L) each)
        for v in parsed:
            key = _mutations(v)
            if key not in applied:
                applied.add(key)
                index.setdefault(v.apply(wild_type), len(index))
        sequences = list(index)
        for s in range(len(sequences)):
            for i in range(L):
                need(s, (i,), (i,))
    _check_size(len(wanted), max_copies, len(parsed), method)
    copies = tuple(MaskedCopy(s, masked, tuple(sorted(r))) for (s, masked), r in wanted.items())
    rows = {
        (c.sequence, c.masked, i): (k, row)
        for k, c in enumerate(copies)
        for row, i in enumerate(c.reads)
    }
    return ScoringPlan(
        method,
        normalization,
        tuple(sequences),
        parsed,
        copies,
        saturation_map,
        joint_masking and method == "masked-marginals",
        rows,
    )


def _mutations(variant: Variant) -> tuple[tuple[int, str], ...]:
    """What a variant changes (synonymous substitutions dropped): equal for equal mutants."""
    changed = (s for s in variant.substitutions if s.mutant != s.wild_type)
    return tuple(sorted((s.index, s.mutant) for s in changed))


def _check_size(copies: int, limit: int | None, variants: int, method: str) -> None:
    if limit is not None and copies > limit:
        raise PlanTooLarge(copies, limit, variants, method)


def plan_pseudo_log_likelihood(
    sequence: str, normalization: str = "full", max_copies: int | None = None
) -> ScoringPlan:
    """L copies, one per masked position; the reduce gives the PLL and per-position terms."""
    return plan_scores(
        sequence, [], "pseudo-likelihood", normalization=normalization, max_copies=max_copies
    )


def _check_options(method: str, normalization: str, wild_type: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}"
        )
    if not isinstance(wild_type, str) or not wild_type:
        raise ValueError("the wild type must be a non-empty sequence")
    ids = encode_ids(wild_type)  # raises TokenizationError (a ValueError) naming the character
    if len(ids) != len(wild_type) + 2 or MASK_ID in ids:
        raise ValueError("the wild type must be plain residues, without masks")
    if normalization == "amino-acids":
        for i, a in enumerate(wild_type):
            if a not in AMINO_ACIDS:
                raise ValueError(
                    f"renormalising over the 20 amino acids needs a wild type made of them; "
                    f"residue {i + 1} is {a}"
                )


# -- running a plan in-process ----------------------------------------------------------------


def run_plan(model, plan: ScoringPlan, *, max_batch_tokens: int = DEFAULT_BATCH_TOKENS):
    """Forward every copy of ``plan`` on ``model``, packed into batches of at most
    ``max_batch_tokens`` tokens (a copy longer than that rides alone), and reduce."""
    config = LogitsConfig(sequence=True)
    reads: list[torch.Tensor] = []
    for batch in pack_copies(plan, max_batch_tokens):
        tokens = [plan.tokens(k) for k in batch]
        outputs = run_logits(model, tokens, [config] * len(tokens))
        reads.extend(plan.read(k, out.logits.sequence) for k, out in zip(batch, outputs))
    return plan.reduce(reads)


def pack_copies(plan: ScoringPlan, max_batch_tokens: int) -> list[list[int]]:
    """Copy indices in plan order, cut into forwards of at most ``max_batch_tokens`` tokens."""
    batches: list[list[int]] = [[]]
    used = 0
    for k, copy in enumerate(plan.copies):
        n = len(plan.sequences[copy.sequence]) + 2
        if batches[-1] and used + n > max_batch_tokens:
            batches.append([])
            used = 0
        batches[-1].append(k)
        used += n
    return [b for b in batches if b]


def score_variants(
    model,
    wild_type: str,
    variants: Sequence[str],
    method: str = "masked-marginals",
    *,
    offset: int = 0,
    joint_masking: bool = False,
    normalization: str = "full",
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> torch.Tensor:
    """One score per variant (float32, input order) on ``model`` in this process."""
    plan = plan_scores(
        wild_type,
        variants,
        method,
        offset=offset,
        joint_masking=joint_masking,
        normalization=normalization,
    )
    return run_plan(model, plan, max_batch_tokens=max_batch_tokens).scores


def saturation_map(
    model,
    wild_type: str,
    method: str = "masked-marginals",
    *,
    normalization: str = "full",
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> torch.Tensor:
    """(L, 20) ``log p(aa | context) - log p(wt | context)``, columns :data:`AMINO_ACIDS`.

    The context is the unmasked wild type for ``wt-marginals``, the wild type with that
    position masked otherwise (pseudo-likelihood's per-position term).
    """
    plan = plan_scores(
        wild_type, [], method, normalization=normalization, saturation_map=True
    )
    return run_plan(model, plan, max_batch_tokens=max_batch_tokens).saturation_map


def pseudo_log_likelihood(
    model,
    sequence: str,
    *,
    normalization: str = "full",
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> ScoringResult:
    """PLL, pseudo-perplexity and per-position log-probabilities of ``sequence``."""
    plan = plan_pseudo_log_likelihood(sequence, normalization)
    return run_plan(model, plan, max_batch_tokens=max_batch_tokens)
