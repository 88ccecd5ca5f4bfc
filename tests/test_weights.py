"""Live weight updates (issue 17), on the CPU in float32.

- an update with model B's state dict makes a sampler built on A sample exactly (tokens and
  log-probs) what a fresh sampler built on B samples, same seeds: reference and fast engines,
  base and teacher, tied embeddings, from memory (any dtype), from disk (HF directory, sharded
  safetensors, one safetensors file, a .bin) and from a trainer's gloo broadcast;
- a partial update changes only the named tensors (fused q/k/v and gate/up rows included);
- a bad name, shape, dtype, architecture or version is refused naming it, leaving outputs as they were;
- an update during a running generate_iter (same thread between steps, or another thread) applies
  between steps: each sample's per-token versions say where, and the tokens before it are those
  of the old weights; abort_running ends the running requests ("abort") and later ones run on B;
- pause_generation holds the loop, updates still apply, continue_generation resumes it;
- tensor parallelism (2 processes, gloo): the helper receives the update through the proxy.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import build_model, save_random_model
from transformers import AutoConfig, AutoModelForCausalLM

from optimal_sampling import OptimalSampler

PROMPTS = ["def add(a, b):", "The quick brown fox", "What is AI?", "import numpy as np"]
SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def model_b(model_root, tiny_tokenizer):
    """A factory: model_b(arch) -> a directory with another base model of that architecture."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = build_model(model_root / f"{arch}-base-b", tiny_tokenizer, arch, seed=3)
        return built[arch]

    return make


@pytest.fixture(scope="module")
def tied_pair(model_root, tiny_tokenizer):
    """(A, B): two Qwen2 models with tied input and output embeddings."""
    dirs = []
    for seed in (4, 5):
        torch.manual_seed(seed)
        config = AutoConfig.for_model(
            "qwen2", vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            eos_token_id=tiny_tokenizer.eos_token_id,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_config(config)
        dirs.append(save_random_model(model, tiny_tokenizer, model_root / f"qwen2-tied-{seed}"))
    return tuple(str(d) for d in dirs)


def state_dict(path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: t.to(dtype) for name, t in model.state_dict().items()}


def sampler_on(base, teacher, engine: str, **kwargs) -> OptimalSampler:
    return OptimalSampler(str(base), str(teacher), engine=engine, device="cpu", max_batch_size=4, **kwargs)


def outputs(sampler, **kwargs) -> list[tuple]:
    """Tokens and the three log-prob columns of every sample (exact floats)."""
    options = dict(max_tokens=10, n=2, seed=5, temperature=1.0) | kwargs
    out = sampler.generate(PROMPTS, **options)
    return [(s.token_ids, s.logprobs_base, s.logprobs_teacher, s.logprobs_q) for s in out.samples]


# ============================================================================ exact equality


@pytest.mark.parametrize("engine, arch", [("reference", "llama"), ("fast", "llama"), ("fast", "qwen2")])
def test_update_equals_a_fresh_sampler(tiny_pair, model_b, engine, arch):
    base, teacher = tiny_pair(arch)
    sampler = sampler_on(base, teacher, engine)
    before = outputs(sampler)
    weights = state_dict(model_b(arch), torch.float64)  # any dtype: cast on copy (exact for these values)
    assert sampler.update_weights(weights) == 1 == sampler.weight_version
    after = sampler.generate(PROMPTS, max_tokens=10, n=2, seed=5)
    fresh = outputs(sampler_on(model_b(arch), teacher, engine))
    assert [(s.token_ids, s.logprobs_base, s.logprobs_teacher, s.logprobs_q) for s in after.samples] == fresh
    assert fresh != before
    assert all(s.weight_version == 1 and s.weight_versions is None for s in after.samples)
    record = after.samples[0].to_record()
    assert record["weight_version"] == 1 and record["weight_versions"] is None


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_teacher_update_equals_a_fresh_sampler(tiny_pair, model_b, engine):
    base, teacher = tiny_pair("llama", teacher_layers=2)
    sampler = sampler_on(base, teacher, engine)
    sampler.update_weights(state_dict(model_b("llama")).items(), model="teacher")  # pairs, not a dict
    assert outputs(sampler) == outputs(sampler_on(base, model_b("llama"), engine))


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_tied_embeddings_update_under_either_name(tied_pair, engine):
    a, b = tied_pair
    sampler = sampler_on(a, a, engine)
    weights = state_dict(b)
    sampler.update_weights({k: v for k, v in weights.items() if k != "lm_head.weight"})
    assert outputs(sampler) == outputs(sampler_on(b, a, engine))
    fresh = sampler_on(a, a, engine)  # the output embedding's name updates the input one too
    fresh.update_weights({k: v for k, v in weights.items() if k != "model.embed_tokens.weight"})
    assert outputs(fresh) == outputs(sampler)


# ============================================================================ partial and refused updates

PARTIAL = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight")


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_partial_update_changes_only_the_named_tensors(tiny_pair, model_b, engine):
    """On the fast engine k is rows of a fused qkv and up rows of gate_up: q, v and gate stay."""
    base, teacher = tiny_pair("qwen2")
    sampler = sampler_on(base, teacher, engine)
    old, new = state_dict(base), state_dict(model_b("qwen2"))
    sampler.update_weights([(name, new[name]) for name in PARTIAL])
    now = sampler.base.model.state_dict()  # the fast engine computes with these very tensors
    for name, tensor in now.items():
        assert torch.equal(tensor, new[name] if name in PARTIAL else old[name]), name
    if engine == "fast":
        net = sampler.engine.base.net
        layer = net.layers[1]
        k_rows = slice(
            net.spec.heads * net.spec.head_dim, (net.spec.heads + net.spec.kv_heads) * net.spec.head_dim
        )
        assert torch.equal(layer.qkv[k_rows], new[PARTIAL[1]])
        assert torch.equal(layer.qkv[: k_rows.start], old["model.layers.1.self_attn.q_proj.weight"])


def refusals(tiny_pair, model_b) -> list[tuple[object, str]]:
    good = state_dict(model_b("llama"))
    name = "model.layers.0.self_attn.q_proj.weight"
    return [
        (
            [*good.items(), ("model.layers.9.mlp.up_proj.weight", good[name])],
            "model.layers.9.mlp.up_proj.weight",
        ),
        ({**good, name: good[name][:-1]}, name),  # wrong shape, after good tensors
        ({**good, name: good[name].to(torch.int32)}, name),
        (
            {"model.norm.weight": good["model.norm.weight"], "lm_head.weight": torch.zeros(3, 64)},
            "lm_head.weight",
        ),
        (state_dict(tiny_pair("llama")[1]), "model.layers.2"),  # another architecture (3 layers)
    ]


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_refused_update_leaves_outputs_identical(tiny_pair, model_b, engine):
    base, teacher = tiny_pair("llama")
    sampler = sampler_on(base, teacher, engine)
    before = outputs(sampler)
    for weights, named in refusals(tiny_pair, model_b):
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            sampler.update_weights(weights)
    with pytest.raises(ValueError, match="'base' or 'teacher'"):
        sampler.update_weights(state_dict(model_b("llama")), model="student")
    assert sampler.weight_version == 0
    assert outputs(sampler) == before


def test_explicit_versions_must_increase(tiny_pair, model_b):
    sampler = sampler_on(*tiny_pair("llama"), "reference")
    weights = state_dict(model_b("llama"))
    assert sampler.update_weights(weights, weight_version=10) == 10
    with pytest.raises(ValueError, match="exceed the current version 10"):
        sampler.update_weights(weights, weight_version=10)
    assert sampler.update_weights(weights) == 11


# ============================================================================ from disk


def disk_forms(model_dir: Path, tmp: Path) -> dict[str, object]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.save_pretrained(tmp / "sharded", max_shard_size="60KB")
    torch.save(model.state_dict(), tmp / "weights.bin")
    return {
        "directory": model_dir,
        "sharded": tmp / "sharded",
        "file": model_dir / "model.safetensors",
        "files": sorted((tmp / "sharded").glob("*.safetensors")),
        "bin": tmp / "weights.bin",
    }


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_update_from_disk(tiny_pair, model_b, tmp_path, engine):
    base, teacher = tiny_pair("llama")
    expected = outputs(sampler_on(model_b("llama"), teacher, engine))
    forms = disk_forms(model_b("llama"), tmp_path)
    assert len(forms["files"]) > 1
    sampler = sampler_on(base, teacher, engine)
    for version, (form, path) in enumerate(forms.items(), start=1):
        sampler.update_weights(state_dict(base))  # back to A, so every form must do the whole job
        assert sampler.update_weights_from_disk(path) == 2 * version, form
        assert outputs(sampler) == expected, form


def test_update_from_disk_refuses_another_architecture(tiny_pair, tmp_path):
    base, teacher = tiny_pair("llama")
    sampler = sampler_on(base, teacher, "fast")
    before = outputs(sampler)
    with pytest.raises(ValueError, match="num_hidden_layers=3"):
        sampler.update_weights_from_disk(teacher)
    with pytest.raises(ValueError, match="model.layers.2"):  # headers only: refused before reading
        sampler.update_weights_from_disk(Path(teacher) / "model.safetensors")
    with pytest.raises(ValueError, match="not found"):
        sampler.update_weights_from_disk(tmp_path / "missing.safetensors")
    assert outputs(sampler) == before and sampler.weight_version == 0


# ============================================================================ while generating


def versions_of(sample) -> list[int]:
    return sample.weight_versions or [sample.weight_version] * len(sample.token_ids)


def check_split(samples, reference) -> int:
    """Each sample's versions are 0 then 1; its version-0 tokens are the old weights' own tokens.
    Returns how many samples span the update."""
    spanning = 0
    for s in samples:
        versions = versions_of(s)
        assert len(versions) == len(s.token_ids) and versions == sorted(versions) and set(versions) <= {0, 1}
        old = versions.count(0)
        assert s.token_ids[:old] == reference[(s.prompt_index, s.sample_index)][:old]
        spanning += s.weight_versions is not None
        assert s.to_record()["weight_versions"] == s.weight_versions
    return spanning


def by_key(samples) -> dict[tuple[int, int], list[int]]:
    return {(s.prompt_index, s.sample_index): s.token_ids for s in samples}


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_update_between_steps_of_generate_iter(tiny_pair, model_b, engine):
    base, teacher = tiny_pair("llama")
    sampler = sampler_on(base, teacher, engine)
    options = dict(max_tokens=12, n=2, seed=5)
    reference = by_key(sampler.generate(PROMPTS, **options).samples)
    weights = state_dict(model_b("llama"))
    steps = []

    def on_tokens(count: int) -> None:  # between two steps of the loop, in its own thread
        steps.append(count)
        if len(steps) == 4:
            sampler.update_weights(weights)

    samples = list(sampler.generate_iter(PROMPTS, on_tokens=on_tokens, **options))
    assert len(samples) == 8 and check_split(samples, reference) > 0
    assert any(s.weight_version == 1 for s in samples)  # the second wave / refills start on B


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_update_from_another_thread_waits_for_the_running_step(tiny_pair, model_b, engine):
    """The loop's 3rd engine step is slow; an update asked for meanwhile returns only after it,
    and applies before the next step (on the reference engine: after 1 + 3 tokens of each row)."""
    base, teacher = tiny_pair("llama")
    sampler = sampler_on(base, teacher, engine)
    options = dict(max_tokens=12, n=2, seed=5)
    reference = by_key(sampler.generate(PROMPTS, **options).samples)
    weights = state_dict(model_b("llama"))
    inside, ended, calls, results = threading.Event(), [], [], []
    real_step = sampler.engine.step

    def slow_step(*args):
        calls.append(len(calls))
        if len(calls) == 3:
            inside.set()
            time.sleep(0.3)
        pending = real_step(*args)
        if len(calls) == 3:
            ended.append(time.monotonic())
        return pending

    sampler.engine.step = slow_step
    worker = threading.Thread(target=lambda: results.extend(sampler.generate_iter(PROMPTS, **options)))
    worker.start()
    assert inside.wait(30)
    assert sampler.update_weights(weights) == 1
    applied = time.monotonic()
    worker.join(60)
    assert ended and ended[0] <= applied
    assert len(results) == 8 and check_split(results, reference) > 0
    if engine == "reference":
        first_wave = [s for s in results if versions_of(s)[0] == 0]
        assert first_wave and all(versions_of(s).count(0) == 4 for s in first_wave if len(s.token_ids) > 4)


def test_abort_running_ends_running_requests(tiny_pair, model_b):
    """Reference engine, 2 slots: the first wave is aborted at the update (its tokens all drawn
    by A), the second runs wholly on B and equals a fresh sampler's samples."""
    base, teacher = tiny_pair("llama")
    sampler = OptimalSampler(base, teacher, engine="reference", device="cpu", max_batch_size=2)
    options = dict(max_tokens=10, n=1, seed=5)
    reference = by_key(sampler.generate(PROMPTS, **options).samples)
    fresh_sampler = OptimalSampler(
        str(model_b("llama")), teacher, engine="reference", device="cpu", max_batch_size=2
    )
    fresh = by_key(fresh_sampler.generate(PROMPTS, **options).samples)
    weights = state_dict(model_b("llama"))
    steps = []

    def on_tokens(count: int) -> None:
        steps.append(count)
        if len(steps) == 3:
            sampler.update_weights(weights, abort_running=True)

    samples = {
        (s.prompt_index, s.sample_index): s
        for s in sampler.generate_iter(PROMPTS, on_tokens=on_tokens, **options)
    }
    assert len(samples) == 4
    aborted = [s for s in samples.values() if s.finish_reason == "abort"]
    assert len(aborted) == 2
    for s in aborted:
        assert s.weight_version == 0 and s.weight_versions is None
        key = (s.prompt_index, s.sample_index)
        assert 0 < len(s.token_ids) < 10 and s.token_ids == reference[key][: len(s.token_ids)]
        assert len(s.logprobs_q) == len(s.token_ids) and s.to_record()["finish_reason"] == "abort"
    for key, s in samples.items():
        if s.finish_reason != "abort":
            assert s.weight_version == 1 and s.token_ids == fresh[key]


def test_pause_holds_the_loop_and_updates_still_apply(tiny_pair, model_b):
    base, teacher = tiny_pair("llama")
    sampler = sampler_on(base, teacher, "fast")
    produced: list[int] = []
    worker = threading.Thread(
        target=lambda: list(
            sampler.generate_iter(PROMPTS, max_tokens=30, n=2, seed=5, on_tokens=produced.append)
        )
    )
    worker.start()
    while not produced:
        time.sleep(0.01)
    sampler.pause_generation()
    held = len(produced)
    time.sleep(0.3)
    assert len(produced) <= held + 1  # at most the step already past the gate reports
    assert sampler.update_weights(state_dict(model_b("llama"))) == 1
    sampler.continue_generation()
    worker.join(60)
    assert not worker.is_alive() and len(produced) > held + 1


def test_pause_in_the_generating_thread_is_an_error(tiny_pair):
    sampler = sampler_on(*tiny_pair("llama"), "reference")
    sampler.pause_generation()
    with pytest.raises(RuntimeError, match="continue_generation"):
        sampler.generate(PROMPTS, max_tokens=2)
    sampler.continue_generation()
    assert len(sampler.generate(PROMPTS, max_tokens=2)) == 4


# ============================================================================ from a trainer (gloo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(port: int, path: str) -> None:
    """A trainer's rank 0: join the weights group, broadcast every tensor of a state dict."""
    import torch.distributed as dist

    from optimal_sampling.distributed.weights import destroy_weights_group, init_weights_update_group

    torch.set_num_threads(1)
    group = init_weights_update_group("127.0.0.1", port, 0, 2, "weights")
    for tensor in state_dict(path, torch.bfloat16).values():
        dist.broadcast(tensor, group=group.group, group_src=0)
    destroy_weights_group(group)


def test_update_from_a_trainer_broadcast(tiny_pair, model_b):
    from optimal_sampling.distributed.weights import destroy_weights_group, init_weights_update_group

    base, teacher = tiny_pair("llama")
    sampler = sampler_on(base, teacher, "fast")
    sent = state_dict(model_b("llama"), torch.bfloat16)  # what the trainer broadcasts, in order
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(target=trainer, args=(port, str(model_b("llama"))))
    process.start()
    group = init_weights_update_group("127.0.0.1", port, 1, 2, "weights")
    try:
        names, shapes = list(sent), [list(t.shape) for t in sent.values()]
        version = sampler.update_weights_from_distributed(group, names, ["bfloat16"] * len(names), shapes)
    finally:
        destroy_weights_group(group)
        process.join(60)
    assert process.exitcode == 0 and version == 1
    expected = sampler_on(base, teacher, "fast")
    expected.update_weights(sent)  # bfloat16 on the wire: the same rounded weights
    assert outputs(sampler) == outputs(expected)


# ============================================================================ tensor parallelism


@pytest.fixture
def helper_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))


def tp_outputs(base, teacher, weights=None, bad=None) -> tuple[list, str | None]:
    """A TP=2 sampler (one self-started helper): an optional refused update, an optional update,
    then the greedy and sampled outputs; closed after."""
    sampler = OptimalSampler(
        str(base), str(teacher), engine="fast", device="cpu", max_batch_size=4, tp_size=2
    )
    refusal = None
    try:
        if bad is not None:
            with pytest.raises(ValueError) as err:
                sampler.update_weights(bad)
            refusal = str(err.value)
        if weights is not None:
            assert sampler.update_weights(weights) == 1
        return outputs(sampler, temperature=0.0) + outputs(sampler), refusal
    finally:
        sampler.close()


def test_tensor_parallel_update_equals_a_fresh_sampler(tiny_pair, model_b, helper_env):
    """The leader checks before its helper hears of the update, so a refused one reaches no rank."""
    base, teacher = tiny_pair("qwen2")
    weights = state_dict(model_b("qwen2"))
    bad = {**weights, "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64)}
    updated, refusal = tp_outputs(base, teacher, weights, bad)
    assert "model.layers.0.mlp.down_proj.weight" in refusal
    fresh, _ = tp_outputs(model_b("qwen2"), teacher)
    assert updated == fresh


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "tied"])
def test_tensor_parallel_shards_take_their_blocks(tiny_pair, model_b, tied_pair, arch):
    """Each rank's shard of A, updated with B's full tensors, equals its shard cut from B (no
    collective runs: building a shard and copying into it are local)."""
    from optimal_sampling.config import TensorParallel
    from optimal_sampling.engines.fast.tensor_parallel import TensorParallelModel
    from optimal_sampling.engines.weights import load_checked

    a, b = tied_pair if arch == "tied" else (tiny_pair(arch)[0], model_b(arch))
    hf_a, hf_b = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (a, b))
    for rank in (0, 1):
        tp = TensorParallel(2, rank)
        shard_a, shard_b = (TensorParallelModel(m, 64, tp, torch.device("cpu")) for m in (hf_a, hf_b))
        load_checked(shard_a.weight_map(), list(hf_b.state_dict().items()), "base")
        for name in ("embed_tokens", "lm_head", "final_norm"):
            assert torch.equal(getattr(shard_a, name), getattr(shard_b, name)), (rank, name)
        for i, (la, lb) in enumerate(zip(shard_a.layers, shard_b.layers, strict=True)):
            for field, value in vars(la).items():
                assert (value is None) == (vars(lb)[field] is None)
                assert value is None or torch.equal(value, vars(lb)[field]), (rank, i, field)
