"""Adversarial training: objectives, inner attack, schedules, EMA, checkpointing, distributed, loop.

``train(config, out_dir, resume=False)`` is the entry point (see ``experiments.training.loop``).
"""
from experiments.training.loop import train

__all__ = ["train"]
