"""Integrations of optimal sampling into other inference engines (vLLM).

Nothing here is imported by `optimal_sampling` itself, so the core package never needs them.
"""
