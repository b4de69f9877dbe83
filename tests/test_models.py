"""Model names on the wire: a request's ``model`` is never ignored.

A real server on port 0 answers a request that names its model (or an alias, or none) and
says in every response's metadata which model served it (name, weights sha256, dtype, server
version); any other name is ``NOT_FOUND`` naming the served models, on every model-bound RPC.
The client names its model (per client or per call) and refuses an answer that does not name
the model it asked for.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from esmc_client import ESMCClient
from esmc_client import responses as rs
from esmc_client.types import ESMCError
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server.models import ModelNotFound, ModelTable, ServedModel, aliases_of, weights_digest
from helpers.inprocess import ThreadServer, server_config
from helpers.models import seeded_model

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"
NAME = "tiny-random"


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=2, n_layers=3, seed=5)


@pytest.fixture(scope="module")
def served(model):
    config = dataclasses.replace(server_config(max_wait_ms=1.0), warmup=False)
    server = ThreadServer(model, config)
    yield server
    server.close()


# -- unit: names, aliases, digests ----------------------------------------------------------


def _served_model(name: str) -> ServedModel:
    return ServedModel(name, aliases_of(name), "0" * 64, 0, "float32", "test")


@pytest.mark.unit
def test_official_names_are_aliases_of_the_registry_name():
    assert set(aliases_of("esmc-300m")) == {"esmc_300m", "esmc-300m-2024-12"}
    assert set(aliases_of("esmc_600m")) == {"esmc-600m", "esmc-600m-2024-12"}
    assert aliases_of("esmc-tiny") == ()
    assert aliases_of("/models/my-finetune") == ()


@pytest.mark.unit
def test_the_table_resolves_names_and_aliases_and_refuses_the_rest():
    table = ModelTable([_served_model("esmc-300m"), _served_model("esmc-600m")])
    assert table.index("") == 0
    assert table.index("esmc-600m") == 1
    assert table.index("esmc_600m") == 1
    assert table.index("esmc-300m-2024-12") == 0
    with pytest.raises(ModelNotFound) as refused:
        table.index("esmc-6b")
    assert refused.value.code == "NOT_FOUND"
    assert "'esmc-300m', 'esmc-600m'" in str(refused.value)


@pytest.mark.unit
def test_the_weights_digest_changes_with_one_weight(model):
    other = seeded_model(d_model=64, n_heads=2, n_layers=3, seed=5)
    assert weights_digest(other) == weights_digest(model)
    with_one_change = seeded_model(d_model=64, n_heads=2, n_layers=3, seed=5)
    param = next(with_one_change.parameters())
    param.data.view(-1)[0] += 1.0
    assert weights_digest(with_one_change)[0] != weights_digest(model)[0]
    assert weights_digest(model)[1] == sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )


@pytest.mark.unit
def test_the_client_refuses_an_answer_that_names_another_or_no_model():
    rs.check_model("", "")  # asked for the default: anything goes
    rs.check_model("esmc-600m", "esmc-600m")
    with pytest.raises(ESMCError) as none:
        rs.check_model("esmc-600m", "")  # a server that predates model selection
    assert none.value.code == "FAILED_PRECONDITION" and "predates" in none.value.message
    with pytest.raises(ESMCError) as other:
        rs.check_model("esmc-600m", "esmc-300m")
    assert other.value.code == "FAILED_PRECONDITION" and "'esmc-300m'" in other.value.message
    with pytest.raises(ESMCError):
        rs.check_info("esmc-600m", pb.InfoResponse(model_name="esmc-300m"))  # no models listed


# -- a real server ------------------------------------------------------------------------


def test_every_answer_names_the_model_its_weights_and_dtype(served, model):
    sha, nbytes = weights_digest(model)
    with ESMCClient(served.target) as client:
        default = client.logits(SEQUENCE)
        named = client.logits(SEQUENCE, model=NAME)
        info = client.info()
    assert default.metadata.model == NAME and named.metadata.model == NAME
    assert named.metadata.weights_sha256 == sha and named.metadata.dtype == "float32"
    assert named.metadata.server_version == info.server_version != ""
    np.testing.assert_array_equal(default.logits.sequence, named.logits.sequence)
    (listed,) = info.models
    assert (listed.name, listed.is_default, listed.weights_sha256) == (NAME, True, sha)
    assert listed.weights_bytes == nbytes and listed.d_model == 64 and listed.n_layers == 3
    assert listed.devices == ("cpu",)


def test_every_call_of_a_client_names_its_model(served):
    with ESMCClient(served.target, model=NAME) as client:
        assert client.logits(SEQUENCE).metadata.model == NAME
        assert client.forward_and_sample("MK__L", seed=1).metadata.model == NAME
        assert client.generate("MK__L", seed=1).sequence.startswith("MK")
        (embedded,) = client.embed([SEQUENCE])
        assert embedded.ok and embedded.metadata.model == NAME
        assert client.score(SEQUENCE, ["K2A"]).metadata.model == NAME
        plls = client.pseudo_log_likelihood(["MKTAY", "MKT"])
        assert [p.metadata.model for p in plls] == [NAME, NAME]
        assert client.info().models[0].name == NAME


@pytest.mark.parametrize(
    "call",
    ["info", "logits", "forward_and_sample", "generate", "score", "pseudo_log_likelihood"],
)
def test_an_unknown_model_is_not_found_naming_the_served_one(served, call):
    with ESMCClient(served.target, model="esmc-600m") as client:
        arguments = {
            "info": (), "logits": (SEQUENCE,), "forward_and_sample": ("MK__L",),
            "generate": ("MK__L",), "score": (SEQUENCE, ["K2A"]),
            "pseudo_log_likelihood": (SEQUENCE,),
        }[call]
        with pytest.raises(ESMCError) as refused:
            getattr(client, call)(*arguments)
    assert refused.value.code == "NOT_FOUND"
    assert "'esmc-600m'" in refused.value.message and f"'{NAME}'" in refused.value.message


def test_an_unknown_model_fails_each_streamed_id_not_found(served):
    with ESMCClient(served.target) as client:
        (embedded,) = client.embed([SEQUENCE], model="esmc-600m")
        plls = ESMCClient(served.target, model="esmc-600m").pseudo_log_likelihood(["MKT", "MK"])
        per_call = client.logits(SEQUENCE, model="")  # the default, named by nobody
    assert embedded.error.code == "NOT_FOUND" and f"'{NAME}'" in embedded.error.message
    assert [p.error.code for p in plls] == ["NOT_FOUND", "NOT_FOUND"]
    assert per_call.metadata.model == NAME


def test_the_raw_stub_sees_not_found_with_its_status(served):
    from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc

    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.ESMCStub(channel)
        request = pb.LogitsRequest(protein=pb.ESMProtein(sequence=SEQUENCE), model="nope")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Logits(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
