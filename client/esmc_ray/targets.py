"""The servers a job talks to: one client per target, work split over the targets that
answer, failover of what a target fails transiently (:class:`TargetPool`), and the job's
model and shape from the targets' ``Info`` (:func:`server_metadata`).

Clients (and with them grpc) are made on first use, not at import: the ``esmc`` command
chooses gRPC's log level before any is made."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from esmc_client.channel import unreachable_reason
from esmc_client.retry import RetryPolicy
from esmc_client.types import ESMCError

log = logging.getLogger(__name__)

TRANSIENT_CODES = (
    "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "ABORTED",
)
"""Errors that say nothing about the sequence: its id is left for the next run."""
_CLIENT_RETRY = RetryPolicy(max_retries=2, initial_backoff_s=0.2, max_backoff_s=1.0, ride_out_s=2.0)
"""Short: a target that stays down hands its sequences to the others (a lone target gets
the client's usual 30 s ride-out of a restart)."""
_FAILOVER_ROUNDS = 6
_REST_S = 5.0  # a target that failed transiently gets no work for this long (doubling)


def server_metadata(targets: Sequence[str], client_options: dict[str, Any]) -> dict[str, str]:
    """The job's model, server version and shape from the targets' ``Info`` (no compute).

    Every answering target must serve the same model. Targets that do not answer are
    skipped (the actors try them again later); at least one must answer.
    """
    seen = {}
    failed = {}
    for target in targets:
        with _client(target, retry=_CLIENT_RETRY, **client_options) as client:
            try:
                seen[target] = client.info(timeout=30)
            except ESMCError as error:
                failed[target] = unreachable_reason(error).removeprefix("UNAVAILABLE: ")
    if not seen:
        target, reason = next(iter(failed.items()))
        others = f" (nor {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise ESMCError("UNAVAILABLE", f"no target answers: {target}{others}: {reason}")
    for target, reason in failed.items():
        log.warning("%s does not answer (%s); its share goes elsewhere", target, reason)
    first = next(iter(seen.values()))
    for target, info in seen.items():
        if (info.model_name, info.d_model) != (first.model_name, first.d_model):
            raise ValueError(
                f"targets serve different models: {target} serves {info.model_name} "
                f"(d={info.d_model}), another {first.model_name} (d={first.d_model})"
            )
    return {
        "model": first.model_name,
        "server_version": first.server_version,
        "d_model": str(first.d_model),
        "n_layers": str(first.n_layers),
        "mode": "servers",
    }


class TargetPool:
    """One client per target; work goes to the targets that answer.

    :meth:`run` splits items over the live targets; items a target fails with a transient
    status go to the others in the next round, and that target rests (5 s, doubling up to
    40 s) before it gets work again. Items still failing after the last round get None.
    """

    def __init__(self, targets: Sequence[str], client_options: dict[str, Any]):
        retry = _CLIENT_RETRY if len(targets) > 1 else RetryPolicy()
        options = {"retry": retry, **client_options}
        self._clients = [_client(target, **options) for target in targets]
        self._rest_until = [0.0] * len(targets)
        self._rest_s = [_REST_S] * len(targets)

    def run(self, items: list, call: Callable[[Any, list], list]) -> list:
        """``call(client, some items)`` -> one result per item (with an ``error``), per item."""
        results: list = [None] * len(items)
        todo = list(range(len(items)))
        for round_ in range(_FAILOVER_ROUNDS):
            if round_:
                time.sleep(min(_REST_S, 0.5 * 2**round_))
            live = self._live()
            shares = [(t, todo[k :: len(live)]) for k, t in enumerate(live)]

            def on(share: tuple[int, list[int]]) -> list:
                target, indices = share
                return call(self._clients[target], [items[i] for i in indices]) if indices else []

            with ThreadPoolExecutor(len(shares)) as pool:
                answers = list(pool.map(on, shares))
            todo = []
            for (target, share), answer in zip(shares, answers):
                failed = [i for i, r in zip(share, answer) if transient(r)]
                for i, result in zip(share, answer):
                    if not transient(result):
                        results[i] = result
                self._note(target, failed=bool(failed))
                todo += failed
            if not todo:
                break
        return results

    def _live(self) -> list[int]:
        now = time.monotonic()
        live = [t for t, until in enumerate(self._rest_until) if until <= now]
        return live or [min(range(len(self._rest_until)), key=self._rest_until.__getitem__)]

    def _note(self, target: int, failed: bool) -> None:
        if failed:
            self._rest_until[target] = time.monotonic() + self._rest_s[target]
            self._rest_s[target] = min(8 * _REST_S, 2 * self._rest_s[target])
        else:
            self._rest_s[target] = _REST_S


def transient(result: Any) -> bool:
    """A result (with an ``error``) that says nothing about its input: retry it later."""
    return result.error is not None and result.error.code in TRANSIENT_CODES


def _client(target: str, **options):
    """An :class:`~esmc_client.client.ESMCClient`; grpc loads with the first one, after the
    command has set gRPC's log level (its C core reads it once, at import)."""
    from esmc_client.client import ESMCClient

    return ESMCClient(target, **options)
