"""Adversarial training: objectives, inner attack, schedules, EMA, checkpointing, distributed, loop."""
