import numpy as np

from convlens.data.groups import linked_groups


def test_chains_join_one_group_and_singletons_are_dropped():
    # 5 ~ 2, 2 ~ 7 (a chain), 0 ~ 3; 1, 4, 6 alone
    rows, cols = np.array([5, 2, 0]), np.array([2, 7, 3])
    assert linked_groups(8, rows, cols) == [[0, 3], [2, 5, 7]]


def test_no_edges_no_groups():
    assert linked_groups(4, np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == []


def test_repeated_and_reversed_edges_are_one_link():
    assert linked_groups(3, np.array([1, 2, 1]), np.array([2, 1, 2])) == [[1, 2]]
