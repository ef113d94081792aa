"""Shared helpers of the benchmark scripts."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
EXAMPLE_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hago", "examples",
                              "models")
SEED_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hago", "mnist_seeds")


def add_network_args(ap) -> None:
    """The MNIST benches' ``--train-seeds`` / ``--seed-dir`` options (see :func:`mnist_model`)."""
    ap.add_argument("--train-seeds", default="0",
                    help="MNIST: comma-separated training seeds of each model; 0 is the shipped model, the others are "
                         "trained once by bench/models/train_mnist.py (torch, the [train] extra) into --seed-dir; "
                         "with several, a summary over the trained networks follows")
    ap.add_argument("--seed-dir", default=SEED_DIR, help="where the models of other training seeds are kept")


def network_seeds(a) -> list:
    return [int(x) for x in a.train_seeds.split(",")]


def paired(d, digits: int = 2) -> str:
    """Paired differences ``d`` (one per run): ``mean +- standard error (above / equal / below zero)``."""
    d = np.asarray(d, np.float64)
    se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
    return (f"{d.mean():+.{digits}f} +- {se:.{digits}f} "
            f"({int(np.sum(d > 1e-9))} / {int(np.sum(np.abs(d) <= 1e-9))} / {int(np.sum(d < -1e-9))})")


def mnist_model(name: str, train_seed: int = 0, seed_dir: str = SEED_DIR) -> str:
    """The ONNX file of the MNIST example ``name`` (``mnist_cnn``, ``mnist_resnet``, ...) trained with
    ``train_seed``. Seed 0 is the shipped model; another seed's model is ``seed_dir/s<seed>/<name>.onnx``,
    trained the first time by ``bench/models/train_mnist.py --seed <seed>`` (same recipe; needs torch, the
    ``[train]`` extra; under a minute per model on this machine)."""
    if train_seed == 0:
        return os.path.join(EXAMPLE_MODELS, name + ".onnx")
    out = os.path.join(seed_dir, f"s{train_seed}")
    path = os.path.join(out, name + ".onnx")
    if not os.path.exists(path):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "train_mnist.py")
        print(f"  training {name} with seed {train_seed} into {out}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, script, "--out", out, "--models", name.removeprefix("mnist_"),
                        "--seed", str(train_seed)], check=True, stdout=sys.stderr)
    return path


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        flags = ",".join(x for x in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {x} " in txt)
    except OSError:
        pass
    return f"{cpu or platform.machine()} ({os.cpu_count()} cores; {flags})"


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The onnx package's light models have constant weights; give every float initializer He-style random values
    (BatchNorm variances positive) so activations and latencies are those of a real network."""
    rs = np.random.RandomState(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    bn_params = set()
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            bn_params.update(n.input[1:5])
            scale, bias, mean, var = n.input[1:5]
            bn_params.update([("var", var), ("scale", scale)])
    var_names = {x[1] for x in bn_params if isinstance(x, tuple) and x[0] == "var"}
    scale_names = {x[1] for x in bn_params if isinstance(x, tuple) and x[0] == "scale"}
    for i, t in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.ndim == 0:
            continue
        if t.name in var_names:
            a = (0.5 + rs.rand(*a.shape)).astype(np.float32)
        elif t.name in scale_names:
            a = (1.0 + 0.1 * rs.randn(*a.shape)).astype(np.float32)
        elif a.ndim >= 2:
            fan_in = int(np.prod(a.shape[1:]))
            a = (rs.randn(*a.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            a = (0.05 * rs.randn(*a.shape)).astype(np.float32)
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    return m


def light(name: str, seed: int = 0) -> onnx.ModelProto:
    return randomize_weights(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx")), seed)


def image_batches(shape, n: int, seed: int, name: str):
    rs = np.random.RandomState(seed)
    return [{name: rs.rand(*shape).astype(np.float32)} for _ in range(n)]
