"""Loading weights: the three published layouts, files and repo-like directories, the hub
through its cache, defaults, and an error that says what to do for every failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from esmc import ESMC, ESMCConfig
from esmc.checkpoints import locate
from esmc.weights import WeightsError, hub_error, load_pretrained, save_safetensors
from helpers.checkpoints import (
    legacy_state_dict,
    populate_hub_cache,
    research_state_dict,
    transformers_state_dict,
    write_legacy_repo,
    write_research_repo,
    write_sharded,
    write_transformers_repo,
)
from helpers.models import encode_all, pad, random_model, random_sequences

pytestmark = pytest.mark.model
SMALL = ESMCConfig(d_model=128, n_heads=2, n_layers=2, name="test-small")


@pytest.fixture(scope="module")
def source() -> ESMC:
    return random_model(SMALL, seed=5)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return pad(encode_all(random_sequences([3, 11, 24], seed=5)))


def outputs(model: ESMC, batch: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(batch)
    return [out.sequence_logits, out.embeddings, out.hidden_states]


def assert_identical(loaded: ESMC, source: ESMC, batch: torch.Tensor) -> None:
    """Same shape, same tensors bit for bit, same outputs bit for bit."""
    c = loaded.config
    assert (c.d_model, c.n_heads, c.n_layers) == (SMALL.d_model, SMALL.n_heads, SMALL.n_layers)
    theirs = source.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key
    for ours, expected in zip(outputs(loaded, batch), outputs(source, batch)):
        assert torch.equal(ours, expected)


# -- the three layouts, as directories laid out like the hub repos -------------------------------


@pytest.mark.parametrize("with_config", [False, True], ids=["shapes-from-tensors", "config-json"])
def test_legacy_pth_repo_directory(source, batch, tmp_path, with_config):
    pth = write_legacy_repo(source, tmp_path, with_config=with_config)
    assert pth.relative_to(tmp_path).as_posix() == "data/weights/esmc_test_2024_12_v0.pth"
    assert_identical(load_pretrained(tmp_path), source, batch)


@pytest.mark.parametrize("shards", [1, 3])
def test_research_safetensors_directory(source, batch, tmp_path, shards):
    write_research_repo(source, tmp_path, shards=shards)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["d_model"] == SMALL.d_model and "hidden_size" not in config
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shards > 1)
    assert_identical(load_pretrained(tmp_path), source, batch)


def test_research_layout_carries_extra_state(source):
    state = research_state_dict(source)
    extra = [k for k in state if k.endswith("_extra_state")]
    assert len(extra) == 3 * SMALL.n_layers
    assert "esmc.transformer.blocks.0.attn.layernorm_qkv.layer_norm_weight" in state
    assert state["lm_head.3.weight"].shape == (64, SMALL.d_model)


def test_transformers_sharded_directory(source, batch, tmp_path):
    write_transformers_repo(source, tmp_path, max_shard_size="300KB")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_size"] == SMALL.d_model and "d_model" not in config
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "esmc.layers.0.self_attn.v_proj.weight" in index["weight_map"]
    assert_identical(load_pretrained(tmp_path), source, batch)


# -- single files ------------------------------------------------------------------------------


def test_pth_file_path(source, batch, tmp_path):
    pth = write_legacy_repo(source, tmp_path)
    assert_identical(load_pretrained(pth), source, batch)
    assert_identical(load_pretrained(str(pth)), source, batch)


def test_safetensors_file_path(source, batch, tmp_path):
    write_research_repo(source, tmp_path)
    assert_identical(load_pretrained(tmp_path / "model.safetensors"), source, batch)


def test_save_safetensors_round_trip(source, batch, tmp_path):
    path = tmp_path / "esmc-small.safetensors"
    save_safetensors(source, path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"d_model": 128, "n_heads": 2, "n_layers": 2}
    assert_identical(load_pretrained(path), source, batch)


# -- the hub, through its cache (offline, a real huggingface_hub) --------------------------------

HUB_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from esmc.weights import WeightsError, load_pretrained
    batch = torch.load(sys.argv[1])
    results = {}
    for name in sys.argv[3:]:
        try:
            model = load_pretrained(name)
        except WeightsError as exc:
            results[name] = str(exc)
            continue
        with torch.no_grad():
            results[name] = (model.config, model(batch).sequence_logits)
    torch.save(results, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def hub_results(source, batch, tmp_path_factory):
    """Run load_pretrained in a fresh process with HF_HUB_OFFLINE=1 and a cache of our own.

    The cache holds the legacy 300m repo (with this tiny model's weights in its .pth) and a
    transformers-layout repo; other names are not cached.
    """
    root = tmp_path_factory.mktemp("hub")
    cache = root / "home" / "hub"
    write_legacy_repo(source, root / "legacy", name="esmc_300m_2024_12_v0")
    populate_hub_cache(cache, "EvolutionaryScale/esmc-300m-2024-12", root / "legacy")
    write_transformers_repo(source, root / "transformers")
    populate_hub_cache(cache, "test-org/esmc-small", root / "transformers")
    torch.save(batch, root / "batch.pt")
    names = ["esmc-300m", "test-org/esmc-small", "test-org/never-downloaded", "esmc-6b"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(root / "home"), HF_HUB_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, root / "batch.pt", root / "out.pt", *names],
        env=env, check=True, timeout=300,
    )
    return torch.load(root / "out.pt", weights_only=False)


@pytest.mark.parametrize("name", ["esmc-300m", "test-org/esmc-small"])
def test_hub_names_load_from_the_cache(hub_results, source, batch, name):
    config, logits = hub_results[name]
    assert (config.d_model, config.n_layers) == (SMALL.d_model, SMALL.n_layers)
    assert config.name == name
    assert torch.equal(logits, outputs(source, batch)[0])


@pytest.mark.parametrize("name", ["test-org/never-downloaded", "esmc-6b"])
def test_offline_and_not_cached_says_what_to_do(hub_results, name):
    message = hub_results[name]
    repo = "biohub/ESMC-6B" if name == "esmc-6b" else name
    assert f"{repo} is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message
    assert "pass a local path" in message


def test_gated_repo_error_says_how_to_authenticate():
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    url = "https://huggingface.co/api/models/biohub/ESMC-6B"
    response = httpx2.Response(401, request=httpx2.Request("GET", url))
    gated = hub_error("biohub/ESMC-6B", None, GatedRepoError("restricted", response=response))
    assert isinstance(gated, WeightsError)
    message = str(gated)
    assert "gated" in message
    assert "huggingface-cli login" in message and "HF_TOKEN" in message and "token=" in message
    missing = hub_error("biohub/nope", None, RepositoryNotFoundError("404", response=response))
    assert "was not found on the Hugging Face hub" in str(missing)


# -- errors ------------------------------------------------------------------------------------


def write_pth(tmp_path, state: dict) -> None:
    path = tmp_path / "data" / "weights" / "broken.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)


def test_missing_key(source, tmp_path):
    state = legacy_state_dict(source)
    del state["transformer.blocks.1.ffn.3.weight"]
    write_pth(tmp_path, state)
    with pytest.raises(WeightsError) as info:
        load_pretrained(tmp_path)
    assert "missing keys (1): transformer.blocks.1.ffn.3.weight" in str(info.value)


def test_unexpected_key(source, tmp_path):
    state = legacy_state_dict(source)
    state["extra.weight"] = torch.zeros(3)
    write_pth(tmp_path, state)
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): extra\.weight"):
        load_pretrained(tmp_path)


def test_wrong_shape(source, tmp_path):
    state = legacy_state_dict(source)
    state["sequence_head.0.bias"] = torch.zeros(129)
    write_pth(tmp_path, state)
    with pytest.raises(WeightsError) as info:
        load_pretrained(tmp_path)
    assert "sequence_head.0.bias: expected (128,), got (129,)" in str(info.value)


def test_config_json_that_contradicts_the_tensors(source, tmp_path):
    write_research_repo(source, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 128, "n_heads": 2, "n_layers": 3}))
    with pytest.raises(WeightsError) as info:
        load_pretrained(tmp_path)
    assert "missing keys" in str(info.value) and "transformer.blocks.2." in str(info.value)
    assert "config.json matches its tensors" in str(info.value)


def test_incomplete_packed_projection(source, tmp_path):
    state = transformers_state_dict(source)
    del state["esmc.layers.1.self_attn.v_proj.weight"]
    write_sharded(state, tmp_path, shards=2)
    with pytest.raises(WeightsError) as info:
        load_pretrained(tmp_path)
    assert "transformer.blocks.1.attn.layernorm_qkv.1.weight is packed from 3" in str(info.value)


def test_not_an_esmc_checkpoint(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="not an ESMC checkpoint"):
        load_pretrained(tmp_path)


def test_missing_shard(source, tmp_path):
    write_research_repo(source, tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="shards that are missing: model-00002-of-00002"):
        load_pretrained(tmp_path)


def test_unknown_name():
    with pytest.raises(WeightsError) as info:
        load_pretrained("esmc-3b")
    assert "unknown model 'esmc-3b'" in str(info.value)
    assert "esmc-300m" in str(info.value) and "esmc-tiny" in str(info.value)


@pytest.mark.parametrize("path", ["/nonexistent/esmc/weights.pth", "./missing.safetensors"])
def test_file_not_found(path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_pretrained(path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no weights in"):
        load_pretrained(tmp_path)


def test_shipped_weights_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(locate, "SHIPPED_DIR", tmp_path)
    with pytest.raises(WeightsError) as info:
        load_pretrained("esmc-tiny")
    assert "shipped esmc-tiny weights are missing" in str(info.value)
    assert "python -m esmc.training.train_tiny" in str(info.value)


def test_shipped_tiny_model_loads():
    model = load_pretrained("esmc-tiny")
    assert model.config == ESMCConfig(d_model=192, n_heads=3, n_layers=4, name="esmc-tiny")
    assert not model.training


# -- defaults ----------------------------------------------------------------------------------


def test_defaults_on_cpu_are_float32_eval(source, tmp_path):
    write_research_repo(source, tmp_path)
    model = load_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training


def test_dtype_and_device_are_honoured(source, batch, tmp_path):
    write_transformers_repo(source, tmp_path)
    model = load_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.device == torch.device("cpu")
    expected = source.state_dict()["embed.weight"].to(torch.bfloat16)
    assert torch.equal(model.embed.weight, expected)
