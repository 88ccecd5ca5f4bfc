"""Bad input gets a clear ValueError/TypeError before any work is done."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from optimal_sampling import OptimalSampler
from optimal_sampling.config import MixConfig, SamplingParams


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(alpha_method="nope"), ValueError, "alpha_method must be one of"),
        (dict(alpha_min=-0.1), ValueError, "alpha_min must be in [0, 1]"),
        (dict(alpha_max=1.5), ValueError, "alpha_max must be in [0, 1]"),
        (dict(alpha_min=0.9, alpha_max=0.6), ValueError, "must not exceed"),
        (dict(fixed_alpha="x"), TypeError, "fixed_alpha must be a number"),
        (dict(target_top_k=0), ValueError, "target_top_k"),
        (dict(target_top_p=0.0), ValueError, "target_top_p"),
    ],
)
def test_mix_config_errors(kwargs, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        MixConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
        (dict(max_tokens=0), ValueError, "max_tokens must be at least 1"),
        (dict(max_tokens=2.5), TypeError, "max_tokens must be an integer"),
        (dict(n=0), ValueError, "n must be at least 1"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(stop=("",)), TypeError, "stop must be"),
    ],
)
def test_sampling_params_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def sampler(tiny_pair):
    base, teacher = tiny_pair("llama")
    return OptimalSampler(base, teacher, engine="reference", device="cpu")


def test_generate_errors(sampler):
    with pytest.raises(ValueError, match="prompts must not be empty"):
        sampler.generate([])
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        sampler.generate([1, 2])
    with pytest.raises(ValueError, match="teacher_prompts has 1 entries but prompts has 2"):
        sampler.generate(["a", "b"], teacher_prompts=["a"])
    with pytest.raises(ValueError, match="prompt 0 has .* tokens; the models' context is 256"):
        sampler.generate(["word " * 400])
    with pytest.raises(ValueError, match="prompt 1 is empty after tokenization"):
        sampler.generate(["a", ""])
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        sampler.generate(["a"], max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampler.generate(["a"], temperature=-0.5)


def test_constructor_errors(tiny_pair, tmp_path):
    base, teacher = tiny_pair("llama")
    with pytest.raises(ValueError, match="give both model_base and model_teacher"):
        OptimalSampler(base, None)
    with pytest.raises(ValueError, match="model path not found"):
        OptimalSampler(base, str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        OptimalSampler(base, str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="engine must be"):
        OptimalSampler(base, teacher, engine="turbo")
    with pytest.raises(ValueError, match="GGUF file not found"):
        OptimalSampler(base, str(tmp_path / "x.gguf"), device="cpu")


def test_incompatible_tokenizers_name_the_first_differing_token(tiny_pair, tmp_path):
    import shutil

    base, teacher = tiny_pair("llama")
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    vocab = tok.get_vocab()
    inv = {i: t for t, i in vocab.items()}
    a, b = inv[100], inv[101]
    data = (other / "tokenizer.json").read_text()
    import json

    spec = json.loads(data)
    spec["model"]["vocab"][a], spec["model"]["vocab"][b] = 101, 100
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizers are not compatible: id 100 is"):
        OptimalSampler(base, str(other), device="cpu")
