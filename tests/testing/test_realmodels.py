"""The real models load and behave as the real models they are, on realistic inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from amp_search.calibration import model_inputs
from amp_search.testing import realmodels


def _run(name: str, n: int | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    feeds = realmodels.calibration(name, n)
    sess = ort.InferenceSession(str(realmodels.fetch(name)), providers=["CPUExecutionProvider"])
    return feeds, sess.run(None, feeds)


@pytest.mark.parametrize("name", realmodels.MODEL_NAMES)
def test_fetch_gives_a_valid_model_matching_its_calibration_data(name):
    path = realmodels.fetch(name)
    assert path.is_file()
    assert realmodels.fetch(name) == path  # cached: no second download
    model = onnx.load(path)
    onnx.checker.check_model(model)
    feeds = realmodels.calibration(name)
    specs = model_inputs(model)
    assert sorted(feeds) == sorted(s.name for s in specs)
    for spec in specs:
        assert feeds[spec.name].dtype == spec.dtype
        assert feeds[spec.name].ndim == spec.rank


def test_detector_finds_text_on_the_page():
    _, (prob,) = _run("ppocr_det")
    assert 0.02 < float((prob > 0.3).mean()) < 0.5


def test_recognizer_reads_characters_on_every_line():
    _, (probs,) = _run("ppocr_rec")
    steps = probs.argmax(-1)
    assert all(int((line != 0).sum()) >= 3 for line in steps)  # 0 is the CTC blank


def test_classifier_sees_the_rotated_lines():
    _, (probs,) = _run("ppocr_cls")
    assert probs.argmax(-1).tolist() == [0, 1, 0, 1, 0, 1]


def test_text_encoder_puts_paraphrases_closer_than_unrelated_sentences():
    _, (hidden, emb) = _run("minilm")
    assert hidden.shape == (8, 32, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] > 0.5 and cos[2, 3] > 0.5  # the two paraphrase pairs
    assert max(cos[0, 2], cos[0, 4], cos[2, 5], cos[4, 6]) < 0.3  # unrelated sentences
