"""Transitive groups of similar items: the one grouping behind ``check``'s near duplicates
(perceptual hashes) and ``audit``'s (feature similarity)."""

from __future__ import annotations

import numpy as np


def linked_groups(n: int, rows: np.ndarray, cols: np.ndarray) -> list[list[int]]:
    """Connected components with two or more members of the undirected graph on ``n`` items
    whose edges are ``rows[k] - cols[k]``: each group's indices ascending, groups ordered by
    their first index. Items linked through a chain (a ~ b, b ~ c) share a group."""
    if not len(rows):
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp, kind="stable")  # members of one component together, ascending inside
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    groups = [g.tolist() for g in np.split(order, bounds) if len(g) > 1]
    return sorted(groups, key=lambda g: g[0])
