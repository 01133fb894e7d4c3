"""Per-layer spectral norms of conv and linear layers: exact values, certified bounds, lower bounds.

Pure functions on one layer's weights and input size; no knowledge of networks.
"""
from spectral.guarantee import Guarantee, NormValue

__all__ = ["Guarantee", "NormValue"]
