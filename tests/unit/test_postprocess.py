"""Top-k post-processing: ties rank by index, so top-1 is the class the toolchain's validation counted."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.manifest import Postprocess
from runtime.postprocess import classify, top_indices


def test_ties_rank_by_index_like_argmax() -> None:
    # A saturated int8 output dequantizes several classes to the same top value.
    logits = np.array([1.0, 13.3, 2.0, 13.3, 13.3, 0.0, -1.0, 13.3, 0.5, 13.3], np.float32)
    for softmax in (True, False):
        result = classify(logits, Postprocess(kind="classification", softmax=softmax, top_k=3))
        assert result["top1"]["index"] == int(np.argmax(logits)) == 1
        assert [e["index"] for e in result["topk"]] == [1, 3, 4]


def test_top_k_is_sorted_and_labelled() -> None:
    spec = Postprocess(kind="classification", softmax=False, top_k=2, labels=("a", "b", "c"))
    result = classify(np.array([0.2, 0.5, 0.3], np.float32), spec)
    assert [(e["label"], round(e["score"], 3)) for e in result["topk"]] == [("b", 0.5), ("c", 0.3)]


def test_top_indices_matches_a_stable_full_sort_on_long_vectors() -> None:
    """The partitioned top-k of a long vector ranks exactly as a stable sort of the whole vector."""
    rng = np.random.default_rng(7)
    for n in (10, 64, 65, 1000):
        for k in (1, 5, 20):
            for tied in (False, True):
                v = (rng.integers(0, 4, n) if tied else rng.random(n)).astype(np.float32)
                expected = np.argsort(-v, kind="stable")[: min(k, n)]
                assert np.array_equal(top_indices(v, k), expected), (n, k, tied)
    with_nan = rng.random(1000).astype(np.float32)
    with_nan[[3, 500]] = np.nan
    assert np.array_equal(top_indices(with_nan, 5), np.argsort(-with_nan, kind="stable")[:5])


def test_classify_matches_a_full_softmax_and_stable_sort() -> None:
    """The fast path (partition, probabilities of the winners only) ranks and scores as the textbook way."""
    rng = np.random.default_rng(11)
    for n, tied in ((10, False), (1000, False), (1000, True), (21843, False)):
        logits = (rng.integers(-3, 3, n) if tied else rng.normal(0, 4, n)).astype(np.float32)
        e = np.exp(logits - logits.max())
        probs = e / e.sum()
        order = np.argsort(-logits, kind="stable")[:5]
        result = classify(logits[None], Postprocess(kind="classification", softmax=True, top_k=5))
        assert [t["index"] for t in result["topk"]] == order.tolist()
        assert [t["score"] for t in result["topk"]] == pytest.approx(probs[order].tolist(), rel=1e-5)
        raw = classify(logits, Postprocess(kind="classification", softmax=False, top_k=5))
        assert [t["score"] for t in raw["topk"]] == logits[order].tolist()
