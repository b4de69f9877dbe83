"""The official ``esm`` SDK's client protocol over gRPC: code written for the SDK, our server.

    from esmc_client.esm_sdk import ESMCGrpcClient

    client = ESMCGrpcClient("127.0.0.1:50051", token="...")   # instead of ESMC.from_pretrained
    tensor = client.encode(ESMProtein(sequence="MKTAYIAKQR"))
    output = client.logits(tensor, LogitsConfig(sequence=True, return_embeddings=True))
    iterative_sampling_tokens(client, inputs, configs, client.tokenizers)

Needs the ``[esm]`` extra (torch and ``esm``); nothing else in :mod:`esmc_client` imports this
module. :class:`ESMCGrpcClient` implements ``esm.sdk.api.ESMCInferenceClient`` (``encode``,
``decode``, ``logits``, async twins, ``raw_model``) and the generation methods of
``ESM3InferenceClient`` (``generate``, ``batch_generate``, ``forward_and_sample``):

- ``logits`` takes one protein tensor (L,) or a padded batch (B, L) (the SDK's
  ``_BatchedESMProteinTensor``): rows are sent as concurrent calls (the server batches them)
  and the outputs come back padded to the reference's shapes: logits (B, L, 64), embeddings
  (B, L, d), hidden states (layers, B, L, d), zeros at padding positions, float32 torch
  tensors on the input's device;
- track flags the model lacks (``structure``... which the SDK's iterative sampling sets) are
  ignored, as the reference ESMC ignores them;
- ``batch_generate`` is the reference's: ``esm.utils.generation`` iterative sampling with this
  client's ``logits`` (one batched round trip per step, sampling here, torch's global
  generator), so it gives what the official local ESMC gives. With ``server_generation=True``
  it runs on the server instead (one ``Generate`` stream per prompt, seeded per request);
- failures come back as the SDK's ``ESMProteinError`` with an HTTP-style ``error_code``
  (400 invalid, 401 token, 429 overloaded, 503 unavailable, 504 deadline), returned from
  the methods where the SDK's own Forge clients return it, so the SDK's retry and batch
  executor logic treats them the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import attr
import numpy as np
import torch

import esm.sdk  # noqa: F401  (initialises esm.sdk before the modules below: circular imports)
from esm.sdk.api import (
    ESM3InferenceClient,
    ESMCInferenceClient,
    ESMProtein,
    ESMProteinError,
    ESMProteinTensor,
    ForwardAndSampleOutput,
    ForwardTrackData,
    GenerationConfig,
    LogitsConfig,
    LogitsOutput,
)
from esm.tokenization import EsmSequenceTokenizer
from esm.utils.generation import iterative_sampling_tokens
from esmc.sdk_api import drawn_seed
from esmc_client.client import ESMCClient
from esmc_client.types import ESMCError
from esmc_proto.status import http_status

PAD_ID = 1
_LOGITS_FIELDS = ("sequence", "return_embeddings", "return_hidden_states", "ith_hidden_layer")
_MEAN_FIELDS = ("return_mean_embedding", "return_mean_hidden_states")


def sdk_tokenizers() -> SimpleNamespace:
    """The tokenizer collection ``esm.utils.generation`` needs to generate ESMC sequences.

    It reads ``sequence`` (the real ``EsmSequenceTokenizer``) and, to build an all-mask
    placeholder for the ``function`` track it stacks but never samples, ``function.depth`` and
    that track's special ids; the other tracks are absent, so they stay ``None``.
    """
    function = SimpleNamespace(
        depth=8, mask_token_id=0, bos_token_id=1, eos_token_id=2, pad_token_id=3
    )
    return SimpleNamespace(sequence=EsmSequenceTokenizer(), function=function)


def protein_error(error: ESMCError) -> ESMProteinError:
    """The SDK's error for a failed call: HTTP-style code, the server's message."""
    return ESMProteinError(error_code=http_status(error.code), error_msg=f"{error.code}: {error.message}")


def _tensor(array: np.ndarray | None, device) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.array(array)).to(device)


def _rows(tokens: torch.Tensor) -> list[list[int]]:
    """The unpadded token ids of each row of a (B, L) batch (or of one (L,) sequence)."""
    batch = tokens.reshape(1, -1) if tokens.ndim == 1 else tokens
    rows = []
    for row in batch.tolist():
        end = len(row)
        while end > 0 and row[end - 1] == PAD_ID:
            end -= 1
        rows.append(row[:end])
    return rows


def _pad_stack(tensors: list[torch.Tensor], length: int, dim: int) -> torch.Tensor:
    """Stack per-protein tensors along a new batch dim at ``dim``, zero-padded to ``length``
    along their position dim (``dim`` too, before stacking)."""
    padded = []
    for t in tensors:
        shape = list(t.shape)
        shape[dim] = length - shape[dim]
        padded.append(torch.cat([t, t.new_zeros(shape)], dim=dim))
    return torch.stack(padded, dim=dim)


class ESMCGrpcClient(ESMCInferenceClient, ESM3InferenceClient):
    """The SDK's inference client over an esmc-serve gRPC server.

    Args:
        target: ``host:port`` of the server.
        timeout: deadline of each call in seconds (None: none).
        concurrency: calls in flight at once for a batch.
        server_generation: generate on the server (seeded ``Generate`` streams) instead of the
            reference's iterative sampling here over ``logits``.
        model: the served model every call names (None: the server's default); an answer
            from another model, or from a server that ignores the name, raises.
        **client_options: passed to :class:`esmc_client.ESMCClient` (``token``, ``tls``,
            ``root_certificates``, ``retry``, ...).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        concurrency: int = 16,
        server_generation: bool = False,
        model: str | None = None,
        **client_options: Any,
    ):
        self._client = ESMCClient(target, model=model, **client_options)
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
        self.timeout = timeout
        self.server_generation = server_generation
        self.tokenizers = sdk_tokenizers()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> ESMCGrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def raw_model(self):
        raise NotImplementedError("a remote model has no local module; use the client's methods")

    # -- ESMCInferenceClient -----------------------------------------------------------------

    def encode(self, input: ESMProtein) -> ESMProteinTensor | ESMProteinError:
        if input.sequence is None:
            return ESMProteinTensor()
        try:
            ids = self._client.encode(input.sequence, timeout=self.timeout)
        except ESMCError as error:
            return protein_error(error)
        return ESMProteinTensor(sequence=torch.from_numpy(np.array(ids)))

    def decode(self, input: ESMProteinTensor) -> ESMProtein | ESMProteinError:
        """(L,) tokens, or the first row of a padded (B, L) batch as the reference decodes."""
        if input.sequence is None:
            raise ValueError("decode needs the sequence track")
        try:
            protein = self._client.decode(_rows(input.sequence)[0], timeout=self.timeout)
        except ESMCError as error:
            return protein_error(error)
        return ESMProtein(sequence=protein.sequence)

    def logits(
        self, input: ESMProteinTensor, config: LogitsConfig = LogitsConfig()
    ) -> LogitsOutput | ESMProteinError:
        """One forward per row, rows in flight together; outputs with a batch dimension."""
        if input.sequence is None:
            raise ValueError("logits needs the sequence track")
        config = _served_config(config)
        rows = _rows(input.sequence)
        futures = [
            self._pool.submit(self._client.logits, row, config, timeout=self.timeout)
            for row in rows
        ]
        try:
            outputs = [f.result() for f in futures]
        except ESMCError as error:
            for f in futures:
                f.cancel()
            return protein_error(error)
        return _batched_logits(outputs, input.sequence.shape[-1], input.sequence.device)

    async def async_encode(self, input: ESMProtein) -> ESMProteinTensor | ESMProteinError:
        return await asyncio.to_thread(self.encode, input)

    async def async_decode(self, input: ESMProteinTensor) -> ESMProtein | ESMProteinError:
        return await asyncio.to_thread(self.decode, input)

    async def async_logits(
        self, input: ESMProteinTensor, config: LogitsConfig = LogitsConfig()
    ) -> LogitsOutput | ESMProteinError:
        return await asyncio.to_thread(self.logits, input, config)

    # -- ESM3InferenceClient generation --------------------------------------------------------

    def generate(self, input: Any, config: GenerationConfig) -> Any:
        return self.batch_generate([input], [config])[0]

    def batch_generate(self, inputs: Sequence[Any], configs: Sequence[GenerationConfig]) -> list:
        """As the SDK's ``ESM3.batch_generate``: proteins or protein tensors (one type), each
        result the input's type or an ``ESMProteinError`` in its place."""
        if len(inputs) != len(configs):
            raise ValueError("Must have the same number of prompts and configs.")
        if not inputs:
            return []
        kind = type(inputs[0])
        if any(not isinstance(x, kind) for x in inputs):
            raise ValueError("Prompts must have the same type.")
        if self.server_generation:
            return self._server_generate(inputs, configs)
        if isinstance(inputs[0], ESMProtein):
            return self._generate_proteins(inputs, configs)
        if not isinstance(inputs[0], ESMProteinTensor):
            raise ValueError("Input must be an ESMProtein or ESMProteinTensor")
        try:
            return list(
                iterative_sampling_tokens(_Raising(self), list(inputs), list(configs), self.tokenizers)
            )
        except ESMProteinError as error:  # a failed forward fails every prompt of the batch
            return [error] * len(inputs)

    def _generate_proteins(self, inputs: Sequence[ESMProtein], configs: Sequence) -> list:
        """The SDK's ``iterative_sampling_raw``: encode, generate tokens, decode; a prompt
        that cannot be encoded gets its error in its place."""
        tensors = [self.encode(protein) for protein in inputs]
        valid = [i for i, t in enumerate(tensors) if isinstance(t, ESMProteinTensor)]
        generated = self.batch_generate([tensors[i] for i in valid], [configs[i] for i in valid])
        for i, tokens in zip(valid, generated):
            tensors[i] = tokens
        results = []
        for protein, config, tokens in zip(inputs, configs, tensors):
            if isinstance(tokens, ESMProteinError):
                results.append(tokens)
                continue
            result = self.decode(tokens)
            if isinstance(result, ESMProtein) and config.track not in (
                "function",
                "residue_annotations",
            ):
                result.function_annotations = protein.function_annotations
            results.append(result)
        return results

    def forward_and_sample(
        self, input: ESMProteinTensor, sampling_configuration: Any = None, seed: int | None = None
    ) -> ForwardAndSampleOutput | ESMProteinError:
        """One forward and sampling on the server; tracks other than the sequence ignored."""
        config = None
        if sampling_configuration is not None:
            config = attr.evolve(
                sampling_configuration,
                **{t: None for t in ("structure", "secondary_structure", "sasa", "function")},
            )
        try:
            out = self._client.forward_and_sample(
                _rows(input.sequence)[0], config, seed=seed, timeout=self.timeout
            )
        except ESMCError as error:
            return protein_error(error)
        device = input.sequence.device

        def track(array):
            return None if array is None else ForwardTrackData(sequence=_tensor(array, device))

        return ForwardAndSampleOutput(
            protein_tensor=attr.evolve(input, sequence=_tensor(out.protein_tensor, device)),
            entropy=track(out.entropy),
            prob=track(out.prob),
            logprob=track(out.logprob),
            top_prob=track(out.top_prob),
            topk_logprob=track(out.topk_logprob),
            topk_tokens=track(out.topk_tokens),
            per_residue_embedding=_tensor(out.per_residue_embedding, device),
            mean_embedding=_tensor(out.mean_embedding, device),
        )

    async def async_generate(self, input: Any, config: GenerationConfig) -> Any:
        return await asyncio.to_thread(self.generate, input, config)

    async def async_batch_generate(
        self, inputs: Sequence[Any], configs: Sequence[GenerationConfig]
    ) -> list:
        return await asyncio.to_thread(self.batch_generate, inputs, configs)

    async def async_forward_and_sample(
        self, input: ESMProteinTensor, sampling_configuration: Any = None
    ) -> ForwardAndSampleOutput | ESMProteinError:
        return await asyncio.to_thread(self.forward_and_sample, input, sampling_configuration)

    def _server_generate(self, inputs: Sequence[Any], configs: Sequence[GenerationConfig]) -> list:
        """One seeded ``Generate`` stream per prompt, all at once. The seeds are drawn from
        torch's global generator in prompt order, as the local ``esmc.ESMC.batch_generate``
        draws them: the same ``torch.manual_seed`` gives the same proteins on both."""

        def one(input, config, seed):
            prompt = input.sequence if isinstance(input, ESMProtein) else _rows(input.sequence)[0]
            try:
                protein = self._client.generate(prompt, config, seed, timeout=self.timeout)
            except ESMCError as error:
                return protein_error(error)
            if isinstance(input, ESMProtein):
                return attr.evolve(input, sequence=protein.sequence)
            tokens = self._client.encode(protein.sequence, timeout=self.timeout)
            return attr.evolve(input, sequence=_tensor(tokens, input.sequence.device))

        seeds = [drawn_seed() for _ in inputs]
        return list(self._pool.map(one, inputs, configs, seeds))


class _Raising:
    """The client as ``esm.utils.generation`` sees it: a failed forward raises its error."""

    def __init__(self, client: ESMCGrpcClient):
        self._client = client

    def logits(self, input: Any, config: Any) -> LogitsOutput:
        output = self._client.logits(input, config)
        if isinstance(output, ESMProteinError):
            raise output
        return output


def _served_config(config: Any) -> LogitsConfig:
    """What the server computes: the sequence logits and embeddings; track flags dropped."""
    fields = {name: getattr(config, name) for name in _LOGITS_FIELDS}
    served = SimpleNamespace(**fields)
    for name in _MEAN_FIELDS:  # later SDK versions
        setattr(served, name, bool(getattr(config, name, False)))
    return served


def _batched_logits(outputs: list, length: int, device) -> LogitsOutput:
    """Per-protein outputs stacked into the reference's batched shapes, zero padded."""

    def stacked(name: str, dim: int) -> torch.Tensor | None:
        values = [getattr(o, name) for o in outputs]
        if values[0] is None:
            return None
        return _pad_stack([_tensor(v, "cpu") for v in values], length, dim).to(device)

    sequence = [o.logits.sequence for o in outputs]
    logits = None
    if sequence[0] is not None:
        logits = _pad_stack([_tensor(v, "cpu") for v in sequence], length, 0).to(device)
    values = {
        "logits": ForwardTrackData(sequence=logits),
        "embeddings": stacked("embeddings", 0),  # (B, L, d)
        "hidden_states": stacked("hidden_states", 1),  # (layers, B, L, d)
    }
    optional = {"mean_embedding": ("mean_embedding", 0), "mean_hidden_state": ("mean_hidden_states", 1)}
    names = {f.name for f in attr.fields(LogitsOutput)}
    for field, (source, dim) in optional.items():  # later SDK versions
        if field in names and getattr(outputs[0], source) is not None:
            values[field] = torch.stack([_tensor(getattr(o, source), "cpu") for o in outputs], dim)
            values[field] = values[field].to(device)
    return LogitsOutput(**values)
