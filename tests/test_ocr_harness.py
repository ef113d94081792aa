"""The PP-OCRv4 accuracy harness (hago/examples/ocr.py): decoding, metric, data, and the real model."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from hago.errors import HagoError
from hago.examples import ocr

# fp32 character accuracy measured on dataset(40, seed=0) is 1.000 (0.9996 on the
# 300-line set); the margin absorbs FreeType / onnxruntime version differences.
FP32_MIN_ACC_40 = 0.97


# ------------------------------------------------------------------ decoding
def _onehot(rows, classes):
    out = np.full((len(rows), len(rows[0]), classes), 0.01, dtype=np.float32)
    for n, row in enumerate(rows):
        for t, c in enumerate(row):
            out[n, t, c] = 0.9
    return out


def test_decode_greedy_ctc():
    chars = ["blank", "a", "b", "c", " "]
    logits = _onehot([
        [0, 1, 1, 0, 1, 2, 2, 4],   # repeats merge, a blank separates two a's, space kept
        [0, 0, 0, 0, 0, 0, 0, 0],   # all blank
        [3, 3, 3, 2, 0, 2, 1, 1],   # c b b a
        [4, 1, 4, 4, 0, 0, 3, 0],
    ], len(chars))
    assert ocr.decode(logits, chars) == ["aab ", "", "cbba", " a c"]


def test_decode_checks_shapes():
    with pytest.raises(HagoError, match="6 classes but the charset has 5"):
        ocr.decode(np.zeros((1, 4, 6), np.float32), ["blank", "a", "b", "c", " "])
    with pytest.raises(HagoError, match=r"\[N, T, C\]"):
        ocr.decode(np.zeros((4, 5), np.float32), ["blank", "a", "b", "c", " "])


# -------------------------------------------------------------------- metric
@pytest.mark.parametrize("a,b,d", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("abc", "abc", 0),
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("intention", "execution", 5),
    ("ab", "ba", 2), ("2023-05-17", "2023-05-71", 2), ("K091", "Ko91", 1), (" x", "x", 1),
])
def test_edit_distance(a, b, d):
    assert ocr.edit_distance(a, b) == d
    assert ocr.edit_distance(b, a) == d


def test_char_accuracy():
    assert ocr.char_accuracy(["hello", "world"], ["hello", "world"]) == 1.0
    # 1 substitution + 1 deletion over 10 characters
    assert ocr.char_accuracy(["hallo", "wold"], ["hello", "world"]) == pytest.approx(0.8)
    # more edits than characters: clipped at 0
    assert ocr.char_accuracy(["x" * 30], ["abcd"]) == 0.0
    with pytest.raises(HagoError, match="2 predictions for 1 texts"):
        ocr.char_accuracy(["a", "b"], ["a"])


# ---------------------------------------------------------------------- data
def test_dataset_is_deterministic_and_well_formed():
    x1, t1 = ocr.dataset(24, seed=3)
    x2, t2 = ocr.dataset(24, seed=3)
    x3, t3 = ocr.dataset(24, seed=4)
    assert x1.shape == (24, 3, 48, 320) and x1.dtype == np.float32
    assert np.array_equal(x1, x2) and t1 == t2
    assert t1 != t3 and not np.array_equal(x1, x3)
    assert x1.min() >= -1.0 and x1.max() <= 1.0
    assert all(4 <= len(t) <= 20 and t == t.strip() for t in t1 + t3)
    # gray lines: the three channels agree; the right edge is rapidocr's zero padding
    # for lines narrower than the canvas, and every line has dark ink
    assert np.array_equal(x1[:, 0], x1[:, 1]) and np.array_equal(x1[:, 1], x1[:, 2])
    assert (x1[:, :, :, -1] == 0).all(axis=(1, 2)).sum() > 12
    assert (x1.reshape(24, -1).min(axis=1) < -0.3).all()
    x4, _ = ocr.dataset(2, seed=0, width=200)
    assert x4.shape == (2, 3, 48, 200)


def test_calib_batches_use_another_seed():
    batches = list(ocr.calib_batches(10, batch_size=4, name="x"))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(list(b) == ["x"] and b["x"].shape[1:] == (3, 48, 320) for b in batches)
    test_x, _ = ocr.dataset(10, seed=0)
    assert not np.array_equal(np.concatenate([b["x"] for b in batches]), test_x)


def test_model_path_names_the_pip_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "rapidocr_onnxruntime" else real(name, *a))
    with pytest.raises(HagoError, match="pip install rapidocr-onnxruntime"):
        ocr.model_path()


# ----------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def model():
    try:
        return ocr.model_path()
    except HagoError as e:
        pytest.skip(f"rapidocr-onnxruntime (which ships the PP-OCRv4 model) is not installed: {e}")


@pytest.fixture(scope="module")
def fp32_run(model):
    images, texts = ocr.dataset(40, seed=0)
    preds = ocr.predict(model, images, batch_size=20)
    return images, texts, preds


def test_charset_matches_model(model):
    chars = ocr.charset(model)
    assert len(chars) == 6625  # the model's output classes
    assert chars[0] == "blank" and chars[-1] == " "
    assert ocr.input_name(model) == "x"
    _, texts = ocr.dataset(300, seed=0)
    used = set("".join(texts))
    assert used <= set(chars), sorted(used - set(chars))
    assert len(used) > 60  # letters, digits and punctuation are all exercised


def test_fp32_reads_the_lines(fp32_run):
    _, texts, preds = fp32_run
    acc = ocr.char_accuracy(preds, texts)
    assert acc >= FP32_MIN_ACC_40, list(zip(texts, preds))
    # the metric discriminates: the same predictions against other lines score low
    assert ocr.char_accuracy(preds, texts[1:] + texts[:1]) < 0.5


def test_evaluate_accepts_path_proto_and_bytes(model, fp32_run):
    import onnx

    images, texts, preds = fp32_run
    proto = onnx.load(model)
    for m in (proto, proto.SerializeToString()):
        assert ocr.predict(m, images[:4]) == preds[:4]
    acc = ocr.evaluate(model, images[:8], texts[:8], batch_size=3, threads=1)
    assert acc == ocr.char_accuracy(preds[:8], texts[:8])
    with pytest.raises(HagoError, match="8 images but 7 texts"):
        ocr.evaluate(model, images[:8], texts[:7])


def test_evaluate_uses_the_installed_charset_when_metadata_is_gone(model, fp32_run):
    import onnx

    images, _, preds = fp32_run
    proto = onnx.load(model)
    del proto.metadata_props[:]
    with pytest.raises(HagoError, match="no 'character' metadata"):
        ocr.charset(proto)
    assert ocr.predict(proto, images[:2]) == preds[:2]


def test_ctc_loss_matches_torch_and_enumeration():
    """The CTC negative log-likelihood against a brute-force sum over alignments and, when torch is there,
    torch.nn.functional.ctc_loss."""
    import itertools

    rng = np.random.default_rng(0)
    T, C = 5, 4
    logits = rng.normal(size=(3, T, C))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = [np.array([1, 2]), np.array([3, 3]), np.array([2])]

    def collapse(path):
        out = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
        return out

    want = []
    for p, lab in zip(probs, labels):
        tot = sum(np.prod([p[t, c] for t, c in enumerate(path)])
                  for path in itertools.product(range(C), repeat=T) if collapse(path) == list(lab))
        want.append(-np.log(tot))
    assert ocr.ctc_loss(probs, labels) == pytest.approx(np.mean(want), rel=1e-9)
    torch = pytest.importorskip("torch")
    lp = torch.log(torch.from_numpy(probs)).permute(1, 0, 2)
    ref = torch.nn.functional.ctc_loss(lp, torch.cat([torch.from_numpy(x) for x in labels]),
                                       torch.full((3,), T), torch.tensor([len(x) for x in labels]),
                                       reduction="sum", zero_infinity=False) / 3
    assert ocr.ctc_loss(probs, labels) == pytest.approx(float(ref), rel=1e-9)


def test_encode_round_trips_and_names_missing_characters():
    chars = ["blank", "a", "b", " "]
    assert [list(x) for x in ocr.encode(["ab a"], chars)] == [[1, 2, 3, 1]]
    with pytest.raises(ocr.OCRDataError, match="'z'"):
        ocr.encode(["az"], chars)


def test_ctc_calibration_labels_the_calib_lines(model):
    """The batches are calib_batches' lines with their line indices; the loss is CTC against those lines' texts,
    low for the fp32 model's own reading and high for a uniform output."""
    batches, loss = ocr.ctc_calibration(4, batch_size=3)
    ref = list(ocr.calib_batches(4, batch_size=3))
    assert [list(b["label"]) for b in batches] == [[0, 1, 2], [3]]
    for b, r in zip(batches, ref):
        np.testing.assert_array_equal(b["x"], r["x"])
    x = np.concatenate([b["x"] for b in batches])
    import onnxruntime as ort
    probs = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    _, texts = ocr.dataset(4, seed=1)
    want = ocr.ctc_loss(probs, ocr.encode(texts, ocr.charset(model)))
    assert loss([probs], np.arange(4)) == pytest.approx(want)
    assert want < 5.0 < loss([np.full_like(probs, 1.0 / probs.shape[-1])], np.arange(4))
