"""Drawing tokens from q: greedy, or a two-level Gumbel-max with counter-based noise.

The draw: the vocabulary is cut into DRAW_CHUNKS chunks of `draw_chunk(V)` tokens (fixed per
vocabulary, whatever the batch); a Gumbel-max over the chunks' log-masses picks a chunk, and a
Gumbel-max over that chunk's tokens picks the token. The max of Gumbel-perturbed log-masses is
itself Gumbel with the log of the summed mass, so this is exactly a draw from q; a fused sampler
then needs per-token noise for one chunk only (one pass over the vocabulary sums the chunks'
masses, with no hash or log per token). As with a one-level Gumbel-max, a token changes only
where two perturbed keys (nearly) tie, so tiny numeric differences between engines rarely move it.

The noise for index i of a request at generation step t is a pure function of (request seed, t,
i): a request gets the same tokens whatever batch, slot or engine it runs in, and no generator
state is carried between steps (no host sync, graph-capturable). Tokens use i = token id, chunks
i = CHUNK_NOISE + chunk. The hash is a 32-bit integer mixer evaluated in int64 without overflow;
uniforms have 23 bits, (k + 1/2) / 2**23, all exact in float32 and strictly inside (0, 1). (With
24 bits the top value rounded to 1.0, whose Gumbel noise is +inf: about 1 % of draws over a 150k
vocabulary took that token whatever its q.)
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31 keep every product of a 32-bit value under 2**63 (no int64 overflow).
_M1, _M2 = 0x7FEB352D, 0x2C1B3C6D


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one (prompt, sample) request, independent of batching."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


DRAW_CHUNKS = 64  # chunks of the vocabulary in the two-level draw
DRAW_ALIGN = 256  # chunk sizes are whole blocks of the fused sampler
CHUNK_NOISE = 1 << 30  # noise index of chunk 0 (above every token id, so the streams never meet)


def draw_chunk(vocab: int) -> int:
    """Tokens per chunk of the two-level draw: DRAW_CHUNKS chunks of whole DRAW_ALIGN blocks."""
    return -(-vocab // (DRAW_CHUNKS * DRAW_ALIGN)) * DRAW_ALIGN


def row_keys(row_seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] int64 in [0, 2**32): the noise key of each row's draw (request seed, step)."""
    return mix32((mix32(row_seeds & _MASK32) ^ (steps & _MASK32)) & _MASK32)


def noise_uniforms(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniforms for noise indices index [B, n] of rows with keys rows [B] -> float32 [B, n]."""
    token = mix32(index * 0x9E37 & _MASK32)
    return uniform_of_bits(mix32(mix32(rows.unsqueeze(-1) ^ token) ^ rows.unsqueeze(-1)))


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def uniform_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2**32)) -> float32 uniforms (k + 1/2) / 2**23 from their top 23 bits."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def sample_tokens(
    lp_q: torch.Tensor, greedy: bool, row_seeds: torch.Tensor | None = None, steps: torch.Tensor | None = None
) -> torch.Tensor:
    """argmax q (greedy) or a two-level Gumbel-max draw from q (module docstring); int64 [B]."""  # lp_q: [B, V]
    if greedy:
        return lp_q.argmax(dim=-1)
    batch, vocab = lp_q.shape
    chunk = draw_chunk(vocab)
    padded = torch.nn.functional.pad(lp_q.float(), (0, DRAW_CHUNKS * chunk - vocab), value=float("-inf"))
    rows = row_keys(row_seeds, steps)
    chunks = torch.arange(DRAW_CHUNKS, device=lp_q.device, dtype=torch.int64).expand(batch, DRAW_CHUNKS)
    masses = torch.logsumexp(padded.view(batch, DRAW_CHUNKS, chunk), dim=-1)  # -inf: nothing to draw there
    picked = (masses + gumbel(noise_uniforms(rows, CHUNK_NOISE + chunks))).argmax(dim=-1, keepdim=True)
    index = picked * chunk + torch.arange(chunk, device=lp_q.device, dtype=torch.int64)  # [B, chunk]
    keys = padded.gather(1, index) + gumbel(noise_uniforms(rows, index))
    return index.gather(1, keys.argmax(dim=-1, keepdim=True)).squeeze(-1)
