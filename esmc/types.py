"""attrs classes mirroring the reference ``esm.sdk.api`` types that ESMC uses.

Field names and defaults follow the reference so that code written against it reads
the same here. Tracks other than ``sequence`` are declared (the contract names them)
but ESMC has no heads for them; asking to sample or generate them is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

TRACKS = ("sequence", "structure", "secondary_structure", "sasa", "function")
SCHEDULES = ("cosine", "linear")
STRATEGIES = ("random", "entropy")


@attrs.define
class ESMProtein:
    sequence: str | None = None
    secondary_structure: str | None = None
    sasa: list[float | None] | None = None
    function_annotations: list | None = None
    coordinates: torch.Tensor | None = None

    def __len__(self) -> int:
        if self.sequence is None:
            raise ValueError("No track to determine length from.")
        return len(self.sequence)


@attrs.define
class ESMProteinTensor:
    sequence: torch.Tensor | None = None
    structure: torch.Tensor | None = None
    secondary_structure: torch.Tensor | None = None
    sasa: torch.Tensor | None = None
    function: torch.Tensor | None = None
    residue_annotations: torch.Tensor | None = None
    coordinates: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.sequence is None else int(self.sequence.shape[-1])

    @property
    def device(self) -> torch.device:
        if self.sequence is None:
            raise ValueError("ESMProteinTensor has no sequence track")
        return self.sequence.device

    def to(self, device_or_dtype: str | torch.device | torch.dtype) -> ESMProteinTensor:
        for field in attrs.fields(ESMProteinTensor):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                setattr(self, field.name, value.to(device_or_dtype))
        return self


@attrs.define
class ForwardTrackData:
    sequence: torch.Tensor | None = None
    structure: torch.Tensor | None = None
    secondary_structure: torch.Tensor | None = None
    sasa: torch.Tensor | None = None
    function: torch.Tensor | None = None


@attrs.define
class LogitsConfig:
    """What one logits call returns. ``ith_hidden_layer``: -1 all blocks, else block i (0 = first)."""

    sequence: bool = False
    structure: bool = False
    secondary_structure: bool = False
    sasa: bool = False
    function: bool = False
    residue_annotations: bool = False
    return_embeddings: bool = False
    return_hidden_states: bool = False
    ith_hidden_layer: int = -1
    return_mean_embedding: bool = False
    return_mean_hidden_states: bool = False

    @property
    def needs_hidden_states(self) -> bool:
        return self.return_hidden_states or self.return_mean_hidden_states


@attrs.define
class LogitsOutput:
    """Per-protein outputs, shapes without a batch dimension unless batched by the caller.

    logits.sequence (L+2, 64); embeddings (L+2, d) after the final norm; hidden_states
    (layers, L+2, d) block outputs before the final norm; mean_embedding (d);
    mean_hidden_states (layers, d). Means are over residues only (BOS/EOS excluded).
    """

    logits: ForwardTrackData | None = None
    embeddings: torch.Tensor | None = None
    residue_annotation_logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    mean_embedding: torch.Tensor | None = None
    mean_hidden_states: torch.Tensor | None = None


DEFAULT_NUM_STEPS = 20
"""Generation steps when a request does not say (the reference's default); defined here only."""


@attrs.define
class GenerationConfig:
    track: str = ""
    invalid_ids: Sequence[int] = attrs.field(factory=list)
    schedule: str = attrs.field(default="cosine", validator=attrs.validators.in_(SCHEDULES))
    strategy: str = attrs.field(default="random", validator=attrs.validators.in_(STRATEGIES))
    num_steps: int = DEFAULT_NUM_STEPS
    temperature: float = 1.0
    temperature_annealing: bool = True
    top_p: float = 1.0
    condition_on_coordinates_only: bool = True
    only_compute_backbone_rmsd: bool = False

    def use_entropy_based_unmasking_strategy(self) -> None:
        self.schedule = "cosine"
        self.strategy = "entropy"
        self.temperature_annealing = False

    def use_generative_unmasking_strategy(self) -> None:
        self.schedule = "cosine"
        self.strategy = "random"
        self.temperature_annealing = True


@attrs.define
class SamplingTrackConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    only_sample_masked_tokens: bool = True
    invalid_ids: Sequence[int] = attrs.field(factory=list)
    topk_logprobs: int = 0


@attrs.define
class SamplingConfig:
    sequence: SamplingTrackConfig | None = None
    structure: SamplingTrackConfig | None = None
    secondary_structure: SamplingTrackConfig | None = None
    sasa: SamplingTrackConfig | None = None
    function: SamplingTrackConfig | None = None
    return_per_residue_embeddings: bool = False
    return_mean_embedding: bool = False


@attrs.define
class ForwardAndSampleOutput(LogitsOutput):
    protein_tensor: ESMProteinTensor = attrs.field(factory=ESMProteinTensor)
    entropy: ForwardTrackData | None = None
    prob: ForwardTrackData | None = None
    logprob: ForwardTrackData | None = None
    top_prob: ForwardTrackData | None = None
    topk_logprob: ForwardTrackData | None = None
    topk_tokens: ForwardTrackData | None = None
    per_residue_embedding: torch.Tensor | None = None
    mean_embedding: torch.Tensor | None = None


@attrs.define
class ESMProteinError(Exception):
    """A failed protein in a batch, returned in its place (the reference's ``ESMProteinError``).

    ``error_code`` follows HTTP (400 bad input, 500 the reference's generation failures).
    """

    error_code: int
    error_msg: str
