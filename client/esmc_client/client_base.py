"""What the blocking and the asyncio client share: the constructor (target, retries, TLS,
token, channel options), per-call settings, the TLS-mismatch check and small helpers.

:class:`~esmc_client.client.ESMCClient` and :class:`~esmc_client.aio.AsyncESMCClient` each
add their own channel and calls on top of :class:`ClientBase`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from esmc_client import requests as rq
from esmc_client.bulk import make_chunks
from esmc_client.channel import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, channel_options
from esmc_client.requests import ProteinLike
from esmc_client.retry import CallRetries, RetryBudget, RetryPolicy
from esmc_client.security import TransportCheck, auth_metadata, read_pem, tls_credentials
from esmc_client.tracing import trace_metadata
from esmc_client.types import ESMCError, ESMProtein, GenerateStep
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc


class ClientBase:
    """The constructor and channel settings of both clients (arguments: see
    :class:`~esmc_client.client.ESMCClient`)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | str | os.PathLike | None = None,
        client_certificate: bytes | str | os.PathLike | None = None,
        client_key: bytes | str | os.PathLike | None = None,
        model: str | None = None,
    ):
        self.target = target
        self.model = model or ""  # every call's model unless the call names one ("": default)
        self.retry = retry if retry is not None else RetryPolicy()
        self.retry_budget = RetryBudget(self.retry.budget_ratio, self.retry.budget_burst)
        self._wait_for_ready = wait_for_ready
        self._metadata = auth_metadata(token)
        built = credentials is None
        client_pair = None
        if built:
            root_certificates = read_pem(root_certificates, "root certificates")
            client_certificate = read_pem(client_certificate, "client certificate")
            client_key = read_pem(client_key, "client key")
            credentials = tls_credentials(tls, root_certificates, client_certificate, client_key)
            if client_certificate is not None:
                client_pair = (client_certificate, client_key)
        self._transport = TransportCheck(
            target,
            tls=credentials is not None,
            root_certificates=root_certificates if built else None,
            roots_known=built,
            client_pair=client_pair,
            server_name=dict(options).get("grpc.ssl_target_name_override"),
        )
        channel_args = channel_options(max_message_bytes, tuple(options))
        self._channel = self._open_channel(target, credentials, channel_args)
        self._stub = pb_grpc.ESMCStub(self._channel)

    def _open_channel(self, target: str, credentials, options: list):
        raise NotImplementedError

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        metadata = (self._metadata or ()) + trace_metadata()
        return {
            "timeout": timeout,
            "wait_for_ready": self._wait_for_ready,
            "metadata": metadata or None,
        }

    def _ask(self, request, model: str | None) -> str:
        """Name the model in ``request`` (the call's ``model``, else this client's); return
        the name asked for ("" when none: the server's default)."""
        name = self.model if model is None else model
        if name and "model" in request.DESCRIPTOR.fields_by_name:
            request.model = name
            return name
        return ""

    def _transport_error(self, error: ESMCError) -> ESMCError | None:
        """For an ``UNAVAILABLE`` that is really a TLS mismatch (this client and the server
        speak different transports, or one refuses the other's certificate): the error
        saying what to change, never worth a retry (:class:`TransportCheck`); else None.
        Blocking (it may open a connection): the asyncio client runs it in a thread."""
        hint = self._transport.explain(error.code)
        if hint is None:
            return None
        return ESMCError(error.code, f"{error.message}; {hint}", attempts=error.attempts)

    def _retries(self, timeout: float | None) -> CallRetries:
        """Retry state of one call; ``timeout`` covers all its attempts."""
        return CallRetries(self.retry, self.retry_budget, timeout)

    def _embed_chunks(self, sequences, batch_size: int, max_in_flight: int, **request_options):
        """``(items, chunks)`` of a bulk embed, sharing this client's retry budget."""
        items = rq.embed_items(sequences)
        chunks = make_chunks(
            items, batch_size, self.retry, self.retry_budget, max_in_flight, **request_options
        )
        return items, chunks



def sequence_text(protein: ProteinLike) -> str:
    sequence = getattr(protein, "sequence", protein)
    if not isinstance(sequence, str):
        raise ValueError("encode takes a protein sequence string")
    return sequence


def final_protein(steps: Iterator[GenerateStep]) -> ESMProtein:
    final = None
    for step in steps:
        final = step if step.final else final
    return check_final(final)


def check_final(final: GenerateStep | None) -> ESMProtein:
    if final is None or final.protein is None:
        raise ESMCError("DATA_LOSS", "the Generate stream ended without a final message")
    return final.protein


def generation_jobs(proteins, config, seeds) -> list[tuple[ProteinLike, Any, int | None]]:
    """``(protein, config, seed)`` per prompt; ``config`` one for all or one per prompt."""
    proteins = list(proteins)
    configs = list(config) if isinstance(config, (list, tuple)) else [config] * len(proteins)
    seeds = list(seeds) if seeds is not None else [None] * len(proteins)
    if not len(configs) == len(seeds) == len(proteins):
        raise ValueError(
            f"{len(proteins)} proteins need as many configs and seeds "
            f"(got {len(configs)} configs, {len(seeds)} seeds)"
        )
    return list(zip(proteins, configs, seeds))
