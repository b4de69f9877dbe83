"""The class users load: :class:`ESMC`, the network (:mod:`esmc.model`) with its weights,
the reference's ``logits`` call and the official ``esm`` SDK's client methods.

Code written against ``esm.models.esmc.ESMC`` (and the generation methods of the SDK's
``ESM3InferenceClient``) runs with only the import changed; :mod:`esmc.sdk_api` says how
inputs of either family are taken and answered in kind, and where this class differs from
the reference on purpose.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import torch

from esmc import tokenizer
from esmc.batch import TokenBatch, masked_mean
from esmc.checkpoints.load import load_checkpoint
from esmc.generation import GenerationState, batch_generate, forward_and_sample
from esmc.inference import autocast_for, hidden_layer_indices
from esmc.model import ESMCNetwork
from esmc.sampling import NoMasksError
from esmc.sdk_api import (
    ERROR_BAD_REQUEST,
    ERROR_NO_MASKS,
    as_generation_config,
    as_logits_config,
    as_sampling_config,
    drawn_seed,
    family_of,
    library_input,
    like_input,
    mirror,
    protein_error,
    sequence_tokens,
)
from esmc.types import ESMProteinTensor, ForwardTrackData, LogitsConfig, LogitsOutput


class ESMC(ESMCNetwork):
    """ESM Cambrian as users load it: ``ESMC.from_pretrained("esmc-300m")``, then ``logits``,
    ``encode``/``decode``, ``generate``... ``state_dict()`` matches the reference's legacy
    layout key for key (it is :class:`esmc.model.ESMCNetwork`'s)."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "esmc-tiny",
        device: str | torch.device | None = None,
        **kwargs,
    ) -> ESMC:
        """Load weights by registry name (official names such as ``esmc_300m`` too), Hugging
        Face repo id, or local file/directory.

        See :func:`esmc.checkpoints.load.load_checkpoint` for the arguments and layouts.
        """
        return load_checkpoint(cls, name_or_path, device, **kwargs)

    @property
    def raw_model(self) -> ESMC:
        return self

    @torch.no_grad()
    def logits(
        self, input: ESMProteinTensor | torch.Tensor, config: LogitsConfig | None = None
    ) -> LogitsOutput:
        """The reference's ``logits`` call: one padded forward over ``input.sequence``.

        ``input.sequence`` (or ``input`` itself, a tensor): (L,) token ids (a batch dimension is
        added) or a padded (B, L) batch. ``input`` and ``config`` may also be the official
        ``esm.sdk.api`` types (see :mod:`esmc.sdk_api`).
        Outputs keep the batch dimension as the reference's do: logits (B, L, 64), embeddings
        (B, L, d), hidden states (layers, B, L, d) in the model's compute dtype (bf16 autocast on
        CUDA). Means are over residues only (BOS, EOS and padding excluded), float32:
        mean_embedding (B, d), mean_hidden_states (layers, B, d).
        """
        config = as_logits_config(config)
        tokens = sequence_tokens(input).to(self.device)
        tokens = tokens.unsqueeze(0) if tokens.ndim == 1 else tokens  # (B, L)
        layers = hidden_layer_indices(config, self.config.n_layers)
        batch = TokenBatch.from_padded(tokens)
        with autocast_for(self):
            out = batch.forward(self, layers, return_logits=config.sequence)
        residues = batch.residue_mask()  # (B, L)
        return LogitsOutput(
            logits=ForwardTrackData(sequence=out.sequence_logits if config.sequence else None),
            embeddings=out.embeddings if config.return_embeddings else None,
            hidden_states=out.hidden_states if config.return_hidden_states else None,
            mean_embedding=(
                masked_mean(out.embeddings, residues) if config.return_mean_embedding else None
            ),
            mean_hidden_states=(
                masked_mean(out.hidden_states, residues)
                if config.return_mean_hidden_states
                else None
            ),
        )

    # -- the esm SDK's methods ------------------------------------------------------------------

    def encode(self, input: Any) -> Any:
        """``ESMProtein`` -> ``ESMProteinTensor`` (``<cls> ids... <eos>``) on the model's device."""
        family = family_of(input)
        if input.sequence is None:
            return family.ESMProteinTensor()
        tokens = tokenizer.encode(input.sequence).to(self.device)
        return family.ESMProteinTensor(sequence=tokens)

    def decode(self, input: Any) -> Any:
        """``ESMProteinTensor`` -> ``ESMProtein``; (L,) or (B, L) tokens (the first row)."""
        tokens = sequence_tokens(input)
        tokens = tokens[0] if tokens.ndim == 2 else tokens
        return family_of(input).ESMProtein(sequence=tokenizer.decode(tokens.cpu()))

    def generate(self, input: Any, config: Any, seed: int | None = None) -> Any:
        """Fill the masks of ``input`` (protein or protein tensor): the same type back, or
        an ``ESMProteinError`` (returned, as the reference returns it)."""
        return self.batch_generate([input], [config], [seed])[0]

    def batch_generate(
        self,
        inputs: Sequence[Any],
        configs: Sequence[Any],
        seeds: Sequence[int | None] | None = None,
    ) -> list[Any]:
        """Generate every prompt (continuous batching over packed forwards).

        A prompt that cannot be generated (no mask, invalid tokens or config) gets an
        ``ESMProteinError`` in its place, as the reference's iterative sampling does.
        """
        if len(inputs) != len(configs):
            raise ValueError("Must have the same number of prompts and configs.")
        if seeds is not None and len(seeds) != len(inputs):
            raise ValueError("Must have the same number of prompts and seeds.")
        if not inputs:
            return []
        if any(type(x) is not type(inputs[0]) for x in inputs):
            raise ValueError("Prompts must have the same type.")
        seeds = [None] * len(inputs) if seeds is None else seeds
        results: list[Any] = [None] * len(inputs)
        jobs = []
        for i, (input, config, seed) in enumerate(zip(inputs, configs, seeds)):
            family = family_of(input)
            try:
                job = (library_input(input), as_generation_config(config))
                job += (drawn_seed() if seed is None else seed,)
                GenerationState(*job)  # validates; raises before any forward
            except ValueError as error:
                code = ERROR_NO_MASKS if isinstance(error, NoMasksError) else ERROR_BAD_REQUEST
                results[i] = protein_error(family, code, str(error))
                continue
            jobs.append((i, job))
        if jobs:
            prompts, job_configs, job_seeds = zip(*(job for _, job in jobs))
            outputs = batch_generate(self, prompts, job_configs, job_seeds)
            for (i, _), output in zip(jobs, outputs):
                results[i] = like_input(inputs[i], output.sequence)
        return results

    def forward_and_sample(
        self, input: Any, sampling_configuration: Any = None, seed: int | None = None
    ) -> Any:
        """One forward, then sampling of the sequence track; per-protein shapes (L+2, ...)."""
        config = as_sampling_config(sampling_configuration)
        seed = drawn_seed() if seed is None else seed
        tokens = sequence_tokens(input)
        output = forward_and_sample(self, tokens.detach().to("cpu"), config, seed)
        result = mirror(output, input)
        if not isinstance(input, torch.Tensor):
            result.protein_tensor = like_input(input, output.protein_tensor.sequence)
        return result

    # -- async twins (the work runs in a thread; the model is not thread-safe to share) --

    async def async_encode(self, input: Any) -> Any:
        return await asyncio.to_thread(self.encode, input)

    async def async_decode(self, input: Any) -> Any:
        return await asyncio.to_thread(self.decode, input)

    async def async_logits(self, input: Any, config: Any = None) -> Any:
        return await asyncio.to_thread(self.logits, input, config)

    async def async_generate(self, input: Any, config: Any) -> Any:
        return await asyncio.to_thread(self.generate, input, config)

    async def async_batch_generate(self, inputs: Sequence[Any], configs: Sequence[Any]) -> list:
        return await asyncio.to_thread(self.batch_generate, inputs, configs)

    async def async_forward_and_sample(self, input: Any, sampling_configuration: Any = None):
        return await asyncio.to_thread(self.forward_and_sample, input, sampling_configuration)
