"""The official esm SDK's local API on ``esmc.ESMC`` (issue 10, local parity).

The headline test runs one user script twice, unchanged except for its ``ESMC`` import:
once with ``from esm.models.esmc import ESMC`` and once with ``from esmc import ESMC``. Both
load ``ESMC.from_pretrained("esmc_300m")`` from the same checkpoint: random weights of the
300m shape (the official loader builds that shape and loads strictly) in an offline Hugging
Face cache laid out as the EvolutionaryScale repo, so both resolve the name themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from esmc import CONFIGS, ESMC, ESMProteinError, get_config
from esmc import types as esmc_types
from esmc.config import OFFICIAL_NAMES
from esmc.tokenizer import encode
from esmc.weights import HUB_CHECKPOINTS
from helpers.checkpoints import populate_hub_cache
from helpers.models import TINY, pad, random_model, reference_esmc, reference_tokenizers, rel_err

pytestmark = pytest.mark.parity
pytest.importorskip("esm")
import esm.sdk  # noqa: E402,F401  (must come before esm.models.esmc: circular import)
from esm.sdk import api as sdk  # noqa: E402
from esm.utils.generation import _sample_per_prompt, iterative_sampling_tokens  # noqa: E402
from esm.utils.sampling import _BatchedESMProteinTensor  # noqa: E402

TOLERANCE = 1e-5

USER_SCRIPT = '''\
import sys

import torch

from esm.models.esmc import ESMC
from esm.sdk.api import ESMProtein, ESMProteinTensor, LogitsConfig
from esm.utils.sampling import _BatchedESMProteinTensor

torch.set_num_threads(1)
model = ESMC.from_pretrained("esmc_300m", device=torch.device("cpu"))
sequences = ["MKTAYIAKQRQISFVKSHFSRQ", "MSHHWGYGKHNGPEHWHKDFPIAKGE", "AC_DE|KLM"]
out = {}
tokens = []
for i, sequence in enumerate(sequences):
    protein_tensor = model.encode(ESMProtein(sequence=sequence))
    tokens.append(protein_tensor.sequence)
    config = LogitsConfig(sequence=True, return_embeddings=True, return_hidden_states=True)
    output = model.logits(protein_tensor, config)
    out[f"tokens{i}"] = protein_tensor.sequence
    out[f"logits{i}"] = output.logits.sequence
    out[f"embeddings{i}"] = output.embeddings
    out[f"hidden{i}"] = output.hidden_states
    batch = ESMProteinTensor(sequence=protein_tensor.sequence[None])
    out[f"decoded{i}"] = model.decode(batch).sequence
batch = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True, padding_value=1)
output = model.logits(_BatchedESMProteinTensor(sequence=batch), LogitsConfig(
    sequence=True, return_hidden_states=True, ith_hidden_layer=7))
out["batch_logits"] = output.logits.sequence
out["batch_hidden"] = output.hidden_states
out["batch_embeddings"] = output.embeddings
torch.save(out, sys.argv[1])
'''
OUR_IMPORT = "from esmc import ESMC"


@pytest.fixture(scope="module")
def script_outputs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("sdk_script")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ESMC(CONFIGS["esmc-300m"]).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}  # random 300m weights in bf16 (half the bytes); norm scales around 1
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator).mul_(0.05).to(torch.bfloat16)
        state[name] = noise.add_(1.0) if len(shape) == 1 and name.endswith("weight") else noise
    snapshot = populate_hub_cache(root / "hub", "EvolutionaryScale/esmc-300m-2024-12", None)
    (snapshot / "data" / "weights").mkdir(parents=True)
    torch.save(state, snapshot / "data" / "weights" / "esmc_300m_2024_12_v0.pth")
    del state
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(root / "hub"), HF_HUB_OFFLINE="1")
    ours = USER_SCRIPT.replace("from esm.models.esmc import ESMC", OUR_IMPORT)
    assert ours.count("\n") == USER_SCRIPT.count("\n") and ours != USER_SCRIPT
    runs = {}
    for name, text in (("reference", USER_SCRIPT), ("ours", ours)):  # side by side
        (root / f"{name}.py").write_text(text)
        command = [sys.executable, str(root / f"{name}.py"), str(root / f"{name}.pt")]
        runs[name] = subprocess.Popen(command, env=env)
    for name, run in runs.items():
        assert run.wait(timeout=300) == 0, name
    return {name: torch.load(root / f"{name}.pt", weights_only=False) for name in runs}


def test_official_script_gives_the_same_numbers_with_only_the_import_changed(script_outputs):
    reference, ours = script_outputs["reference"], script_outputs["ours"]
    assert sorted(reference) == sorted(ours)
    for key, want in reference.items():
        got = ours[key]
        if want is None or isinstance(want, str):
            assert got == want, key
        elif want.dtype == torch.long:
            assert torch.equal(got, want), key
        else:
            assert got.shape == want.shape, (key, got.shape, want.shape)
            assert got.dtype == want.dtype
            assert rel_err(got, want) <= TOLERANCE, (key, rel_err(got, want))
    assert ours["logits0"].shape == (1, 24, 64)  # batch dimension as the reference
    assert ours["hidden0"].shape == (30, 1, 24, 960)
    assert ours["batch_hidden"].shape == (1, 3, 28, 960)  # ith_hidden_layer=7 -> [7:8]
    assert ours["decoded2"] == "AC_DE|KLM"


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("official", "ours"),
    [
        ("esmc_300m", "esmc-300m"),
        ("esmc_600m", "esmc-600m"),
        ("esmc-300m-2024-12", "esmc-300m"),
        ("esmc-600m-2024-12", "esmc-600m"),
        ("esmc-6b-2024-12", "esmc-6b"),
    ],
)
def test_official_names_are_aliases(official, ours, monkeypatch):
    assert OFFICIAL_NAMES[official] == ours
    assert get_config(official) == CONFIGS[ours]
    import esmc.checkpoints.locate as locate
    from esmc.weights import WeightsError

    asked = []

    def fake_download(repo_id, **kwargs):
        asked.append(repo_id)
        raise WeightsError("stop here")

    monkeypatch.setattr(locate, "download", fake_download)
    with pytest.raises(WeightsError, match="stop here"):
        ESMC.from_pretrained(official, torch.device("cpu"))
    assert asked == [HUB_CHECKPOINTS[ours].repo_id]


# -- the methods, on the same tiny weights as the reference ----------------------------------


@pytest.fixture(scope="module")
def models():
    ours = random_model(TINY, seed=3)
    return reference_esmc(TINY, ours.state_dict()), ours


@pytest.fixture(scope="module")
def tokenizers():
    return reference_tokenizers()


@pytest.fixture(autouse=True)
def quiet_reference(monkeypatch):
    monkeypatch.setenv("DISABLE_ITERATIVE_SAMPLING_TQDM", "1")


def test_encode_and_decode_follow_the_input_family(models):
    reference, ours = models
    protein = sdk.ESMProtein(sequence="MK_T<mask>A|CXB")
    tensor = ours.encode(protein)
    assert isinstance(tensor, sdk.ESMProteinTensor)
    assert torch.equal(tensor.sequence, reference.encode(protein).sequence)
    assert ours.encode(sdk.ESMProtein()).sequence is None
    batched = sdk.ESMProteinTensor(sequence=tensor.sequence[None])
    assert ours.decode(batched) == reference.decode(batched)
    assert ours.decode(tensor).sequence == "MK_T_A|CXB"  # 1-D too (the reference asserts 2-D)
    mine = ours.encode(esmc_types.ESMProtein(sequence="MKV"))
    assert isinstance(mine, esmc_types.ESMProteinTensor)
    assert mine.sequence.tolist() == [0, 20, 15, 7, 2]
    assert isinstance(ours.decode(mine), esmc_types.ESMProtein)


def test_logits_takes_single_batched_raw_and_official_inputs(models):
    reference, ours = models
    tokens = [encode("MKTAYIAKQR"), encode("MSHHW"), encode("AC_DEKLMNPQRSTVW")]
    batch = pad(tokens)
    config = sdk.LogitsConfig(
        sequence=True, return_embeddings=True, return_hidden_states=True, ith_hidden_layer=1
    )
    want = reference.logits(_BatchedESMProteinTensor(sequence=batch), config)
    for given in (_BatchedESMProteinTensor(sequence=batch), sdk.ESMProteinTensor(sequence=batch)):
        got = ours.logits(given, config)
        for name in ("embeddings", "hidden_states"):
            assert getattr(got, name).shape == getattr(want, name).shape
            assert rel_err(getattr(got, name), getattr(want, name)) <= TOLERANCE
        assert rel_err(got.logits.sequence, want.logits.sequence) <= TOLERANCE
    single = ours.logits(tokens[1], sdk.LogitsConfig(sequence=True))  # a bare tensor
    assert single.logits.sequence.shape == (1, 7, 64)
    assert single.embeddings is None and single.hidden_states is None
    expected = reference.logits(sdk.ESMProteinTensor(sequence=tokens[1]), config)
    assert rel_err(single.logits.sequence, expected.logits.sequence) <= TOLERANCE


def test_official_iterative_sampling_runs_with_our_model_as_client(models, tokenizers):
    """esm.utils.generation drives our ESMC exactly as it drives its own."""
    reference, ours = models
    prompts = ["MKT___LL__AC_DE", "_" * 12, "AC|__DE|K_"]

    def run(client):
        torch.manual_seed(7)
        inputs = [sdk.ESMProteinTensor(sequence=encode(p)) for p in prompts]
        configs = [sdk.GenerationConfig(track="sequence", num_steps=4) for _ in prompts]
        return [o.sequence for o in iterative_sampling_tokens(client, inputs, configs, tokenizers)]

    for got, want in zip(run(ours), run(reference)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("strategy", ["random", "entropy"])
def test_generate_with_a_seed_is_the_references_generation_after_manual_seed(
    models, tokenizers, strategy
):
    reference, ours = models
    for i, prompt in enumerate(["MKT___LL__AC_DE", "__M_K__"]):
        fields = dict(track="sequence", num_steps=3, strategy=strategy, temperature=0.8)
        torch.manual_seed(40 + i)
        (want,) = iterative_sampling_tokens(
            reference,
            [sdk.ESMProteinTensor(sequence=encode(prompt))],
            [sdk.GenerationConfig(**fields)],
            tokenizers,
        )
        got = ours.generate(
            sdk.ESMProteinTensor(sequence=encode(prompt)), sdk.GenerationConfig(**fields), 40 + i
        )
        assert isinstance(got, sdk.ESMProteinTensor)
        assert torch.equal(got.sequence, want.sequence)
        protein = ours.generate(sdk.ESMProtein(sequence=prompt), sdk.GenerationConfig(**fields), 40 + i)
        assert isinstance(protein, sdk.ESMProtein)
        assert protein.sequence == ours.decode(want).sequence


def test_batch_generate_returns_errors_in_place_like_the_reference(models):
    _, ours = models
    config = sdk.GenerationConfig(track="sequence", num_steps=2)
    out = ours.batch_generate(
        [sdk.ESMProtein(sequence="MK__V"), sdk.ESMProtein(sequence="MKV")], [config, config]
    )
    assert isinstance(out[0], sdk.ESMProtein) and "_" not in out[0].sequence
    assert isinstance(out[1], sdk.ESMProteinError) and out[1].error_code == 500
    bad = ours.generate(sdk.ESMProtein(sequence="MK_"), sdk.GenerationConfig(track="structure"))
    assert isinstance(bad, sdk.ESMProteinError) and bad.error_code == 400
    mine = ours.generate(esmc_types.ESMProtein(sequence="MKV"), esmc_types.GenerationConfig())
    assert isinstance(mine, ESMProteinError)
    torch.manual_seed(1)
    first = ours.generate(sdk.ESMProtein(sequence="M____"), config)
    torch.manual_seed(1)
    assert ours.generate(sdk.ESMProtein(sequence="M____"), config) == first  # manual_seed repeats
    assert ours.batch_generate([], []) == []


def test_forward_and_sample_matches_the_references_sampler(models, tokenizers):
    """Temperature 0 (argmax): tokens and statistics as esm's own sampling of its logits."""
    reference, ours = models
    tokens = encode("MK_T__AC_DE")
    config = sdk.SamplingConfig(
        sequence=sdk.SamplingTrackConfig(temperature=0.0, topk_logprobs=3, invalid_ids=[4, 20]),
        return_mean_embedding=True,
        structure=sdk.SamplingTrackConfig(),  # a track ESMC lacks: ignored, as the reference
    )
    batched = _BatchedESMProteinTensor(sequence=tokens[None])
    logits = reference.logits(batched, sdk.LogitsConfig(sequence=True, return_embeddings=True))
    track_config = sdk.SamplingConfig(sequence=config.sequence)
    want = _sample_per_prompt(batched, logits, track_config, tokenizers)
    got = ours.forward_and_sample(sdk.ESMProteinTensor(sequence=tokens), config)
    assert isinstance(got, sdk.ForwardAndSampleOutput)
    assert isinstance(got.protein_tensor, sdk.ESMProteinTensor)
    assert torch.equal(got.protein_tensor.sequence, want.protein_tensor.sequence[0])
    for name in ("entropy", "logprob", "top_prob", "topk_logprob"):
        expected = getattr(want, name).sequence[0]
        assert torch.allclose(getattr(got, name).sequence, expected, atol=1e-5), name
    assert torch.equal(got.topk_tokens.sequence, want.topk_tokens.sequence[0])
    assert got.mean_embedding.shape == (TINY.d_model,)
    default = ours.forward_and_sample(sdk.ESMProteinTensor(sequence=tokens), None, seed=0)
    assert (default.protein_tensor.sequence != 32).all()  # default: every mask sampled


async def test_async_twins(models):
    _, ours = models
    tensor = await ours.async_encode(sdk.ESMProtein(sequence="MKV"))
    assert (await ours.async_decode(tensor)).sequence == "MKV"
    out = await ours.async_logits(tensor, sdk.LogitsConfig(sequence=True))
    assert out.logits.sequence.shape == (1, 5, 64)
    assert ours.raw_model is ours
