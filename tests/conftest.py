"""Tiny random models and a tiny byte-level BPE tokenizer, built once per test session.

Every pair shares the tokenizer (so the vocabularies are compatible) and differs in weights, so
base and teacher disagree and alpha is non-trivial.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "What is AI? Artificial intelligence is the study of agents that act well.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n",
    "Hello world! Optimal sampling mixes two language models token by token.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<pad>"]
VOCAB = 300


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(out_dir)
    return fast


ARCH = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=16),
    "mistral": dict(model_type="mistral", num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2"),
}


def build_model(
    out_dir: Path, tokenizer, arch: str, seed: int, layers: int = 2, logit_width: int | None = None
):
    torch.manual_seed(seed)
    spec = dict(ARCH[arch])
    model_type = spec.pop("model_type")
    width = logit_width or len(tokenizer)
    if model_type == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", vocab_size=width, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
            bos_token_id=0, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    else:
        config = AutoConfig.for_model(
            model_type, vocab_size=width, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id, **spec,
        )  # fmt: skip
    return save_random_model(AutoModelForCausalLM.from_config(config), tokenizer, out_dir)


def save_random_model(model, tokenizer, out_dir: Path) -> Path:
    """Re-initialise model's weights, give it both EOS ids, save it with the tokenizer."""
    # Larger weights than the default init give peaked, diverse next-token distributions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in SPECIALS[:2]],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_tokenizer(model_root):
    return build_tokenizer(model_root / "tokenizer")


@pytest.fixture(scope="session")
def tiny_pair(model_root, tiny_tokenizer):
    """A factory: tiny_pair(arch) -> (base_dir, teacher_dir), built once per architecture."""
    built: dict = {}

    def make(arch: str = "llama", teacher_layers: int = 3, teacher_width: int | None = None):
        key = (arch, teacher_layers, teacher_width)
        if key not in built:
            base = build_model(model_root / f"{arch}-base", tiny_tokenizer, arch, seed=1)
            name = f"{arch}-teacher-{teacher_layers}-{teacher_width}"
            teacher = build_model(
                model_root / name,
                tiny_tokenizer,
                arch,
                seed=2,
                layers=teacher_layers,
                logit_width=teacher_width,
            )
            built[key] = (str(base), str(teacher))
        return built[key]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
