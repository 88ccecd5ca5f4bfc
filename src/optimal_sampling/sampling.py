"""Drawing tokens from q: greedy, or Gumbel-max with counter-based noise.

The noise for token v of a request at generation step t is a pure function of
(request seed, t, v): a request gets the same tokens whatever batch, slot or engine it runs in,
and no generator state is carried between steps (no host sync, graph-capturable). The hash is a
32-bit integer mixer evaluated in int64 without overflow; uniforms have 23 bits, (k + 1/2) / 2**23,
all exact in float32 and strictly inside (0, 1). (With 24 bits the top value rounded to 1.0, whose
Gumbel noise is +inf: about 1 % of draws over a 150k vocabulary took that token whatever its q.)
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


def uniform_noise(row_seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms strictly inside (0, 1), float32 [B, vocab], from per-row seeds [B] and step counters [B]."""
    device = row_seeds.device
    row = mix32((mix32(row_seeds & _MASK32) ^ (steps & _MASK32)) & _MASK32)  # [B]
    token = mix32(torch.arange(vocab, device=device, dtype=torch.int64) * 0x9E37 & _MASK32)  # [V]
    bits = mix32(mix32(row.unsqueeze(-1) ^ token.unsqueeze(0)) ^ row.unsqueeze(-1))
    return uniform_of_bits(bits)


def uniform_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2**32)) -> float32 uniforms (k + 1/2) / 2**23 from their top 23 bits."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def sample_tokens(
    lp_q: torch.Tensor, greedy: bool, row_seeds: torch.Tensor | None = None, steps: torch.Tensor | None = None
) -> torch.Tensor:
    """argmax q (greedy) or a draw from q by Gumbel-max; returns int64 [B]."""  # lp_q: [B, V]
    if greedy:
        return lp_q.argmax(dim=-1)
    u = uniform_noise(row_seeds, steps, lp_q.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (lp_q.float() + gumbel).argmax(dim=-1)
