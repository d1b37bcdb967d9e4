"""Preprocessing: the fast OpenCV path equals the plain numpy definition; bad files are InputErrors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import InputError
from runtime.manifest import Preprocess, TensorSpec
from runtime.preprocess import _numpy_tensor, image_to_tensor, load_image, load_input


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    color=st.sampled_from(["rgb", "bgr", "gray"]),
    layout=st.sampled_from(["NCHW", "NHWC"]),
    normalise=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_opencv_path_equals_the_numpy_definition(h, w, color, layout, normalise, seed):
    import cv2

    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    c = 1 if color == "gray" else 3
    mean, std = ((0.485, 0.456, 0.406)[:c], (0.229, 0.224, 0.225)[:c]) if normalise else ((), ())
    spec = Preprocess(kind="image", color=color, mean=mean, std=std, layout=layout)
    shape = (1, c, 16, 16) if layout == "NCHW" else (1, 16, 16, c)
    got = image_to_tensor(img, spec, TensorSpec("x", "float32", shape))
    ref = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if c == 1 else img  # grey first, as the device does
    ref = cv2.resize(ref, (16, 16), interpolation=cv2.INTER_AREA)
    ref = cv2.cvtColor(ref, cv2.COLOR_BGR2RGB) if color == "rgb" else ref  # a channel swap commutes with resize
    want = _numpy_tensor(ref, spec)
    assert got.shape == shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_files_are_input_errors(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"x\.png"):
        load_image(bad)
    with pytest.raises(InputError, match="no such image"):
        load_image(tmp_path / "missing.png")
    arr = tmp_path / "t.npy"
    np.save(arr, np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(InputError, match="does not fit"):
        load_input(arr, Preprocess(), TensorSpec("x", "float32", (1, 3, 4, 4)))
    np.save(arr, np.ones((3, 4, 4), dtype=np.float64))
    out = load_input(arr, Preprocess(), TensorSpec("x", "float32", (1, 3, 4, 4)))
    assert out.shape == (1, 3, 4, 4) and out.dtype == np.float32
