"""Random-weight ONNX models for latency work (no torch, no download).

* :func:`mobilenetv2` builds the real MobileNetV2 topology (Sandler et al. 2018,
  torchvision layout) with ``onnx.helper``: a stride-2 3x3 stem, the 17 inverted
  residual blocks of the standard (t, c, n, s) table, a 1x1 conv to 1280 channels,
  GlobalAveragePool, Flatten and Gemm. Every convolution is followed by an explicit
  BatchNormalization node (so BN folding is exercised) and ReLU6 is ``Clip(0, 6)``.
  Weights are random (He-normal convolutions, BN statistics near identity; activations
  stay in range through the network), so
  the model is for latency and compile tests, not for accuracy.
* :func:`light_model` returns the path of one of the ``light_*.onnx`` models the
  ``onnx`` package ships for its backend tests (real architectures, small random
  weights).
"""
from __future__ import annotations

import os

import numpy as np

from hago.errors import HagoError

LIGHT_MODELS = ("resnet50", "squeezenet", "shufflenet", "densenet121", "inception_v1", "inception_v2",
                "vgg19", "bvlc_alexnet", "zfnet512")

# (expansion t, output channels c, repeats n, first stride s) -- MobileNetV2 Table 2
MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                   (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

OPSET = 17


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Channel rounding used by the reference MobileNetV2 implementations."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class _Builder:
    def __init__(self, seed: int):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.n = 0

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}_{self.n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, groups: int, prefix: str,
                act: bool) -> str:
        fan_in = cin // groups * k * k
        gain = 2.0 if act else 1.0  # He-normal before a ReLU6, LeCun-normal before a linear output
        w = (self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(gain / fan_in)).astype(np.float32)
        y = self.node("Conv", [x, self.init(f"{prefix}.conv.weight", w)], f"{prefix}/Conv",
                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups,
                      dilations=[1, 1])
        bn = [self.init(f"{prefix}.bn.{nm}", arr.astype(np.float32)) for nm, arr in (
            ("weight", self.rng.uniform(0.5, 1.5, cout)),
            ("bias", self.rng.normal(0.0, 0.1, cout)),
            ("running_mean", self.rng.normal(0.0, 0.1, cout)),
            ("running_var", self.rng.uniform(0.5, 1.5, cout)))]
        y = self.node("BatchNormalization", [y, *bn], f"{prefix}/BatchNormalization", epsilon=1e-5)
        if act:
            y = self.node("Clip", [y, "relu6_min", "relu6_max"], f"{prefix}/Clip")
        return y


def mobilenetv2(input_size: int = 224, width: float = 1.0, num_classes: int = 1000, seed: int = 0):
    """MobileNetV2 (``width`` multiplier, ``input_size`` x ``input_size`` RGB) with random weights.

    Input ``input`` float32 [N, 3, input_size, input_size], output ``logits`` [N, num_classes];
    the batch axis is symbolic (``N``). Returns an ``onnx.ModelProto`` (opset 17) that passes
    ``onnx.checker.check_model``. The same ``seed`` gives the same weights.
    """
    import onnx
    from onnx import TensorProto, helper

    if not isinstance(input_size, (int, np.integer)) or input_size < 1:
        raise HagoError(f"mobilenetv2: input_size must be a positive integer, got {input_size!r}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise HagoError(f"mobilenetv2: width must be a positive number, got {width!r}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise HagoError(f"mobilenetv2: num_classes must be a positive integer, got {num_classes!r}")

    b = _Builder(seed)
    b.init("relu6_min", np.array(0.0, np.float32))
    b.init("relu6_max", np.array(6.0, np.float32))
    cin = _make_divisible(32 * width)
    last = _make_divisible(1280 * max(1.0, width))
    x = b.conv_bn("input", 3, cin, 3, 2, 1, "features.0", act=True)
    idx = 1
    for t, c, n, s in MOBILENETV2_CFG:
        cout = _make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}"
            hidden = int(round(cin * t))
            y = x
            if t != 1:
                y = b.conv_bn(y, cin, hidden, 1, 1, 1, f"{p}.expand", act=True)
            y = b.conv_bn(y, hidden, hidden, 3, stride, hidden, f"{p}.depthwise", act=True)
            y = b.conv_bn(y, hidden, cout, 1, 1, 1, f"{p}.project", act=False)
            if stride == 1 and cin == cout:
                y = b.node("Add", [x, y], f"{p}/Add")
            x, cin = y, cout
            idx += 1
    x = b.conv_bn(x, cin, last, 1, 1, 1, f"features.{idx}", act=True)
    x = b.node("GlobalAveragePool", [x], "GlobalAveragePool")
    x = b.node("Flatten", [x], "Flatten", axis=1)
    w = (b.rng.standard_normal((num_classes, last)) * 0.01).astype(np.float32)
    bias = np.zeros(num_classes, np.float32)
    b.nodes.append(helper.make_node("Gemm", [x, b.init("classifier.weight", w), b.init("classifier.bias", bias)],
                                    ["logits"], name="classifier/Gemm", transB=1))
    graph = helper.make_graph(
        b.nodes, f"mobilenetv2_{input_size}_w{width:g}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="hago.examples.zoo")
    model.ir_version = 8  # readable by every onnxruntime that supports opset 17
    onnx.checker.check_model(model)
    return model


def light_model(name: str) -> str:
    """Path of ``onnx/backend/test/data/light/light_<name>.onnx`` inside the installed onnx package.

    ``name`` is one of :data:`LIGHT_MODELS` (resnet50, squeezenet, shufflenet, densenet121,
    inception_v1, inception_v2, vgg19, bvlc_alexnet, zfnet512); a ``light_`` prefix or
    ``.onnx`` suffix is accepted.
    """
    key = str(name)
    if key.startswith("light_"):
        key = key[len("light_"):]
    if key.endswith(".onnx"):
        key = key[:-len(".onnx")]
    if key not in LIGHT_MODELS:
        raise HagoError(f"unknown light model {name!r}: expected one of {', '.join(LIGHT_MODELS)}")
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is a hard dependency of hago
        raise HagoError("hago.examples.zoo.light_model needs the 'onnx' package: pip install onnx") from e
    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{key}.onnx")
    if not os.path.exists(path):
        raise HagoError(f"light model {key!r} not found at {path}: this onnx {onnx.__version__} "
                        "installation does not ship the backend test data")
    return path
