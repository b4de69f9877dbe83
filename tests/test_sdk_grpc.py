"""The official esm SDK's client protocol over gRPC (issue 10): ``ESMCGrpcClient``.

The official ``esm.utils.generation`` functions drive a real server on port 0 through the
client and give exactly what they give with the official local ``ESMC`` on the same weights.
The client's calls are blocking, so they run in a thread while the server runs on the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from esmc.tokenizer import decode, encode
from helpers.inprocess import running_server, server_config
from helpers.models import pad, reference_esmc, rel_err, seeded_model

pytestmark = [pytest.mark.parity, pytest.mark.e2e]
pytest.importorskip("esm")
import esm.sdk  # noqa: E402,F401  (must come before esm.models.esmc: circular import)
from esm.sdk import api as sdk  # noqa: E402
from esm.utils.generation import iterative_sampling_tokens  # noqa: E402
from esm.utils.sampling import _BatchedESMProteinTensor  # noqa: E402

from esmc_client.esm_sdk import ESMCGrpcClient, sdk_tokenizers  # noqa: E402

PROMPTS = ["MKT___LL__AC_DE", "_" * 12, "_MKTAYIAKQR_", "AC|__DE|K_", "M_" * 20]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=128, n_heads=2, n_layers=2, seed=5)


@pytest.fixture(scope="module")
def reference(model):
    return reference_esmc(model.config, model.state_dict())


@pytest.fixture(autouse=True)
def quiet_reference(monkeypatch):
    monkeypatch.setenv("DISABLE_ITERATIVE_SAMPLING_TQDM", "1")


def tensors(prompts: list[str]) -> list:
    return [sdk.ESMProteinTensor(sequence=encode(p)) for p in prompts]


def configs(n: int, **fields) -> list:
    return [sdk.GenerationConfig(track="sequence", **fields) for _ in range(n)]


GENERATIONS = [
    dict(num_steps=4),
    dict(num_steps=6, strategy="entropy", temperature=0.7, top_p=0.9),
    dict(num_steps=3, temperature_annealing=False, invalid_ids=[4, 20], schedule="linear"),
]


async def test_official_iterative_sampling_over_grpc_gives_the_local_results(model, reference):
    async with running_server(model, server_config(max_wait_ms=2.0)) as running:

        def run():
            results = []
            with ESMCGrpcClient(f"127.0.0.1:{running.port}") as client:
                for i, fields in enumerate(GENERATIONS):
                    torch.manual_seed(i)
                    want = iterative_sampling_tokens(
                        reference, tensors(PROMPTS), configs(len(PROMPTS), **fields), sdk_tokenizers()
                    )
                    torch.manual_seed(i)
                    got = iterative_sampling_tokens(
                        client, tensors(PROMPTS), configs(len(PROMPTS), **fields), client.tokenizers
                    )
                    torch.manual_seed(i)
                    batch = client.batch_generate(tensors(PROMPTS), configs(len(PROMPTS), **fields))
                    results.append((want, got, batch))
                torch.manual_seed(9)
                proteins = [sdk.ESMProtein(sequence=p) for p in PROMPTS]
                raw = client.batch_generate(proteins, configs(len(PROMPTS)))
                one = client.generate(tensors(PROMPTS[:1])[0], configs(1)[0])
            return results, raw, one

        results, raw, one = await asyncio.to_thread(run)
    for want, got, batch in results:
        for w, g, b in zip(want, got, batch):
            assert isinstance(g, sdk.ESMProteinTensor) and isinstance(b, sdk.ESMProteinTensor)
            assert torch.equal(g.sequence, w.sequence)
            assert torch.equal(b.sequence, w.sequence)
            assert not (w.sequence == 32).any()
    torch.manual_seed(9)
    want = iterative_sampling_tokens(
        reference, tensors(PROMPTS), configs(len(PROMPTS)), sdk_tokenizers()
    )
    assert [p.sequence for p in raw] == [decode(w.sequence) for w in want]
    assert isinstance(one, sdk.ESMProteinTensor) and not (one.sequence == 32).any()


async def test_logits_split_padded_batches_and_repad_to_the_references_shapes(model, reference):
    tokens = [encode("MKTAYIAKQR"), encode("MSHHW"), encode("AC_DEKLMNPQRSTVWYAC")]
    batch = pad(tokens)
    lengths = [len(t) for t in tokens]
    config = sdk.LogitsConfig(
        sequence=True,
        structure=True,  # flags the SDK's iterative sampling sets: ignored
        secondary_structure=True,
        sasa=True,
        function=True,
        residue_annotations=True,
        return_embeddings=True,
        return_hidden_states=True,
    )
    async with running_server(model, server_config(max_wait_ms=50.0)) as running:

        def run():
            with ESMCGrpcClient(f"127.0.0.1:{running.port}") as client:
                batched = client.logits(_BatchedESMProteinTensor(sequence=batch), config)
                single = client.logits(sdk.ESMProteinTensor(sequence=tokens[0]), config)
                layer = client.logits(
                    sdk.ESMProteinTensor(sequence=tokens[1]),
                    sdk.LogitsConfig(return_hidden_states=True, ith_hidden_layer=1),
                )
            return batched, single, layer

        batched, single, layer = await asyncio.to_thread(run)
    want = reference.logits(_BatchedESMProteinTensor(sequence=batch), config)
    assert batched.logits.sequence.shape == want.logits.sequence.shape == (3, 21, 64)
    assert batched.embeddings.shape == want.embeddings.shape
    assert batched.hidden_states.shape == want.hidden_states.shape == (2, 3, 21, 128)
    assert batched.logits.structure is None and batched.residue_annotation_logits is None
    for b, n in enumerate(lengths):
        assert rel_err(batched.logits.sequence[b, :n], want.logits.sequence[b, :n]) <= TOLERANCE
        assert rel_err(batched.embeddings[b, :n], want.embeddings[b, :n]) <= TOLERANCE
        assert rel_err(batched.hidden_states[:, b, :n], want.hidden_states[:, b, :n]) <= TOLERANCE
        assert (batched.logits.sequence[b, n:] == 0).all()  # padding positions are zeros
    assert single.logits.sequence.shape == (1, 12, 64)  # batch dimension as the reference
    assert rel_err(single.logits.sequence[0], batched.logits.sequence[0, :12]) <= TOLERANCE
    assert layer.hidden_states.shape == (1, 1, 7, 128) and layer.logits.sequence is None


async def test_encode_decode_forward_and_sample_and_errors(model):
    async with running_server(model, server_config()) as running:

        def run():
            with ESMCGrpcClient(f"127.0.0.1:{running.port}") as client:
                tensor = client.encode(sdk.ESMProtein(sequence="MK_TA|C"))
                decoded = client.decode(tensor)
                batched = client.decode(sdk.ESMProteinTensor(sequence=pad([tensor.sequence])))
                bad_encode = client.encode(sdk.ESMProtein(sequence="MK*"))
                bad_decode = client.decode(sdk.ESMProteinTensor(sequence=torch.tensor([5, 6])))
                bad_logits = client.logits(
                    sdk.ESMProteinTensor(sequence=tensor.sequence),
                    sdk.LogitsConfig(return_hidden_states=True, ith_hidden_layer=7),
                )
                sampled = client.forward_and_sample(
                    tensor,
                    sdk.SamplingConfig(
                        sequence=sdk.SamplingTrackConfig(topk_logprobs=2),
                        structure=sdk.SamplingTrackConfig(),  # the SDK default sets every track
                        return_mean_embedding=True,
                    ),
                    seed=3,
                )
                with pytest.raises(NotImplementedError):
                    client.raw_model
            return tensor, decoded, batched, bad_encode, bad_decode, bad_logits, sampled

        tensor, decoded, batched, bad_encode, bad_decode, bad_logits, sampled = (
            await asyncio.to_thread(run)
        )
        async_client = ESMCGrpcClient(f"127.0.0.1:{running.port}")
        again = await async_client.async_decode(await async_client.async_encode(decoded))
        async_client.close()
    assert isinstance(tensor, sdk.ESMProteinTensor)
    assert tensor.sequence.tolist() == encode("MK_TA|C").tolist()
    assert decoded.sequence == batched.sequence == again.sequence == "MK_TA|C"
    for error in (bad_encode, bad_decode, bad_logits):
        assert isinstance(error, sdk.ESMProteinError) and error.error_code == 400, error
    assert "INVALID_ARGUMENT" in bad_encode.error_msg
    local = model.forward_and_sample(
        tensor, sdk.SamplingConfig(sequence=sdk.SamplingTrackConfig(topk_logprobs=2),
                                   return_mean_embedding=True), seed=3
    )
    assert isinstance(sampled, sdk.ForwardAndSampleOutput)
    assert torch.equal(sampled.protein_tensor.sequence, local.protein_tensor.sequence)
    assert torch.equal(sampled.topk_tokens.sequence, local.topk_tokens.sequence)
    assert torch.allclose(sampled.entropy.sequence, local.entropy.sequence, atol=1e-5)
    assert torch.allclose(sampled.mean_embedding, local.mean_embedding, atol=1e-5)


async def test_server_generation_with_torch_seed_matches_local_batch_generate(model):
    async with running_server(model, server_config()) as running:

        def run():
            with ESMCGrpcClient(f"127.0.0.1:{running.port}", server_generation=True) as client:
                torch.manual_seed(4)
                out = client.batch_generate(tensors(PROMPTS[:3]), configs(3, num_steps=3))
                proteins = client.batch_generate(
                    [sdk.ESMProtein(sequence="MK__V"), sdk.ESMProtein(sequence="MKV")], configs(2)
                )
            return out, proteins

        out, proteins = await asyncio.to_thread(run)
    torch.manual_seed(4)
    local = model.batch_generate(tensors(PROMPTS[:3]), configs(3, num_steps=3))
    assert [o.sequence.tolist() for o in out] == [w.sequence.tolist() for w in local]
    assert isinstance(proteins[0], sdk.ESMProtein) and "_" not in proteins[0].sequence
    assert isinstance(proteins[1], sdk.ESMProteinError) and proteins[1].error_code == 400


async def test_bad_token_is_401_and_a_good_one_passes(model, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("s3cret-token\n")
    config = dataclasses.replace(server_config(), auth_tokens_file=str(tokens_file))
    async with running_server(model, config) as running:

        def run():
            target = f"127.0.0.1:{running.port}"
            with ESMCGrpcClient(target, token="wrong") as bad, ESMCGrpcClient(
                target, token="s3cret-token"
            ) as good:
                protein = sdk.ESMProtein(sequence="MKV")
                return bad.encode(protein), good.encode(protein)

        refused, accepted = await asyncio.to_thread(run)
    assert isinstance(refused, sdk.ESMProteinError) and refused.error_code == 401
    assert "s3cret" not in refused.error_msg and "wrong" not in refused.error_msg
    assert accepted.sequence.tolist() == [0, 20, 15, 7, 2]
