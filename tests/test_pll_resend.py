"""A pseudo-log-likelihood stream rides out a server killed or draining mid-stream.

A real ``esmc serve`` answers part of a stream of proteins, is then SIGKILLed (the socket
dies) or sent SIGTERM (it drains: the rest of the stream is refused ``UNAVAILABLE``), and a
new server starts on the same port: the client resends only the proteins without an answer,
and every protein gets exactly one result, equal to that of an undisturbed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time

import numpy as np
import pytest

from esmc_client import AsyncESMCClient, ESMCClient, RetryPolicy
from helpers.models import random_sequences
from helpers.processes import ServeProcess

pytestmark = pytest.mark.e2e

POLICY = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, ride_out_s=240.0)
PROTEINS = {f"p{i}": s for i, s in enumerate(random_sequences([20 + i % 9 for i in range(24)], 5))}
PROTEINS["bad"] = "MKZ1"  # a definitive error: never sent again
OPTIONS = ["--threads", "1", "--drain-delay-s", "0", "--grace-s", "2"]


def sequences_computed(served: ServeProcess) -> float:
    return sum(v for (name, _), v in served.metrics().items() if name == "esmc_sequences_total")


def pll(target: str, use_async: bool) -> list:
    if use_async:
        async def run():
            async with AsyncESMCClient(target, retry=POLICY) as client:
                return await client.pseudo_log_likelihood(PROTEINS, timeout=600)

        return asyncio.run(run())
    with ESMCClient(target, retry=POLICY) as client:
        return client.pseudo_log_likelihood(PROTEINS, timeout=600)


@pytest.mark.parametrize(
    ("use_async", "sig"), [(False, signal.SIGKILL), (True, signal.SIGTERM), (True, signal.SIGKILL)]
)
def test_pll_stream_resends_unanswered_proteins_across_a_restart(use_async, sig):
    with contextlib.ExitStack() as servers:
        first = servers.enter_context(ServeProcess("esmc-tiny", OPTIONS, ready_s=300))
        undisturbed = pll(first.target, use_async)
        whole_run = sequences_computed(first)  # sequence forwards one whole stream needs
        before = whole_run
        outcome = {}

        def disturbed():
            try:
                outcome["results"] = pll(first.target, use_async)
            except BaseException as error:  # reported by the assertion below
                outcome["error"] = error

        worker = threading.Thread(target=disturbed)
        worker.start()
        deadline = time.monotonic() + 300
        while sequences_computed(first) - before < whole_run / 3:
            assert time.monotonic() < deadline and worker.is_alive(), outcome
            time.sleep(0.05)
        first.signal(sig)
        first.process.wait(60)
        second = ServeProcess("esmc-tiny", OPTIONS, port=first.port, ready_s=300)
        servers.enter_context(second)
        worker.join(300)
        assert not worker.is_alive()
        resent = sequences_computed(second)
    assert "error" not in outcome, outcome.get("error")
    results = outcome["results"]
    assert [r.id for r in results] == list(PROTEINS)
    assert results[-1].error.code == "INVALID_ARGUMENT"
    for got, want in zip(results[:-1], undisturbed[:-1]):
        assert got.ok, (got.id, got.error)
        np.testing.assert_allclose(got.pseudo_log_likelihood, want.pseudo_log_likelihood,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-4, atol=1e-4)
    # the new server computed the unanswered proteins only: some, not the whole stream
    assert 0 < resent < whole_run
