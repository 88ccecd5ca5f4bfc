"""The vLLM model-directory writer and the plugin's log q, without vLLM (runs in the default suite)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_math import alpha_reference, log_q, log_softmax
from safetensors.torch import load_file

from optimal_sampling import MixConfig
from optimal_sampling.integrations.vllm import ARCHITECTURE, write_vllm_model_dir
from optimal_sampling.integrations.vllm.model_dir import PLACEHOLDER_FILE
from optimal_sampling.integrations.vllm.settings import BLOCK_KEY, PluginSettings, mixed_logprobs

MIX = MixConfig(
    alpha_method="ess_balance", alpha_min=0.2, alpha_max=0.9, constraint_to_target=True, target_top_k=40
)


@pytest.fixture(scope="module")
def written(tiny_pair, tmp_path_factory):
    base, teacher = tiny_pair("qwen2", teacher_width=320)
    out = write_vllm_model_dir(base, teacher, tmp_path_factory.mktemp("vllm") / "model", MIX, temperature=0.7)
    return base, teacher, out


def test_config_names_the_architecture_and_references_both_checkpoints(written):
    base, teacher, out = written
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    block = config[BLOCK_KEY]
    assert block["base"]["path"] == str(Path(base).resolve())
    assert block["teacher"]["path"] == str(Path(teacher).resolve())
    assert Path(block["base"]["path"]).is_absolute() and Path(block["teacher"]["path"]).is_absolute()
    assert block["base"]["config"] == json.loads((Path(base) / "config.json").read_text())
    assert block["teacher"]["config"]["num_hidden_layers"] == 3
    assert not any(p.suffix == ".safetensors" and p.name != PLACEHOLDER_FILE for p in out.iterdir())


def test_settings_round_trip_and_shared_vocabulary(written, tiny_tokenizer):
    _, _, out = written
    config = json.loads((out / "config.json").read_text())
    settings = PluginSettings.from_block(config[BLOCK_KEY])
    assert settings.mix == MIX and settings.temperature == 0.7
    assert settings.vocab_size == config["vocab_size"] == len(tiny_tokenizer)  # teacher head padded to 320
    assert settings.teacher.config["vocab_size"] == 320


def test_tokenizer_generation_config_and_placeholder(written, tiny_tokenizer):
    _, _, out = written
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(generation) <= {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"}
    assert tiny_tokenizer.eos_token_id in generation["eos_token_id"]
    assert list(load_file(str(out / PLACEHOLDER_FILE))) == ["optimal_sampling.placeholder"]


def test_rewriting_our_directory_is_allowed_but_not_a_foreign_one(written, tmp_path):
    base, teacher, out = written
    assert write_vllm_model_dir(base, teacher, out, MIX, temperature=0.7) == out
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_vllm_model_dir(base, teacher, tmp_path)
    write_vllm_model_dir(base, teacher, tmp_path, overwrite=True)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_mixing_temperature_must_be_positive(tiny_pair, tmp_path, temperature):
    base, teacher = tiny_pair("qwen2")
    with pytest.raises(ValueError, match="temperature"):
        write_vllm_model_dir(base, teacher, tmp_path / "m", temperature=temperature)


def test_a_missing_checkpoint_is_refused(tiny_pair, tmp_path):
    base, _ = tiny_pair("qwen2")
    with pytest.raises(ValueError, match="model path not found"):
        write_vllm_model_dir(base, tmp_path / "missing", tmp_path / "m")


@pytest.mark.parametrize("method", ["kl_symmetry", "reverse_kl_symmetry", "ess_balance", "entropy", "fixed"])
def test_mixed_logprobs_equal_the_float64_reference(method):
    """compute_logits' math: log q on the shared prefix of two padded heads, at temperature 0.8."""
    gen = torch.Generator().manual_seed(0)
    logits_b, logits_t = torch.randn(3, 70, generator=gen) * 3, torch.randn(3, 64, generator=gen) * 3
    mix = MixConfig(alpha_method=method, alpha_min=0.1, alpha_max=0.95, fixed_alpha=0.3)
    got = mixed_logprobs(logits_b, logits_t, 60, mix, 0.8)
    assert got.shape == (3, 60) and got.dtype == torch.float32
    for row in range(3):
        lp_b = log_softmax(logits_b[row, :60].double().numpy() / 0.8)
        lp_t = log_softmax(logits_t[row, :60].double().numpy() / 0.8)
        alpha = alpha_reference(lp_b, lp_t, method, 0.1, 0.95, fixed=0.3)
        np.testing.assert_allclose(got[row].numpy(), log_q(lp_b, lp_t, alpha), atol=2e-5)


def test_importing_the_plugin_package_does_not_import_vllm():
    code = "import sys, optimal_sampling.integrations.vllm; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_entry_writes_the_directory(tiny_pair, tmp_path, capsys):
    from optimal_sampling.cli.commands import vllm_model

    base, teacher = tiny_pair("qwen2")
    args = argparse.Namespace(
        base=base, teacher=teacher, out=str(tmp_path / "m"), temperature=0.9, overwrite=False,
        alpha_method="entropy", fixed_alpha=0.5, alpha_min=0.1, alpha_max=1.0,
        constraint_to_target=False, target_top_k=-1, target_top_p=1.0,
    )  # fmt: skip
    assert vllm_model(args) == 0
    block = json.loads((tmp_path / "m" / "config.json").read_text())[BLOCK_KEY]
    assert block["mix"]["alpha_method"] == "entropy" and block["temperature"] == 0.9
    assert "vllm serve" in capsys.readouterr().out
