"""Decoding labelled samples: a class whose every training file is unreadable stops training
with the reason, instead of becoming an output the model never learnt."""

import numpy as np
import pytest
from PIL import Image

from imgtriage.data import PreprocessSpec, Sample
from imgtriage.data.loaders import check_trainable, decode_samples
from imgtriage.errors import DataError


def test_a_class_whose_files_are_all_unreadable_is_an_error_with_the_reason(tmp_path):
    samples = []
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"a{i}.png")
        (tmp_path / f"b{i}.png").write_text("not an image")
        samples += [Sample(str(tmp_path / f"a{i}.png"), "a"),
                    Sample(str(tmp_path / f"b{i}.png"), "b")]
    spec = PreprocessSpec(in_chans=1, size=(8, 8), mean=(0.0,), std=(1.0,))
    loaded = decode_samples(samples, ["a", "b"], spec, workers=1)
    with pytest.raises(DataError, match=r"class\(es\) 'b' \(3 file\(s\)\); 3 unreadable "
                                        r"\(format_mismatch x3\), e\.g\. .*b0\.png"):
        check_trainable(loaded.y, ("a", "b"), samples, loaded.defects)
    check_trainable(loaded.y, ("a",), samples[::2], loaded.defects)  # every class has one
    with pytest.raises(DataError, match="fewer than 2 usable training images; 3 unreadable"):
        check_trainable(loaded.y[:1], ("a",), samples[:1], loaded.defects)
