"""Accuracy harness for the real PP-OCRv4 text recogniser that `rapidocr-onnxruntime` ships.

    python -m hago.examples.ocr [model.onnx ...] [--n 300] [--threads N] [--show K]

The model (``rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx``, real
weights, an SVTR-LCNet CTC recogniser with 6,625 classes) reads one text line
of height 48. This module renders deterministic synthetic text lines (words,
numbers, dates, codes; ASCII letters, digits and punctuation that the model's
own dictionary holds), preprocesses them exactly as rapidocr does and scores
greedy CTC decoding by character accuracy, ``1 - sum(edit distance) /
sum(len(text))``. It lets hago compare an fp32 model with quantized versions
of it:

    images, texts = ocr.dataset(300)
    calib = list(ocr.calib_batches(32))           # {input_name: array} batches, another seed
    acc = ocr.evaluate(model_or_path, images, texts)

Only numpy, Pillow and onnxruntime are needed (plus the rapidocr-onnxruntime
wheel for the model file); nothing from hago but :mod:`hago.errors`.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Iterator, Sequence

import numpy as np

from hago.errors import HagoError, ModelError

PIP_PACKAGE = "rapidocr-onnxruntime"
MODEL_RELPATH = os.path.join("models", "ch_PP-OCRv4_rec_infer.onnx")

HEIGHT = 48
WIDTH = 320

# Characters the generated lines draw from (plus the punctuation -.,:/#%()+=&
# and single spaces between words). All are in the model's dictionary
# (tests/test_ocr_harness.py checks it).
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"
MIXED = "".join(c for c in LOWER + UPPER + DIGITS if c not in "0Oo1Il")


class OCRDataError(HagoError, ValueError):
    """Arguments of the OCR harness do not fit together (shapes, lengths, class counts)."""


# --------------------------------------------------------------------- model
def model_path() -> str:
    """Path of the PP-OCRv4 recognition model installed with `rapidocr-onnxruntime`.

    The package is located without importing it (its import pulls in OpenCV).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("rapidocr_onnxruntime")
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not dirs:
        raise HagoError(
            f"the PP-OCRv4 recognition model comes with the pip package '{PIP_PACKAGE}', "
            f"which is not installed; install it with `pip install {PIP_PACKAGE}`"
        )
    for d in dirs:
        path = os.path.join(d, MODEL_RELPATH)
        if os.path.isfile(path):
            return path
    raise HagoError(
        f"{os.path.join(dirs[0], MODEL_RELPATH)}: the PP-OCRv4 recognition model is missing from the "
        f"installed pip package '{PIP_PACKAGE}'; reinstall it with `pip install --force-reinstall {PIP_PACKAGE}`"
    )


def _model_bytes(model) -> bytes | str:
    """A path or serialized bytes for onnxruntime from a path, ModelProto or bytes."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ModelError(f"{path}: model file not found")
        return path
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    raise ModelError(f"expected a model path, an onnx.ModelProto or serialized bytes, got {type(model).__name__}")


def _where(model) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<in-memory model>"


def _session(model, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimize == "basic":  # exact QDQ simulation: constant folding only, no QDQ fusion
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif not optimize:  # metadata / input names only
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    src = _model_bytes(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ModelError(f"{_where(model)}: onnxruntime cannot load the model: {e}") from None


def input_name(model=None) -> str:
    """Name of the model's image input (``"x"``); the installed PP-OCRv4 model when None."""
    sess = _session(model_path() if model is None else model, optimize=False)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{_where(model)}: expected one image input, the model has {[i.name for i in inputs]}")
    return inputs[0].name


def _charset_from_meta(meta: dict, model) -> list[str]:
    if "character" not in meta:
        raise ModelError(
            f"{_where(model)}: the model has no 'character' metadata entry (not a PP-OCR recogniser, "
            "or its metadata_props were dropped)")
    chars = meta["character"].splitlines()
    chars.append(" ")
    chars.insert(0, "blank")
    return chars


def charset(model=None) -> list[str]:
    """The model's character list, index-aligned with its output classes (6,625 for PP-OCRv4).

    Mirrors rapidocr_onnxruntime (``OrtInferSession.get_character_list`` and
    ``CTCLabelDecode.get_character``): the dictionary is the ``character`` entry
    of the ONNX metadata split with ``str.splitlines()``; a space is appended at
    the end and the CTC blank (written ``"blank"``) is inserted at index 0.
    """
    model = model_path() if model is None else model
    return _charset_from_meta(_session(model, optimize=False).get_modelmeta().custom_metadata_map, model)


# ------------------------------------------------------------------ decoding
def decode(logits: np.ndarray, chars: Sequence[str]) -> list[str]:
    """Greedy CTC decoding of ``logits`` [N, T, C]: argmax, merge repeats, drop blank (index 0)."""
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise OCRDataError(f"decode expects logits of shape [N, T, C], got {logits.shape}")
    if logits.shape[2] != len(chars):
        raise OCRDataError(f"logits have {logits.shape[2]} classes but the charset has {len(chars)}")
    idx = logits.argmax(axis=2)
    out = []
    for row in idx:
        keep = np.ones(row.shape, dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]))
    return out


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit insert/delete/substitute costs)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def char_accuracy(preds: Sequence[str], texts: Sequence[str]) -> float:
    """``1 - sum(edit distance) / sum(len(text))``, clipped at 0."""
    if len(preds) != len(texts):
        raise OCRDataError(f"{len(preds)} predictions for {len(texts)} texts")
    total = sum(len(t) for t in texts)
    if total == 0:
        raise OCRDataError("the reference texts are all empty")
    dist = sum(edit_distance(p, t) for p, t in zip(preds, texts))
    return max(0.0, 1.0 - dist / total)


# ------------------------------------------------------------------ rendering
def _syllable_word(rng: np.random.Generator, lo: int, hi: int) -> str:
    cons, vows = "bcdfghjklmnprstvwxyz", "aeiou"
    n = int(rng.integers(lo, hi + 1))
    s = []
    for i in range(n):
        s.append((cons if i % 2 == 0 else vows)[int(rng.integers(0, 20 if i % 2 == 0 else 5))])
    return "".join(s)


def _pick(rng, alphabet: str, n: int) -> str:
    return "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), size=n))


def _random_text(rng: np.random.Generator) -> str:
    """One text line of 4..20 characters."""
    kind = int(rng.integers(0, 7))
    if kind == 0:  # words
        words = [_syllable_word(rng, 2, 8) for _ in range(int(rng.integers(1, 4)))]
        style = int(rng.integers(0, 3))
        if style == 1:
            words[0] = words[0].capitalize()
        elif style == 2:
            words = [w.upper() for w in words]
        text = " ".join(words)
    elif kind == 1:  # a number
        text = _pick(rng, DIGITS, int(rng.integers(4, 12)))
    elif kind == 2:  # date / time / price / percentage
        f = int(rng.integers(0, 4))
        if f == 0:
            text = f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        elif f == 1:
            text = f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d}"
        elif f == 2:
            text = f"{rng.integers(1, 100000)}.{rng.integers(0, 100):02d}"
        else:
            text = f"{rng.integers(1, 100)}.{rng.integers(0, 10)}%"
    elif kind == 3:  # code: letters and digits with a separator
        a = _pick(rng, UPPER, int(rng.integers(2, 5)))
        b = _pick(rng, DIGITS, int(rng.integers(2, 7)))
        sep = "-/#:"[int(rng.integers(0, 4))]
        text = a + sep + b
    elif kind == 4:  # mixed alphanumerics, without glyphs a sans font draws alike (0/O/o, 1/I/l)
        text = _pick(rng, MIXED, int(rng.integers(4, 13)))
    elif kind == 5:  # punctuation-rich
        f = int(rng.integers(0, 4))
        if f == 0:
            text = f"({_pick(rng, DIGITS, int(rng.integers(2, 5)))}) {_syllable_word(rng, 3, 7)}"
        elif f == 1:
            text = f"{_pick(rng, DIGITS, 2)}+{_pick(rng, DIGITS, 2)}={_pick(rng, DIGITS, 3)}"
        elif f == 2:
            text = f"{_syllable_word(rng, 2, 6).capitalize()} & {_syllable_word(rng, 2, 6).capitalize()}"
        else:
            text = f"#{_pick(rng, DIGITS, int(rng.integers(2, 6)))}/{_pick(rng, UPPER, 2)}"
    else:  # word + number + punctuation
        w = _syllable_word(rng, 3, 8).capitalize()
        text = f"{w} {rng.integers(1, 1000)}" + ("", ",", ".", ":")[int(rng.integers(0, 4))]
    text = text[:20].rstrip()
    while len(text) < 4:
        text += _pick(rng, DIGITS, 1)
    return text


_FONTS: dict = {}


def _font(size: int):
    """Pillow's built-in scalable font (Aileron); DejaVu Sans or the bitmap font as fallbacks."""
    if size in _FONTS:
        return _FONTS[size]
    from PIL import ImageFont

    font = None
    try:
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont):
            font = None  # Pillow without FreeType: the bitmap font ignores the size
    except (TypeError, OSError, ImportError):
        font = None
    if font is None:
        for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"):
            try:
                font = ImageFont.truetype(path, size)
                break
            except OSError:
                continue
    if font is None:
        font = ImageFont.load_default()
    _FONTS[size] = font
    return font


def _render(text: str, rng: np.random.Generator) -> np.ndarray:
    """Render ``text`` black-on-white (mild variation), return an HxWx3 uint8 BGR crop."""
    from PIL import Image, ImageDraw, ImageFilter

    size = int(rng.integers(26, 41))
    font = _font(size)
    x0, _, x1, _ = font.getbbox(text)
    tw = x1 - x0
    # The crop a text detector would hand the recogniser: the line's ink plus margins.
    asc, desc = (font.getmetrics() if hasattr(font, "getmetrics") else (size, size // 4))
    line_h = asc + desc
    pad_top = int(rng.integers(2, max(3, size // 5)))
    pad_bot = int(rng.integers(2, max(3, size // 5)))
    pad_l = int(rng.integers(2, max(3, size // 3)))
    pad_r = int(rng.integers(2, max(3, size // 3)))
    w = tw + pad_l + pad_r
    h = line_h + pad_top + pad_bot
    bg = int(rng.integers(215, 256))
    fg = int(rng.integers(0, 71))
    img = Image.new("L", (w, h), color=bg)
    ImageDraw.Draw(img).text((pad_l - x0, pad_top), text, fill=fg, font=font)
    blur = float(rng.uniform(0.0, 1.0))
    if blur > 0.6:  # a mild defocus on some lines
        img = img.filter(ImageFilter.GaussianBlur(radius=blur - 0.3))
    a = np.asarray(img, dtype=np.uint8)
    return np.repeat(a[:, :, None], 3, axis=2)  # gray: RGB == BGR


def _resize_norm(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` for a fixed width: keep aspect, pad with 0 (after normalizing)."""
    from PIL import Image

    h, w = img.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    im = Image.fromarray(img).resize((resized_w, height), Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
    x = (x - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = x
    return out


def encode(texts: Sequence[str], chars: Sequence[str]) -> list[np.ndarray]:
    """Class indices of each text's characters in ``chars`` (the inverse of :func:`decode` without repeats)."""
    index = {c: i for i, c in enumerate(chars) if i > 0}
    out = []
    for t in texts:
        missing = sorted({c for c in t if c not in index})
        if missing:
            raise OCRDataError(f"text {t!r}: characters {missing} are not in the model's dictionary")
        out.append(np.array([index[c] for c in t], dtype=np.int64))
    return out


def ctc_loss(probs: np.ndarray, labels: Sequence[np.ndarray], eps: float = 1e-30) -> float:
    """Mean over lines of the CTC negative log-likelihood ``-log p(label | x)`` (blank = class 0).

    ``probs`` [N, T, C] are per-step probabilities (PP-OCR's recogniser ends in a softmax);
    ``labels`` the class sequences of :func:`encode`. The CTC forward recursion runs in log space over
    the label interleaved with blanks: the training loss of a CTC recogniser, here the task loss
    for quantization methods that need one (LAPQ, mixed precision) without a hand-made proxy.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or len(probs) != len(labels):
        raise OCRDataError(f"ctc_loss: probs {probs.shape} for {len(labels)} labels (want [N, T, C], N = labels)")
    logp = np.log(np.maximum(probs, eps))
    total = 0.0
    for lp, lab in zip(logp, labels):
        ext = np.zeros(2 * len(lab) + 1, dtype=np.int64)
        ext[1::2] = lab
        # a path may skip the blank between two different labels
        skip = np.zeros(len(ext), dtype=bool)
        skip[3::2] = lab[1:] != lab[:-1]
        alpha = np.full(len(ext), -np.inf)
        alpha[0] = lp[0, 0]
        if len(ext) > 1:
            alpha[1] = lp[0, ext[1]]
        for t in range(1, lp.shape[0]):
            prev1 = np.concatenate([[-np.inf], alpha[:-1]])
            prev2 = np.where(skip, np.concatenate([[-np.inf, -np.inf], alpha[:-2]]), -np.inf)
            alpha = np.logaddexp(np.logaddexp(alpha, prev1), prev2) + lp[t, ext]
        total -= np.logaddexp(alpha[-1], alpha[-2]) if len(ext) > 1 else alpha[-1]
    return float(total / len(labels))


def dataset(n: int = 300, seed: int = 0, height: int = HEIGHT, width: int = WIDTH):
    """``n`` deterministic text lines: (images float32 [n, 3, height, width], texts).

    Each line (4..20 characters: syllable words, numbers, dates, times, prices,
    codes, mixed alphanumerics, punctuation) is rendered with Pillow's built-in
    scalable font at 26..40 px, dark gray (0..70) on light gray (215..255), with
    random margins and a mild blur on some lines, as the crop a detector would
    give. It is then preprocessed as rapidocr does: resized to ``height``
    keeping its aspect ratio (squeezed to ``width`` if wider), scaled to
    ``(x/255 - 0.5)/0.5`` in CHW order (gray, so BGR == RGB) and right-padded
    with 0 up to ``width``. The same seed gives identical arrays.
    """
    if n < 1:
        raise OCRDataError(f"dataset needs n >= 1, got {n}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, height, width), dtype=np.float32)
    texts = []
    for i in range(n):
        text = _random_text(rng)
        images[i] = _resize_norm(_render(text, rng), height, width)
        texts.append(text)
    return images, texts


def calib_batches(n: int = 32, seed: int = 1, batch_size: int = 8, height: int = HEIGHT,
                  width: int = WIDTH, name: str | None = None) -> Iterator[dict]:
    """``n`` calibration lines (another seed than the test set) as ``{input_name: array}`` batches."""
    images, _ = dataset(n, seed=seed, height=height, width=width)
    name = name or input_name()
    for i in range(0, n, batch_size):
        yield {name: images[i:i + batch_size]}


def ctc_calibration(n: int = 32, seed: int = 1, batch_size: int = 8, name: str | None = None):
    """The lines of :func:`calib_batches` with a task loss: ``(batches, loss)``.

    Each batch also carries ``"label"``, the indices of its lines; ``loss(outputs, labels, ref)`` (the loss
    signature of hago's LAPQ and mixed precision) is :func:`ctc_loss` of the first output against those
    lines' texts."""
    images, texts = dataset(n, seed=seed)
    name = name or input_name()
    codes = encode(texts, charset())
    batches = [{name: images[i:i + batch_size], "label": np.arange(i, min(i + batch_size, n))}
               for i in range(0, n, batch_size)]

    def loss(outputs, labels, ref=None) -> float:
        return ctc_loss(outputs[0], [codes[int(i)] for i in labels])

    return batches, loss


# ----------------------------------------------------------------- evaluation
def predict(model, images: np.ndarray, batch_size: int = 16, threads: int | None = None,
            chars: Sequence[str] | None = None, strip: bool = True, optimize=True) -> list[str]:
    """Greedy-decoded strings for ``images`` [N, 3, H, W] through ``model`` (onnxruntime CPU).

    With ``strip`` (the default) leading and trailing spaces are removed: the
    reference lines never have them, and the model tends to read a space into
    the blank margin of a crop, which is not a misread character.
    """
    sess = _session(model, threads, optimize)
    name = sess.get_inputs()[0].name
    if chars is None:
        meta = sess.get_modelmeta().custom_metadata_map
        # A rewritten (e.g. quantized) model may have lost the metadata: use the
        # installed model's dictionary then; `decode` checks the class count.
        chars = _charset_from_meta(meta, model) if "character" in meta else charset()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise OCRDataError(f"images must have shape [N, 3, H, W], got {images.shape}")
    preds: list[str] = []
    for i in range(0, len(images), batch_size):
        out = sess.run(None, {name: np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)})[0]
        preds.extend(decode(out, chars))
    return [p.strip(" ") for p in preds] if strip else preds


def evaluate(model, images: np.ndarray, texts: Sequence[str], batch_size: int = 16,
             threads: int | None = None, optimize=True) -> float:
    """Character accuracy of ``model`` (path, ModelProto or bytes) on ``images`` / ``texts``."""
    if len(images) != len(texts):
        raise OCRDataError(f"{len(images)} images but {len(texts)} texts")
    return char_accuracy(predict(model, images, batch_size, threads, optimize=optimize), texts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="ONNX models to score (default: the installed PP-OCRv4 recogniser)")
    ap.add_argument("--n", type=int, default=300, help="test lines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--show", type=int, default=0, help="print this many misread lines per model")
    args = ap.parse_args(argv)
    models = args.models or [model_path()]
    t0 = time.perf_counter()
    images, texts = dataset(args.n, seed=args.seed)
    print(f"data           {args.n} lines (seed {args.seed}) in {time.perf_counter() - t0:.1f} s")
    for model in models:
        t1 = time.perf_counter()
        preds = predict(model, images, batch_size=args.batch_size, threads=args.threads)
        dt = time.perf_counter() - t1
        acc = char_accuracy(preds, texts)
        wrong = [(t, p) for t, p in zip(texts, preds) if t != p]
        print(f"model          {model}")
        print(f"char accuracy  {acc:.4f} ({len(texts) - len(wrong)}/{len(texts)} lines exact); "
              f"inference+decode {dt:.1f} s")
        for t, p in wrong[: args.show]:
            print(f"    {t!r:24} -> {p!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
