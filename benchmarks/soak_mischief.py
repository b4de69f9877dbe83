"""Mischief mixed into a soak run: what careless or hostile callers do.

Quick kinds (a steady worker does one instead of its call, ~5% of requests): malformed
requests (lowercase, a digit, a bad variant, a layer the model lacks, bytes that are no
protobuf message), oversized ones (a protein over ``--max-length``, a message over
``--max-request-bytes``, a scoring request over ``--max-score-forwards``), wrong, revoked or
missing tokens, a deadline too short to meet, and callers that cancel a stream mid-way.

Long kinds (one task, one after the other): callers that disconnect mid-stream (their channel
closed under open streams), slow readers, and streams never read (held open past the
server's idle timeout, then cancelled by the caller if the server has not ended them).

Each call is written to the ledger under its kind with the code the caller saw; the codes a
kind is expected to get are in :data:`EXPECTED` (anything else is reported).
"""

from __future__ import annotations

import asyncio
import random

import grpc
import grpc.aio

from esmc_client import GenerationConfig, LogitsConfig, RetryPolicy
from esmc_client.channel import channel_options
from esmc_client.requests import generate_request
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc

from benchmarks.soak_fleet import CLIENT_OPTIONS, Auth, new_token
from benchmarks.soak_load import AMINO_ACIDS, Data, Ledger

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # the replicas' --max-request-bytes in a soak run
LONG_PROTEIN = 20_000  # residues: over the replicas' --max-length (16,384 by default)
LONG_GENERATION = GenerationConfig(num_steps=150, strategy="random")
UNAUTHENTICATED = frozenset({"UNAUTHENTICATED"})
INVALID = frozenset({"INVALID_ARGUMENT"})
EXPECTED = {
    "lowercase": INVALID,
    "digit in sequence": INVALID,
    "bad variant": INVALID,
    "layer out of range": INVALID,
    "not protobuf": INVALID,
    "protein over max-length": INVALID,
    "message over max-request-bytes": frozenset({"RESOURCE_EXHAUSTED"}),
    "scoring over max-score-forwards": INVALID,
    "wrong token": UNAUTHENTICATED,
    "revoked token": UNAUTHENTICATED,
    "no token": UNAUTHENTICATED,
    "deadline too short": frozenset({"DEADLINE_EXCEEDED"}),
    "cancel Generate mid-stream": frozenset({"CANCELLED"}),
    "cancel Embed mid-stream": frozenset({"CANCELLED"}),
    # the caller's own view of the channel it closed ("Channel closed" or a failed stream)
    "disconnect mid-stream": frozenset({"CANCELLED", "UNAVAILABLE"}),
    "slow reader": frozenset({"OK"}),
    "never read": frozenset({"CANCELLED"}),
}
# how often each quick kind is picked (the oversized message is the costly one)
QUICK_WEIGHTS = {
    "lowercase": 3, "digit in sequence": 3, "bad variant": 3, "layer out of range": 2,
    "not protobuf": 2, "protein over max-length": 2, "message over max-request-bytes": 1,
    "scoring over max-score-forwards": 2, "wrong token": 3, "revoked token": 2,
    "no token": 2, "deadline too short": 2, "cancel Generate mid-stream": 3,
    "cancel Embed mid-stream": 3,
}


class Mischief:
    """Raw calls over channels of their own (no client retries: each call is sent once)."""

    def __init__(self, ledger: Ledger, data: Data, target: str, credentials,
                 auth: Auth, idle_timeout_s: float):
        self.ledger = ledger
        self.data = data
        self.target = target
        self.credentials = credentials
        self.auth = auth
        self.idle_timeout_s = idle_timeout_s

    def channel(self) -> grpc.aio.Channel:
        options = channel_options(64 * 1024 * 1024, CLIENT_OPTIONS)
        return grpc.aio.secure_channel(self.target, self.credentials, options=options)

    def metadata(self, token: str | None = None) -> tuple:
        return (("authorization", f"Bearer {token or self.auth.token}"),)

    async def quick(self, rng: random.Random) -> None:
        kinds = list(QUICK_WEIGHTS)
        kind = rng.choices(kinds, weights=[QUICK_WEIGHTS[k] for k in kinds])[0]
        if kind == "revoked token" and not self.auth.revoked:
            kind = "wrong token"
        start = self.ledger.clock()
        async with self.channel() as channel, _Holding(self.auth):
            stub = pb_grpc.ESMCStub(channel)
            try:
                method, code = await QUICK[kind](self, stub, channel, rng)
            except grpc.aio.AioRpcError as error:
                self.ledger.record(start, _method_of(kind), kind, error.code().name,
                                   message=error.details() or "")
            else:
                self.ledger.record(start, method, kind, code)

    # -- quick kinds: each returns (method, final status name) unless its call raised ------

    async def _lowercase(self, stub, channel, rng) -> tuple[str, str]:
        protein = pb.ESMProtein(sequence=rng.choice(self.data.short).lower())
        await stub.Logits(pb.LogitsRequest(protein=protein), metadata=self.metadata(), timeout=60)
        return "Logits", "OK"

    async def _digit(self, stub, channel, rng) -> tuple[str, str]:
        sequence = rng.choice(self.data.short)
        at = rng.randrange(len(sequence))
        protein = pb.ESMProtein(sequence=sequence[:at] + "7" + sequence[at + 1:])
        await stub.Logits(pb.LogitsRequest(protein=protein), metadata=self.metadata(), timeout=60)
        return "Logits", "OK"

    async def _bad_variant(self, stub, channel, rng) -> tuple[str, str]:
        wild_type = rng.choice(self.data.short)
        wrong = next(a for a in AMINO_ACIDS if a != wild_type[0])
        request = pb.ScoreVariantsRequest(
            wild_type=pb.ESMProtein(sequence=wild_type), variants=[f"{wrong}1A", "Q9999Z"]
        )
        await stub.ScoreVariants(request, metadata=self.metadata(), timeout=60)
        return "ScoreVariants", "OK"

    async def _bad_layer(self, stub, channel, rng) -> tuple[str, str]:
        request = pb.LogitsRequest(
            protein=pb.ESMProtein(sequence=rng.choice(self.data.short)),
            config=pb.LogitsConfig(return_hidden_states=True, ith_hidden_layer=99),
        )
        await stub.Logits(request, metadata=self.metadata(), timeout=60)
        return "Logits", "OK"

    async def _not_protobuf(self, stub, channel, rng) -> tuple[str, str]:
        call = channel.unary_unary("/esmc.v1.ESMC/Logits")  # bytes in, bytes out
        junk = bytes([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
        await call(junk + rng.randbytes(16), metadata=self.metadata(), timeout=60)
        return "Logits", "OK"

    async def _over_max_length(self, stub, channel, rng) -> tuple[str, str]:
        protein = pb.ESMProtein(sequence="".join(rng.choices(AMINO_ACIDS, k=LONG_PROTEIN)))
        await stub.Logits(pb.LogitsRequest(protein=protein), metadata=self.metadata(), timeout=60)
        return "Logits", "OK"

    async def _over_message_size(self, stub, channel, rng) -> tuple[str, str]:
        protein = pb.ESMProtein(sequence="A" * (MAX_REQUEST_BYTES + 1024))
        await stub.Logits(pb.LogitsRequest(protein=protein), metadata=self.metadata(), timeout=60)
        return "Logits", "OK"

    async def _over_score_forwards(self, stub, channel, rng) -> tuple[str, str]:
        wild_type = (rng.choice(self.data.short) * 4)[:100]
        variants = [f"{wild_type[p]}{p + 1}{a}" for p in range(16)  # 304 mutants x 100 copies
                    for a in AMINO_ACIDS if a != wild_type[p]]
        request = pb.ScoreVariantsRequest(
            wild_type=pb.ESMProtein(sequence=wild_type), variants=variants,
            method=pb.PSEUDO_LIKELIHOOD,
        )
        await stub.ScoreVariants(request, metadata=self.metadata(), timeout=60)
        return "ScoreVariants", "OK"

    async def _wrong_token(self, stub, channel, rng) -> tuple[str, str]:
        protein = pb.ESMProtein(sequence=rng.choice(self.data.short))
        await stub.Logits(pb.LogitsRequest(protein=protein), metadata=self.metadata(new_token()),
                          timeout=60)
        return "Logits", "OK"

    async def _revoked_token(self, stub, channel, rng) -> tuple[str, str]:
        protein = pb.ESMProtein(sequence=rng.choice(self.data.short))
        token = rng.choice(self.auth.revoked)
        await stub.Logits(pb.LogitsRequest(protein=protein), metadata=self.metadata(token),
                          timeout=60)
        return "Logits", "OK"

    async def _no_token(self, stub, channel, rng) -> tuple[str, str]:
        protein = pb.ESMProtein(sequence=rng.choice(self.data.short))
        await stub.Logits(pb.LogitsRequest(protein=protein), timeout=60)
        return "Logits", "OK"

    async def _short_deadline(self, stub, channel, rng) -> tuple[str, str]:
        protein = pb.ESMProtein(sequence=rng.choice(self.data.short))
        config = pb.LogitsConfig(sequence=True, return_hidden_states=True)
        await stub.Logits(pb.LogitsRequest(protein=protein, config=config),
                          metadata=self.metadata(), timeout=0.002)
        return "Logits", "OK"

    async def _cancel_generate(self, stub, channel, rng) -> tuple[str, str]:
        call = stub.Generate(self._long_generation(rng), metadata=self.metadata(), timeout=120)
        await _read(call, rng.randint(1, 4))
        call.cancel()
        return "Generate", await _status(call)

    async def _cancel_embed(self, stub, channel, rng) -> tuple[str, str]:
        requests = [
            pb.EmbedRequest(id=str(k), protein=pb.ESMProtein(sequence=s))
            for k, (_, s) in enumerate(rng.sample(self.data.embed_pool, 12))
        ]
        call = stub.Embed(_aiter(requests), metadata=self.metadata(), timeout=120)
        await _read(call, rng.randint(1, 5))
        call.cancel()
        return "Embed", await _status(call)

    def _long_generation(self, rng: random.Random) -> pb.GenerateRequest:
        source = rng.choice(self.data.embed_pool)[1]
        prompt = "".join("_" if k % 2 else c for k, c in enumerate((source * 3)[:300]))
        return generate_request(prompt, LONG_GENERATION, rng.randrange(1 << 30))

    # -- long kinds ------------------------------------------------------------------------

    async def long_loop(self, stop: asyncio.Event, rng: random.Random, pause_s: float) -> None:
        """Disconnects, slow readers and unread streams, one after the other until ``stop``."""
        kinds = (self.disconnect, self.slow_reader, self.never_read)
        turn = 0
        while not stop.is_set():
            with self.auth.holding(self.auth.version):
                await kinds[turn % len(kinds)](rng, stop)
            turn += 1
            try:
                await asyncio.wait_for(stop.wait(), pause_s)
            except asyncio.TimeoutError:
                pass

    async def disconnect(self, rng: random.Random, stop: asyncio.Event) -> None:
        """Open a Generate and an Embed stream, read a little, then close the channel."""
        start = self.ledger.clock()
        channel = self.channel()
        stub = pb_grpc.ESMCStub(channel)
        generate = stub.Generate(self._long_generation(rng), metadata=self.metadata(), timeout=120)
        requests = [pb.EmbedRequest(id=str(k), protein=pb.ESMProtein(sequence=s))
                    for k, (_, s) in enumerate(self.data.embed_pool[:40])]
        embed = stub.Embed(_aiter(requests), metadata=self.metadata(), timeout=120)
        try:
            await asyncio.wait_for(asyncio.gather(_read(generate, 2), _read(embed, 2)), 60)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError):
            pass
        await channel.close()  # the connection goes away under both streams
        for call, method in ((generate, "Generate"), (embed, "Embed")):
            self.ledger.record(start, method, "disconnect mid-stream", await _status(call))

    async def slow_reader(self, rng: random.Random, stop: asyncio.Event) -> None:
        """A seeded Generate read one step per second (through the client's retries)."""
        from benchmarks.soak_load import GENERATION, SoakClient

        start = self.ledger.clock()
        client = SoakClient(self.target, credentials=self.credentials, token=self.auth.token,
                            options=CLIENT_OPTIONS, retry=RetryPolicy())
        k = rng.randrange(len(self.data.prompts))
        code, message = "OK", ""
        try:
            async for _ in client.generate_stream(self.data.prompts[k], GENERATION,
                                                  self.data.seeds[k], timeout=300):
                await asyncio.sleep(1.0)
        except Exception as error:  # recorded: the code is what the report counts
            code = getattr(error, "code", None) or "UNKNOWN"
            message = getattr(error, "message", None) or repr(error)
        finally:
            await client.close()
        self.ledger.record(start, "Generate", "slow reader", code, message=message)

    async def never_read(self, rng: random.Random, stop: asyncio.Event) -> None:
        """A long Generate stream and an Embed stream of 200 per-residue embeddings, opened
        and never read, held past the server's idle timeout, then cancelled by the caller
        if the server has not cancelled them first (the message says which)."""
        start = self.ledger.clock()
        hold_s = self.idle_timeout_s + 10
        async with self.channel() as channel:
            stub = pb_grpc.ESMCStub(channel)
            generate = stub.Generate(self._long_generation(rng), metadata=self.metadata(),
                                     timeout=hold_s + 120)
            requests = [pb.EmbedRequest(id=str(k), protein=pb.ESMProtein(sequence=s),
                                        pooling=pb.POOLING_NONE)
                        for k, (_, s) in enumerate(self.data.embed_pool[:200])]
            embed = stub.Embed(_aiter(requests), metadata=self.metadata(), timeout=hold_s + 120)
            try:
                await asyncio.wait_for(stop.wait(), hold_s)
            except asyncio.TimeoutError:
                pass
            for call, method in ((generate, "Generate"), (embed, "Embed")):
                if call.done():
                    code, message = await _status(call), "ended by the server"
                else:
                    call.cancel()
                    code = await _status(call)
                    message = f"still open after {hold_s:g} s: cancelled by the caller"
                self.ledger.record(start, method, "never read", code, message=message)


QUICK = {
    "lowercase": Mischief._lowercase, "digit in sequence": Mischief._digit,
    "bad variant": Mischief._bad_variant, "layer out of range": Mischief._bad_layer,
    "not protobuf": Mischief._not_protobuf, "protein over max-length": Mischief._over_max_length,
    "message over max-request-bytes": Mischief._over_message_size,
    "scoring over max-score-forwards": Mischief._over_score_forwards,
    "wrong token": Mischief._wrong_token, "revoked token": Mischief._revoked_token,
    "no token": Mischief._no_token, "deadline too short": Mischief._short_deadline,
    "cancel Generate mid-stream": Mischief._cancel_generate,
    "cancel Embed mid-stream": Mischief._cancel_embed,
}


class _Holding:
    """``auth.holding(current version)`` as an async context manager."""

    def __init__(self, auth: Auth):
        self._hold = auth.holding(auth.version)

    async def __aenter__(self):
        self._hold.__enter__()

    async def __aexit__(self, *exc):
        self._hold.__exit__(*exc)


def _method_of(kind: str) -> str:
    if "variant" in kind or "scoring" in kind:
        return "ScoreVariants"
    if "Generate" in kind:
        return "Generate"
    if "Embed" in kind:
        return "Embed"
    return "Logits"


async def _aiter(items):
    for item in items:
        yield item


async def _read(call, n: int) -> None:
    for _ in range(n):
        if await call.read() == grpc.aio.EOF:
            return


async def _status(call) -> str:
    """The call's final status name (the stream's own code after a cancel: CANCELLED)."""
    try:
        return (await call.code()).name
    except grpc.aio.AioRpcError as error:
        return error.code().name
