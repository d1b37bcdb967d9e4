"""Top-k post-processing: ties rank by index, so top-1 is the class the toolchain's validation counted."""

from __future__ import annotations

import numpy as np

from runtime.manifest import Postprocess
from runtime.postprocess import classify


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
