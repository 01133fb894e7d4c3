"""Network-level Lipschitz analysis: certified bounds composed over a network graph, data lower bounds,
CLEVER estimates (and, in ``lipschitz.theory``, random-matrix predictions).

Public API (imports are light; nothing runs at import):
- ``network_bound(model_or_graph, input_shape, method="folded+liplt") -> NetworkBound`` (lipschitz.bounds)
- ``graph_from_module(model, input_shape)``, ``register_leaf(ModuleClass, lipschitz=...)``,
  ``GraphExtractionError`` (lipschitz.trace: torch.fx graph extraction for any traceable module)
- ``jacobian_norm_lower``, ``attack_ratio_lower``, ``local_lipschitz_metric`` (lipschitz.lower)
- ``jacobian_norm_search``, ``ratio_search``, ``lower_bound_search``, ``node_lower_bounds`` (lipschitz.search)
- ``clever`` (lipschitz.clever)
- ``activation_slope``, ``pool_lipschitz`` (lipschitz.rules)
"""
from lipschitz.bounds import METHODS, NetworkBound, network_bound
from lipschitz.clever import CleverResult, clever
from lipschitz.lower import (LocalLipschitzResult, attack_ratio_lower, jacobian_norm_lower,
                             local_lipschitz_metric)
from lipschitz.rules import activation_slope, pool_lipschitz
from lipschitz.search import (LowerSearch, LowerSearchResult, jacobian_norm_search, lower_bound_search,
                              node_lower_bounds, ratio_search)
from lipschitz.trace import GraphExtractionError, graph_from_module, register_leaf, unregister_leaf

__all__ = [
    "METHODS", "NetworkBound", "network_bound",
    "GraphExtractionError", "graph_from_module", "register_leaf", "unregister_leaf",
    "CleverResult", "clever",
    "LocalLipschitzResult", "attack_ratio_lower", "jacobian_norm_lower", "local_lipschitz_metric",
    "activation_slope", "pool_lipschitz",
    "LowerSearch", "LowerSearchResult", "jacobian_norm_search", "lower_bound_search", "node_lower_bounds",
    "ratio_search",
]
