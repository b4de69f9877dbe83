"""The steady load of a soak run, driven through the Python client (``AsyncESMCClient``).

Each worker owns one client (one channel to every replica, round robin) and loops over one
kind of call with a short think time: ``Logits`` of short proteins, bulk ``embed`` streams
whose every id must come back exactly once with the undisturbed run's embedding, seeded
``Generate`` streams whose final protein must equal the undisturbed run's, ``ScoreVariants``
and ``PseudoLogLikelihood``. Every call is written to the :class:`Ledger` with its start,
end, method and final status code; small requests (the unary calls on short proteins) feed
the latency percentiles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from esmc_client import AsyncESMCClient, ESMCError, GenerationConfig, LogitsConfig
from esmc_client.fasta import read_fasta

from benchmarks.soak_fleet import Auth

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
LOGITS = LogitsConfig(sequence=True)
GENERATION = GenerationConfig(num_steps=12, strategy="random", temperature=1.0)
EMBED_TOLERANCE = 1e-4  # float32 packed with different company (the service's own: 1e-5)
CALL_TIMEOUT_S = 120.0
STEADY_KINDS = ("logits", "embed", "generate", "logits", "score", "pll", "generate", "logits")


@dataclasses.dataclass(frozen=True)
class Call:
    start: float  # seconds on the run's clock
    end: float
    method: str
    kind: str  # "steady" or the mischief's name
    code: str  # "OK" or the gRPC status name the caller saw
    small: bool = False  # a small request: counts in the latency percentiles
    message: str = ""


class Ledger:
    """Every call of the run, and the invariants' counts."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.calls: list[Call] = []
        self.bulk = Counter()  # runs, ids, lost, duplicated, differing
        self.generations = Counter()  # runs, differing, failed
        self.differences: list[dict] = []  # what differed, for the report

    def record(self, start: float, method: str, kind: str, code: str, small: bool = False,
               message: str = "") -> None:
        self.calls.append(Call(start, self.clock(), method, kind, code, small, message[:300]))

    def failure(self, start: float, method: str, kind: str, error: BaseException,
                small: bool = False) -> None:
        code = getattr(error, "code", None) or "UNKNOWN"
        message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
        self.record(start, method, kind, code, small, message)


@dataclasses.dataclass(frozen=True)
class Data:
    """What the workers send, cut from a FASTA file (the shared proteome)."""

    short: list[str]  # 30-120 residues: Logits
    tiny: list[str]  # 24 residues: PseudoLogLikelihood
    embed_pool: list[tuple[str, str]]  # (id, sequence) <= 400 residues: bulk embeds
    prompts: list[str]  # masked prompts of the seeded generations
    seeds: list[int]


def load_data(fasta: str, n_prompts: int, seed: int) -> Data:
    records = [r for r in read_fasta(fasta) if set(r[1]) <= set(AMINO_ACIDS)]
    rng = random.Random(seed)
    rng.shuffle(records)
    short = [s[: rng.randint(30, 120)] for _, s in records[:200] if len(s) >= 30]
    tiny = [s[:24] for _, s in records[200:300] if len(s) >= 24]
    embed_pool = [(i, s) for i, s in records[300:1000] if len(s) <= 400][:300]
    prompts = [
        "".join("_" if k % 3 == 1 else c for k, c in enumerate(s[:60]))
        for _, s in records[1000:1000 + n_prompts]
    ]
    return Data(short, tiny, embed_pool, prompts, [1000 + k for k in range(len(prompts))])


class SoakClient(AsyncESMCClient):
    """The async client, also counting the ids each ``Embed`` stream answers: the bulk
    bookkeeping ignores an answer to an id it no longer waits for, so a server that
    answered an id twice would go unseen without this count."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.repeated_ids = 0

    async def _embed_stream(self, requests, max_in_flight, timeout):
        seen: set[str] = set()
        async for message in super()._embed_stream(requests, max_in_flight, timeout):
            if message.id in seen:
                self.repeated_ids += 1
            seen.add(message.id)
            yield message


@dataclasses.dataclass
class Reference:
    """The undisturbed run: each prompt's generated protein, each pool protein's embedding."""

    proteins: list[str]
    embeddings: dict[str, np.ndarray]


async def undisturbed_run(client: AsyncESMCClient, data: Data) -> Reference:
    """The seeded generations and the pool's embeddings, before any fault or mischief."""
    generated = await client.batch_generate(
        data.prompts, GENERATION, data.seeds, concurrency=len(data.prompts), timeout=600
    )
    results = await client.embed(data.embed_pool, batch_size=50, concurrency=2, timeout=600)
    failed = [r.id for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"the undisturbed embed failed for {len(failed)} proteins: {failed[:5]}")
    return Reference([p.sequence for p in generated], {r.id: r.embedding for r in results})


class Steady:
    """The steady calls; ``client_factory()`` gives a client with the current token."""

    def __init__(self, ledger: Ledger, data: Data, reference: Reference, bulk_size: int):
        self.ledger = ledger
        self.data = data
        self.reference = reference
        self.bulk_size = bulk_size
        self._bulk_runs = 0

    async def call(self, kind: str, client: SoakClient, rng: random.Random) -> None:
        await getattr(self, kind)(client, rng)

    async def logits(self, client: SoakClient, rng: random.Random) -> None:
        start = self.ledger.clock()
        try:
            out = await client.logits(rng.choice(self.data.short), LOGITS, timeout=CALL_TIMEOUT_S)
        except ESMCError as error:
            return self.ledger.failure(start, "Logits", "steady", error, small=True)
        code = "OK" if np.isfinite(out.logits.sequence).all() else "NON_FINITE"
        self.ledger.record(start, "Logits", "steady", code, small=True)

    async def score(self, client: SoakClient, rng: random.Random) -> None:
        wild_type = rng.choice(self.data.short)[:60]
        positions = rng.sample(range(len(wild_type)), 3)
        variants = [
            f"{wild_type[p]}{p + 1}{rng.choice(AMINO_ACIDS.replace(wild_type[p], ''))}"
            for p in positions
        ]
        start = self.ledger.clock()
        try:
            scores = await client.score_variants(wild_type, variants, timeout=CALL_TIMEOUT_S)
        except ESMCError as error:
            return self.ledger.failure(start, "ScoreVariants", "steady", error, small=True)
        code = "OK" if scores.shape == (3,) and np.isfinite(scores).all() else "WRONG_SHAPE"
        self.ledger.record(start, "ScoreVariants", "steady", code, small=True)

    async def pll(self, client: SoakClient, rng: random.Random) -> None:
        start = self.ledger.clock()
        if rng.random() < 0.25:  # the stream form: every id answered once
            proteins = {f"p{k}": rng.choice(self.data.tiny) for k in range(4)}
            try:
                results = await client.pseudo_log_likelihood(proteins, timeout=CALL_TIMEOUT_S)
            except ESMCError as error:
                return self.ledger.failure(start, "PseudoLogLikelihoodStream", "steady", error)
            bad = [r for r in results if not r.ok]
            ids_ok = [r.id for r in results] == list(proteins)
            code = bad[0].error.code if bad else ("OK" if ids_ok else "WRONG_IDS")
            message = bad[0].error.message if bad else ""
            return self.ledger.record(start, "PseudoLogLikelihoodStream", "steady", code,
                                      message=message)
        try:
            result = await client.pseudo_log_likelihood(
                rng.choice(self.data.tiny), timeout=CALL_TIMEOUT_S
            )
        except ESMCError as error:
            return self.ledger.failure(start, "PseudoLogLikelihood", "steady", error, small=True)
        code = "OK" if np.isfinite(result.pseudo_log_likelihood) else "NON_FINITE"
        self.ledger.record(start, "PseudoLogLikelihood", "steady", code, small=True)

    async def generate(self, client: SoakClient, rng: random.Random) -> None:
        k = rng.randrange(len(self.data.prompts))
        start = self.ledger.clock()
        self.ledger.generations["runs"] += 1
        try:
            protein = await client.generate(
                self.data.prompts[k], GENERATION, self.data.seeds[k], timeout=CALL_TIMEOUT_S
            )
        except ESMCError as error:
            self.ledger.generations["failed"] += 1
            return self.ledger.failure(start, "Generate", "steady", error)
        if protein.sequence != self.reference.proteins[k]:
            self.ledger.generations["differing"] += 1
            self.ledger.differences.append({
                "what": "generation", "prompt": k, "seed": self.data.seeds[k],
                "got": protein.sequence, "undisturbed": self.reference.proteins[k],
            })
        self.ledger.record(start, "Generate", "steady", "OK")

    async def embed(self, client: SoakClient, rng: random.Random) -> None:
        """A bulk embed: each id exactly once, each embedding the undisturbed run's."""
        self._bulk_runs += 1
        picked = rng.sample(self.data.embed_pool, min(self.bulk_size, len(self.data.embed_pool)))
        ids = [f"{self._bulk_runs}:{name}" for name, _ in picked]
        repeated_before = client.repeated_ids
        start = self.ledger.clock()
        try:
            results = await client.embed(
                list(zip(ids, (s for _, s in picked))), batch_size=max(1, len(ids) // 3),
                concurrency=3, max_in_flight=16, timeout=CALL_TIMEOUT_S,
            )
        except ESMCError as error:  # the whole bulk refused (e.g. a transport error)
            self.ledger.bulk.update(runs=1, ids=len(ids), lost=len(ids))
            return self.ledger.failure(start, "Embed", "steady", error)
        answered = Counter(r.id for r in results if r is not None and r.ok)
        lost = sum(1 for i in ids if answered[i] == 0)
        duplicated = sum(n - 1 for n in answered.values() if n > 1)
        duplicated += client.repeated_ids - repeated_before
        differing = 0
        for result, (name, _) in zip(results, picked):
            if result is not None and result.ok and not np.allclose(
                result.embedding, self.reference.embeddings[name],
                rtol=EMBED_TOLERANCE, atol=EMBED_TOLERANCE,
            ):
                differing += 1
        self.ledger.bulk.update(runs=1, ids=len(ids), lost=lost, duplicated=duplicated,
                                differing=differing)
        errors = Counter(r.error.code for r in results if r is not None and not r.ok)
        if errors:
            first = next(r.error for r in results if r is not None and not r.ok)
            return self.ledger.record(start, "Embed", "steady", first.code,
                                      message=f"{dict(errors)} ids failed; first: {first.message}")
        code = "OK" if not (lost or duplicated) else "IDS_LOST_OR_REPEATED"
        self.ledger.record(start, "Embed", "steady", code)


async def worker(kind: str, index: int, steady: Steady, mischief, new_client: Callable,
                 auth: Auth, stop: asyncio.Event, think_s: float, mischief_rate: float,
                 seed: int) -> None:
    """One client looping over ``kind`` calls; now and then a quick mischief instead. The
    client is made again when the token changes (a rotation)."""
    rng = random.Random(seed * 1000 + index)
    client, version = None, -1
    try:
        while not stop.is_set():
            if version != auth.version:
                if client is not None:
                    await client.close()
                version, client = auth.version, new_client()
            if rng.random() < mischief_rate:
                await mischief.quick(rng)
            else:
                with auth.holding(version):
                    await steady.call(kind, client, rng)
            try:
                await asyncio.wait_for(stop.wait(), think_s * rng.uniform(0.5, 1.5))
            except asyncio.TimeoutError:
                pass
    finally:
        if client is not None:
            await client.close()


def monotonic_clock() -> Callable[[], float]:
    """Seconds since now."""
    origin = time.monotonic()
    return lambda: time.monotonic() - origin
