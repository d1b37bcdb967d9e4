"""Task-aware metrics: each built-in scores agreement as documented; user metrics plug in by module:function."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from toolchain.errors import UsageError
from toolchain.metrics import BUILTIN, cosine, infer_task, resolve, snr_db
from toolchain.validate import compare


def test_dense_iou_of_thresholded_maps() -> None:
    ref = np.zeros((1, 1, 4, 4), np.float32)
    ref[..., :2, :2] = 0.9  # 4 pixels on
    cand = ref.copy()
    cand[..., 0, 2] = 0.5  # one extra pixel on
    assert BUILTIN["dense"].score(ref, cand) == pytest.approx(4 / 5)
    assert BUILTIN["dense"].score(np.zeros((4, 4)), np.full((4, 4), 0.2)) == 1.0  # nothing above 0.3 in either


def test_detection_matches_boxes_by_iou() -> None:
    ref = np.array([[[0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8], [0, 0, 1, 1, 0.1]]], np.float32)
    cand = np.array([[[20, 20, 30, 30, 0.7], [0, 0, 10, 5, 0.95]]], np.float32)
    # (0,0,10,10) vs (0,0,10,5): IoU 0.5; the other pair is identical; the low-score box is ignored
    assert BUILTIN["detection"].score(ref, cand) == pytest.approx((1.0 + 0.5) / 2)
    assert BUILTIN["detection"].score(ref, cand[:, :1]) == pytest.approx(1.0 / 2)
    with pytest.raises(UsageError, match="x1,y1,x2,y2,score"):
        BUILTIN["detection"].score(np.zeros((1, 3, 4)), np.zeros((1, 3, 4)))


def test_embedding_cosine_and_snr() -> None:
    a = np.array([1.0, 0.0], np.float32)
    assert BUILTIN["embedding"].score(a, np.array([1.0, 1.0], np.float32)) == pytest.approx(2**-0.5)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert snr_db(np.ones(100), np.ones(100) * 1.1) == pytest.approx(20.0, abs=1e-6)


def test_task_inferred_from_output_shape() -> None:
    assert infer_task((1, 10)) == "classification"
    assert infer_task((1, 1, 64, 64)) == "dense"
    assert infer_task((1, 100, 6)) == "generic"
    assert resolve(None, (1, 10)).name == "classification"
    assert resolve("detection", (1, 10)).task == "detection"


def test_user_metric_plugs_in(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_metric.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def within(reference, candidate):
                return float(np.mean(np.abs(reference - candidate) < 0.1))

            def broken(reference, candidate):
                return "good"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = resolve("my_metric:within", (1, 4))
    ref = [np.zeros(4, np.float32), np.zeros(4, np.float32)]
    cand = [np.array([0, 0, 0, 1], np.float32), np.zeros(4, np.float32)]
    cmp = compare(ref, cand, task="custom", labels=[None, None], sources=["a", "b"], metric=metric)
    assert cmp.task == "custom" and cmp.metric == "my_metric:within"
    assert cmp.agreement == pytest.approx((0.75 + 1.0) / 2) and cmp.agreement_min == pytest.approx(0.75)
    assert cmp.scores == (("a", 0.75), ("b", 1.0))
    with pytest.raises(UsageError, match="return a float"):
        resolve("my_metric:broken", (1, 4)).score(ref[0], ref[0])
    with pytest.raises(UsageError, match="no function 'nope'"):
        resolve("my_metric:nope", (1, 4))
    with pytest.raises(UsageError, match="--metric"):
        resolve("not a metric", (1, 4))
    sys.modules.pop("my_metric", None)
