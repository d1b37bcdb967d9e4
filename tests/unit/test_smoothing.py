"""Optional `serve` features: temporal smoothing of video results and the LRU result cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError
from runtime.resultcache import ResultCache
from runtime.smoothing import TemporalSmoother

# --- smoothing ------------------------------------------------------------------------------------


def test_mean_of_the_last_n_vectors() -> None:
    smoother = TemporalSmoother(3)
    frames = [np.array([0.9, 0.1, 0.0]), np.array([0.2, 0.7, 0.1]), np.array([0.1, 0.8, 0.1]), [0.0, 0.6, 0.4]]
    out = [smoother.update(np.asarray(f)) for f in frames]
    np.testing.assert_allclose(out[0].scores, frames[0])
    np.testing.assert_allclose(out[1].scores, np.mean(frames[:2], axis=0))
    np.testing.assert_allclose(out[2].scores, np.mean(frames[:3], axis=0))
    np.testing.assert_allclose(out[3].scores, np.mean(frames[1:4], axis=0))  # the first frame left the window
    assert [o.frames for o in out] == [1, 2, 3, 3]
    assert out[0].index == 0 and out[2].index == 1  # a one-frame flicker no longer wins
    assert out[3].score == pytest.approx(0.7)


def test_top1_carries_the_label_and_to_dict_is_json_ready() -> None:
    smoother = TemporalSmoother(2)
    result = smoother.update(np.array([[0.1, 0.3, 0.6]], np.float32), labels=("cat", "dog", "bird"))
    assert result.to_dict() == {"index": 2, "label": "bird", "score": pytest.approx(0.6), "frames": 1}
    assert smoother.update(np.array([0.1, 0.3, 0.6])).label is None


@pytest.mark.parametrize("window", [0, 1])
def test_window_zero_or_one_passes_through(window: int) -> None:
    smoother = TemporalSmoother(window)
    for vec in (np.array([0.2, 0.8]), np.array([0.9, 0.1])):
        result = smoother.update(vec)
        np.testing.assert_allclose(result.scores, vec)
        assert result.frames == 1


def test_reset_and_a_new_class_count_start_a_fresh_window() -> None:
    smoother = TemporalSmoother(5)
    smoother.update(np.array([1.0, 0.0]))
    smoother.reset()
    np.testing.assert_allclose(smoother.update(np.array([0.0, 1.0])).scores, [0.0, 1.0])
    fresh = smoother.update(np.array([0.2, 0.3, 0.5]))  # a model with three classes was swapped in
    assert fresh.frames == 1 and fresh.index == 2


def test_softmax_turns_logits_into_probabilities_before_averaging() -> None:
    smoother = TemporalSmoother(2)
    first = smoother.update(np.array([0.0, 0.0]), softmax=True)
    np.testing.assert_allclose(first.scores, [0.5, 0.5])
    second = smoother.update(np.array([1000.0, 0.0]), softmax=True)  # no overflow
    np.testing.assert_allclose(second.scores, [0.75, 0.25])


def test_bad_smoother_settings() -> None:
    with pytest.raises(ConfigError, match="smoothing_window"):
        TemporalSmoother(-1)
    with pytest.raises(ValueError, match="empty"):
        TemporalSmoother(3).update(np.array([]))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 6),
    st.lists(st.lists(st.floats(0, 1, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=20),
)
def test_smoothed_scores_equal_the_mean_of_the_window(window: int, vectors: list[list[float]]) -> None:
    smoother = TemporalSmoother(window)
    for i, vec in enumerate(vectors):
        result = smoother.update(np.array(vec))
        expected = np.mean(vectors[max(0, i + 1 - max(1, window)) : i + 1], axis=0)
        np.testing.assert_allclose(result.scores, expected, rtol=1e-12, atol=1e-12)
        assert result.index == int(np.argmax(expected))


# --- result cache ---------------------------------------------------------------------------------


def test_lru_eviction_order_and_hit_rate() -> None:
    cache = ResultCache(2)
    cache.put("a", {"top1": 1})
    cache.put("b", {"top1": 2})
    assert cache.get("a") == {"top1": 1}  # "a" is now the most recently used
    cache.put("c", {"top1": 3})  # evicts "b", the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    cache.put("d", {"top1": 4})  # evicts "a"
    assert "a" not in cache and cache.get("c") == {"top1": 3} and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)
    assert cache.hit_rate == pytest.approx(2 / 3)
    assert cache.stats() == {"capacity": 2, "size": 2, "hits": 2, "misses": 1, "hit_rate": 0.6667}


def test_put_refreshes_recency_and_value() -> None:
    cache = ResultCache(2)
    cache.put("a", {"v": 1})
    cache.put("b", {"v": 2})
    cache.put("a", {"v": 10})  # "a" becomes the newest
    cache.put("c", {"v": 3})
    assert cache.get("a") == {"v": 10} and "b" not in cache


def test_callers_cannot_change_cached_results() -> None:
    cache = ResultCache(4)
    original: dict[str, Any] = {"top1": 1}
    cache.put("a", original)
    original["top1"] = 99
    got = cache.get("a")
    assert got == {"top1": 1}
    assert got is not None
    got["cached"] = True
    assert cache.get("a") == {"top1": 1}


def test_capacity_zero_disables_the_cache() -> None:
    cache = ResultCache(0)
    cache.put("a", {"v": 1})
    assert cache.get("a") is None and len(cache) == 0
    assert (cache.hits, cache.misses, cache.hit_rate) == (0, 0, 0.0)
    with pytest.raises(ConfigError, match=r"cache\.size"):
        ResultCache(-1)


def test_clear_keeps_counters() -> None:
    cache = ResultCache(3)
    cache.put("a", {})
    assert cache.get("a") == {}
    cache.clear()
    assert cache.get("a") is None and (cache.hits, cache.misses) == (1, 1)


def test_cache_is_thread_safe() -> None:
    cache = ResultCache(50)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(3000):
                key = str(int(rng.integers(0, 80)))
                if cache.get(key) is None:
                    cache.put(key, {"k": key})
        except BaseException as exc:  # surfaced below; a thread cannot fail the test by itself
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) <= 50 and cache.hits + cache.misses == 4 * 3000
    for key in list(cache._entries):
        assert cache.get(key) == {"k": key}


_ops = st.lists(
    st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 9), st.integers(0, 1000)),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5), _ops)
def test_cache_matches_a_reference_lru_model(capacity: int, ops: list[tuple[str, int, int]]) -> None:
    cache = ResultCache(capacity)
    model: OrderedDict[str, dict[str, Any]] = OrderedDict()
    hits = misses = 0
    for op, k, value in ops:
        key = f"{k:064x}"
        if op == "put":
            if capacity:
                model[key] = {"v": value}
                model.move_to_end(key)
                while len(model) > capacity:
                    model.popitem(last=False)
            cache.put(key, {"v": value})
        else:
            expected = model.get(key)
            if capacity:
                if expected is None:
                    misses += 1
                else:
                    hits += 1
                    model.move_to_end(key)
            assert cache.get(key) == expected
        assert len(cache) == len(model)
        assert list(cache._entries) == list(model), "recency order differs from the reference"
    assert (cache.hits, cache.misses) == (hits, misses)
    assert cache.hit_rate == pytest.approx(hits / (hits + misses) if hits + misses else 0.0)
