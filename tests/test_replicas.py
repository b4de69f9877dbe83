"""Three real ``esmc serve`` replicas behind one round-robin client; one dies by SIGKILL.

Unary ``Logits`` calls and a bulk ``embed`` of 1,000 proteome proteins run; once they reach
every replica, seeded generations start too, and when every generation has delivered a few
steps, a replica that holds generations far from their end is killed. Every call and every
protein must still succeed, exactly once, with the values of a single-server run, and the
generations must deliver the same proteins with an unbroken stream of steps (the client
resends the seeded request to a surviving replica and skips the steps already delivered).
Each replica's metrics show that it served a share of the load.

The replicas age their connections out every few seconds (``max_connection_age``), so calls
also cross GOAWAYs; afterwards the killed replica is started again on its port and the same
client channel sends it calls within seconds.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from esmc.config import ESMCConfig
from esmc.fasta import read_fasta
from esmc import ESMC
from esmc.weights import save_safetensors
from esmc_client import ESMCClient, GenerationConfig, LogitsConfig
from helpers.data import proteome_path
from helpers.inprocess import loop_thread, serving_on
from helpers.processes import ServeProcess

pytestmark = pytest.mark.e2e

N_EMBED = 1000
MAX_RESIDUES = 2000  # the first 1,000 proteome proteins up to this length (in file order)
N_LOGITS = 24
SEEDS = (11, 12, 13, 14)
STEPS = 48
MARGIN = 16  # steps each generation of the victim still has to compute at the kill
RTOL, ATOL = 1e-5, 1e-5  # packed batches of different company (float32)
LOGITS = LogitsConfig(sequence=True, return_mean_embedding=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A small random ESMC written as safetensors, served by every replica."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_safetensors(ESMC(ESMCConfig(d_model=64, n_heads=1, n_layers=2)), path)
    return str(path)


@pytest.fixture(scope="module")
def proteins() -> list[tuple[str, str]]:
    path = proteome_path()
    records = [r for r in read_fasta(path) if len(r[1]) <= MAX_RESIDUES]
    assert len(records) >= N_EMBED
    return records[:N_EMBED]


def prompts(proteins) -> list[str]:
    """Generation prompts: 96 residues of a protein with every other one masked."""
    return [
        "".join("_" if i % 2 else c for i, c in enumerate(sequence[:96]))
        for _, sequence in proteins[N_EMBED - len(SEEDS):]
    ]


def generation_config() -> GenerationConfig:
    return GenerationConfig(num_steps=STEPS, strategy="random", temperature=1.0)


def single_server_run(weights: str, proteins) -> dict:
    """The reference: the same calls against one in-process server with the same weights."""
    model = ESMC.from_pretrained(weights, device=torch.device("cpu")).eval()
    with loop_thread() as loop, serving_on(loop, model, metrics=False) as server:
        with ESMCClient(f"127.0.0.1:{server.port}") as client:
            embeddings = client.embed(proteins, timeout=300)
            logits = [client.logits(s, LOGITS, timeout=60) for _, s in proteins[:N_LOGITS]]
            generations = [
                list(client.generate_stream(p, generation_config(), seed, timeout=120))
                for p, seed in zip(prompts(proteins), SEEDS)
            ]
    return {"embed": embeddings, "logits": logits, "generate": generations}


def metric(samples: dict, name: str, **labels) -> float:
    return sum(
        value for (n, ls), value in samples.items()
        if n == name and all((k, v) in ls for k, v in labels.items())
    )


def test_three_replicas_survive_a_sigkill(weights, proteins, caplog):
    t0 = time.monotonic()
    options = ["--max-wait-ms", "10", "--max-connection-age-s", "4"]  # GOAWAYs mid-run too
    replicas = [ServeProcess(weights, options) for _ in range(3)]
    for replica in replicas:  # they load while the reference runs in this process
        replica.start()
    try:
        reference = single_server_run(weights, proteins)
        t_reference = time.monotonic() - t0
        for replica in replicas:
            replica.wait_serving()
        t_start = time.monotonic() - t0
        target = "ipv4:" + ",".join(r.target for r in replicas)
        with ESMCClient(target) as client:
            outcome = run_and_kill(client, replicas, proteins, caplog)
            restart_s = restart_and_rejoin(client, replicas, outcome["victim"], weights, options)
    finally:
        for replica in replicas:
            replica.stop()
    victim, before_kill, after = outcome["victim"], outcome["before_kill"], outcome["after"]

    # every protein exactly once, in order, equal to the single-server run
    results = outcome["embed"]
    assert [r.id for r in results] == [i for i, _ in proteins]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    for got, want in zip(results, reference["embed"]):
        np.testing.assert_allclose(got.embedding, want.embedding, rtol=RTOL, atol=ATOL)
    # every unary call succeeded with the single-server values
    assert len(outcome["logits"]) >= N_LOGITS and not outcome["logit_errors"]
    for index, out in outcome["logits"]:
        want = reference["logits"][index]
        np.testing.assert_allclose(out.logits.sequence, want.logits.sequence, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out.mean_embedding, want.mean_embedding, rtol=RTOL, atol=ATOL)
    # generations: same steps and proteins as alone on one server, no gap, no repeat
    for got, want in zip(outcome["generate"], reference["generate"]):
        assert [s.step for s in got[:-1]] == list(range(1, len(want)))
        assert got[-1].final and not any(s.final for s in got[:-1])
        assert [s.sequence for s in got] == [s.sequence for s in want]
        assert got[-1].protein == want[-1].protein
    # the victim held a generation when it died, and the client resent it elsewhere
    assert outcome["victim_generations"] >= 1
    resumed = [r for r in caplog.records if "sending it again" in r.getMessage()]
    assert len(resumed) >= outcome["victim_generations"]
    # each replica served a share (the victim until its death)
    served = [before_kill if i == victim else after[i] for i in range(3)]
    embeds = [metric(s, "esmc_requests_total", method="Embed") for s in served]
    logit_calls = [metric(s, "esmc_requests_total", method="Logits") for s in served]
    assert all(n > 0 for n in embeds) and all(n > 0 for n in logit_calls), (embeds, logit_calls)
    print(
        f"\nreference run {t_reference:.1f} s; replicas serving at {t_start:.1f} s; "
        f"replicated run {outcome['seconds']:.1f} s; restarted replica used again after "
        f"{restart_s:.1f} s; "
        f"killed replica {victim} holding {outcome['victim_generations']} generation(s) "
        f"after {outcome['embedded_at_kill']} embeds; Embed per replica {embeds}, "
        f"Logits per replica {logit_calls}; {len(resumed)} generation(s) resumed"
    )


def run_and_kill(client: ESMCClient, replicas: list[ServeProcess], proteins, caplog) -> dict:
    caplog.set_level(logging.INFO, logger="esmc_client.replay")
    out: dict = {"logits": [], "logit_errors": [], "generate": [None] * len(SEEDS)}
    embed_done = threading.Event()
    steps_seen = [0] * len(SEEDS)
    start = time.monotonic()

    def embed() -> None:
        try:
            out["embed"] = client.embed(proteins, batch_size=40, concurrency=4, timeout=300)
        finally:
            embed_done.set()

    def unary() -> None:
        i = 0
        while not embed_done.is_set() or i < N_LOGITS:
            index = i % N_LOGITS
            try:
                out["logits"].append((index, client.logits(proteins[index][1], LOGITS, timeout=60)))
            except Exception as error:  # recorded and asserted on, not swallowed
                out["logit_errors"].append(error)
            i += 1

    def generate(k: int, prompt: str, seed: int) -> None:
        steps = []
        for step in client.generate_stream(prompt, generation_config(), seed, timeout=120):
            steps.append(step)
            steps_seen[k] += 1
        out["generate"][k] = steps

    threads = [threading.Thread(target=embed), threading.Thread(target=unary)]
    for thread in threads:
        thread.start()
    wait_for_load(replicas)
    # The generations start only now, so that none can be near its end when the kill comes.
    generators = [
        threading.Thread(target=generate, args=(k, p, s))
        for k, (p, s) in enumerate(zip(prompts(proteins), SEEDS))
    ]
    for thread in generators:
        thread.start()
    out.update(kill_one(replicas, steps_seen))
    for thread in threads + generators:
        thread.join(240)
        assert not thread.is_alive()
    out["seconds"] = time.monotonic() - start
    out["after"] = [None if i == out["victim"] else r.metrics() for i, r in enumerate(replicas)]
    return out


def wait_for_load(replicas: list[ServeProcess]) -> None:
    """Until some proteins are embedded and every replica answered an Embed and a Logits call
    (so that whichever replica is killed later has served a share)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        scrapes = [r.metrics() for r in replicas]
        embeds = [metric(s, "esmc_requests_total", method="Embed") for s in scrapes]
        unary = [metric(s, "esmc_requests_total", method="Logits") for s in scrapes]
        if sum(embeds) >= 100 and min(embeds) >= 1 and min(unary) >= 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"the load did not reach every replica: Embed {embeds}, Logits {unary}")


def kill_one(replicas: list[ServeProcess], steps_seen: list[int]) -> dict:
    """Once every generation streams, SIGKILL a replica that holds generations far from
    their end.

    The kill must break every generation the victim is counted to hold. Its active-generations
    gauge also counts a generation that has computed its last step until the engine's next
    pass (its final message may already be with the client), and a generation near its end
    can finish between the scrape and the kill: either way it completes normally and is not
    resent. So the victim is chosen only while the steps it has computed in all (its
    generation-steps counter) leave each of its generations ``MARGIN`` steps short of the end:
    none of them can be finished, or finish in the instant before the kill."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if min(steps_seen) >= 3:
            scrapes = [r.metrics() for r in replicas]
            held = [
                (metric(s, "esmc_active_generations"), i)
                for i, s in enumerate(scrapes)
                if metric(s, "esmc_generation_steps_total") <= STEPS - MARGIN
            ]
            active, victim = max(held, default=(0, None))
            if active >= 1:
                replicas[victim].kill()
                return {
                    "victim": victim,
                    "victim_generations": int(active),
                    "before_kill": scrapes[victim],
                    "embedded_at_kill": int(
                        sum(metric(s, "esmc_requests_total", method="Embed") for s in scrapes)
                    ),
                }
        time.sleep(0.02)
    raise AssertionError(f"no moment to kill: steps {steps_seen}")


def restart_and_rejoin(client, replicas, victim: int, weights: str, options) -> float:
    """Start the killed replica again on its port: the same client channel reconnects (its
    reconnect backoff is capped at 2 s) and round robin sends it calls again."""
    killed = replicas[victim]
    killed.__exit__(None, None, None)  # already dead: removes its log
    replicas[victim] = ServeProcess(weights, options, port=killed.port)
    with replicas[victim] as restarted:
        t0 = time.monotonic()
        while metric(restarted.metrics(), "esmc_requests_total", method="Logits") == 0:
            client.logits("MKTAYIAKQR", timeout=30)
            assert time.monotonic() - t0 < 15, "the restarted replica got no call in 15 s"
        seconds = time.monotonic() - t0
    return seconds


def _step(step, sequence, final=False):
    from esmc_client.types import GenerateStep

    return GenerateStep(
        step=None if final else step, num_steps=3, positions=(), tokens=(), probabilities=(),
        entropies=(), temperature=1.0, sequence=sequence, final=final, protein=None,
        protein_tensor=None, metadata=None,
    )


@pytest.mark.unit
def test_replay_skips_delivered_steps_and_refuses_a_different_generation():
    from esmc_client.replay import GenerationReplay, replay_seed
    from esmc_client.types import ESMCError

    replay = GenerationReplay()
    assert [replay.accept(_step(1, "MA_")), replay.accept(_step(2, "MAK"))] == [True, True]
    # the request sent again: steps 1-2 come again and are skipped, step 3 is new
    assert [replay.accept(_step(1, "MA_")), replay.accept(_step(2, "MAK"))] == [False, False]
    assert replay.accept(_step(3, "MAKV")) and replay.accept(_step(None, "MAKV", final=True))
    assert not replay.accept(_step(None, "MAKV", final=True))
    other = GenerationReplay()
    other.accept(_step(1, "MA_"))
    with pytest.raises(ESMCError, match="differs at step 1") as error:
        other.accept(_step(1, "MC_"))  # another model on the replica the request went to
    with pytest.raises(ESMCError, match="skipped"):
        GenerationReplay().accept(_step(2, "MAK"))
    assert replay_seed(7) == 7 and replay_seed(None) != replay_seed(None)
    assert error.value.code == "DATA_LOSS"
