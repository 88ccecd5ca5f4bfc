"""optimal-sampling: exact sampling from the geometric mixture of a base and a teacher model.

q(y) is proportional to pi_base(y)^(1-alpha) * pi_teacher(y)^alpha, with alpha chosen per token,
over the full vocabulary, with a KV cache per model; every sample carries the per-token
log-probs that importance weighting needs.
"""

from .config import MixConfig, SamplingParams
from .outputs import Sample, SamplingOutput
from .sampler import OptimalSampler

__all__ = ["MixConfig", "OptimalSampler", "Sample", "SamplingOutput", "SamplingParams"]
__version__ = "0.1.0"
