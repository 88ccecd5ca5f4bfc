"""The fused sampler's buffers, named: what each (row, split) partial and each row's state hold.

Kernels of the solve passes (triton_solve.py) and of the draw (triton_draw.py) address these
buffers only through the names here, so a layout change is one edit.
"""

from __future__ import annotations

import triton.language as tl

from ...mixing.alpha import IDENTICAL_JEFFREYS

NEG_INF = tl.constexpr(float("-inf"))
DONE_WIDTH = tl.constexpr(1e-5)  # a bracket this narrow bounds |alpha - root| already
ROW_STATS = (
    12  # per (row, split) of the row pass: m_b, s_b, m_t, s_t, d at max z_b, far, raw m/s b, t, d range
)
SHIFT_STATS = (
    3  # per (row, split) of the grid pass: sum of p_b, of p_b expm1(d - c), 1 if the row could overflow
)
STATS = 3  # per (row, split, point): weight, sum of e g, sum of e g^2
STATE = 20  # per row, float64
STATE_W = tl.constexpr(STATE)
# state columns
LEFT = tl.constexpr(0)
RIGHT = tl.constexpr(1)
F_LEFT = tl.constexpr(2)
F_RIGHT = tl.constexpr(3)
FP_LEFT = tl.constexpr(4)
FP_RIGHT = tl.constexpr(5)
LSE_B = tl.constexpr(6)
LSE_T = tl.constexpr(7)
CENTRE = tl.constexpr(8)
SHIFT = tl.constexpr(9)
OUTCOME = tl.constexpr(10)  # 0 root inside, 1 at alpha_min, 2 at alpha_max, 3 identical policies
DONE = tl.constexpr(11)
RAW_LSE_B = tl.constexpr(12)
RAW_LSE_T = tl.constexpr(13)
FAR = tl.constexpr(14)  # tokens in one support only: the shift is then lse_t - lse_b - c, not precise
K_LEFT = tl.constexpr(15)  # K(s) = log sum over the joint support of exp(z_b + s d), at the bracket ends
K_RIGHT = tl.constexpr(16)
LOG_Z = tl.constexpr(17)  # log Z_q at alpha, from K at the nearer end (a solved row)
D_MAX = tl.constexpr(18)  # the largest and smallest d on the joint support (row pass with D_RANGE)
D_MIN = tl.constexpr(19)
ROW_STATS_W = tl.constexpr(ROW_STATS)
SHIFT_STATS_W = tl.constexpr(SHIFT_STATS)
STATS_W = tl.constexpr(STATS)
IDENTICAL = tl.constexpr(IDENTICAL_JEFFREYS)  # Jeffreys divergence at or below this: pi_base = pi_teacher
MASS_STATS = 2  # per (row, draw chunk) of the mass pass: max and sum of exp(u - max)
MASS_STATS_W = tl.constexpr(MASS_STATS)
