"""The one id rule (common/id_rule.py) and the compare-and-set publish of id maps (common/ids.py)."""

from __future__ import annotations

import threading

import pytest

from common.id_rule import MAX_ID_LEN, IdError, check_id, check_ids
from common.ids import IdMap, load_id_map, publish_id_map


@pytest.mark.parametrize("good, expected", [("42", "42"), (42, "42"), ("  u-1 ", "u-1"), ("é☃𝕏", "é☃𝕏"),
                                            ("a b", "a b"), ("x" * MAX_ID_LEN, "x" * MAX_ID_LEN)])
def test_ids_the_rule_accepts(good, expected):
    assert check_id(good) == expected


@pytest.mark.parametrize("bad, words", [("", "empty"), ("   ", "empty"), (None, "string or an integer"),
                                        (True, "string or an integer"), (1.5, "string or an integer"),
                                        ("x" * (MAX_ID_LEN + 1), "at most"), ("a,b", "comma"),
                                        ("a\x00", "control"), ("a\nb", "control"), ("\x7f", "control"),
                                        ("a\x85b", "control")])
def test_ids_the_rule_refuses(bad, words):
    with pytest.raises(IdError, match=words):
        check_id(bad)


def test_id_lists_are_bounded_and_name_the_bad_position():
    assert check_ids(["a", " b", 3], 5) == ["a", "b", "3"]
    with pytest.raises(IdError, match="at most 2 ids, got 3"):
        check_ids(["a", "b", "c"], 2)
    with pytest.raises(IdError, match="position 1 must not contain a comma"):
        check_ids(["a", "b,c"], 5)
    with pytest.raises(IdError, match="position 2 must not be empty"):
        check_ids(["a", "b", " "], 5)
    with pytest.raises(IdError, match="list"):
        check_ids("a,b", 5)


def test_publish_id_map_never_overwrites_a_concurrent_publish(stores):
    """Writers racing from the same base: each one that returns has its map as a prefix of the final one (WATCH);
    the others are refused (their map no longer extends the published one), never silently overwritten."""
    base = IdMap([f"u{i}" for i in range(50_000)])  # a large map: a wide window between read and write
    publish_id_map(stores, "user", base)
    won, lost = [], []
    gate = threading.Barrier(6)

    def writer(j: int) -> None:
        mine = IdMap(base.ids + [f"new-{j}-{i}" for i in range(10)])
        gate.wait()
        try:
            publish_id_map(stores, "user", mine)
            won.append(mine)
        except ValueError:
            lost.append(j)

    threads = [threading.Thread(target=writer, args=(j,)) for j in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = load_id_map(stores, "user")
    assert won and len(won) + len(lost) == 6
    for m in won:
        assert final.ids[: len(m)] == m.ids
    assert len(won) == 1  # same base, different additions: only one can extend the published map
    assert int(stores("meta").get(stores.keyspace.id_map_len("user"))) == len(final)
