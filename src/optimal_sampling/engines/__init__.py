"""Engines: where the two models run. See base.py for the interface."""

from .base import Engine, SlotRequest

__all__ = ["Engine", "SlotRequest"]
