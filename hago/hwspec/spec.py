"""Hardware specs: which ops a target runs in integer, with which types.

A spec is a versioned JSON file (see ``hwspecs/hago-spec.schema.json`` and
``docs/HWSPEC.md``). It follows HAGO's per-op descriptor idea: each op has a
list of **signatures** (per-input dtype and bit-widths, accumulator, output),
tried in order. It adds what real targets need: layered defaults that op
signatures refer to by role (``"activation"``, ``"weight"``, ``"bias"``) and
may override, fusion groups with no quantizer inside, fixed output ranges
(Softmax/Sigmoid), ops whose output reuses the input scale, and the target's
integer arithmetic rules (requantization, rounding, AVX2's saturating u8 x s8
pair sums).

``load_spec(path)`` validates everything and raises :class:`SpecError` with the
file, the JSON path and what was expected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from ..errors import SpecError

SPEC_VERSION = 1
ROLES = ("activation", "weight", "bias")
INT_DTYPES = {"int4": (True, 4), "uint4": (False, 4), "int8": (True, 8), "uint8": (False, 8),
              "int16": (True, 16), "uint16": (False, 16), "int32": (True, 32)}
FLOAT_DTYPES = ("float32", "float16", "none")  # "none": an input that is never quantized (shapes, indices)
GRANULARITIES = ("per_tensor", "per_channel")
REQUANTIZE = ("fixed_point", "float")
ROUNDING = ("half_to_even", "half_away_from_zero", "half_up")
ACCUMULATORS = ("int16", "int32")
TOP_KEYS = {"$schema", "hago_spec", "name", "description", "target", "features", "arithmetic",
            "defaults", "ops", "fusion", "fixed_ranges", "same_scale_ops", "sparq"}
TARGET_KINDS = ("llvm", "cuda", "c")


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    """What one op input must be: a float edge or an integer edge of some dtype and bits."""

    role: str
    dtype: str
    bits: tuple[int, int] = (8, 8)  # allowed range, inclusive
    symmetric: bool | None = None  # None: either
    granularity: tuple[str, ...] = ("per_tensor",)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def signed(self) -> bool:
        return INT_DTYPES[self.dtype][0]

    @property
    def max_bits(self) -> int:
        return self.bits[1]

    @property
    def min_bits(self) -> int:
        return self.bits[0]

    @property
    def per_channel(self) -> bool:
        return "per_channel" in self.granularity


@dataclasses.dataclass(frozen=True)
class Signature:
    """One way an op can run: its inputs' requirements, accumulator and output dtype."""

    op: str
    index: int
    inputs: tuple[TensorDesc, ...]
    accumulator: str | None = None
    output: str = "float32"
    pair_saturation: str | None = None  # e.g. "int16": u8*s8 pair sums saturate (AVX2 vpmaddubsw)

    @property
    def is_integer(self) -> bool:
        return any(not d.is_float for d in self.inputs)

    def input(self, i: int) -> TensorDesc | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def short(self) -> str:
        ins = ",".join(d.dtype if d.is_float else f"{d.dtype}:{d.bits[0]}-{d.bits[1]}" for d in self.inputs)
        acc = f"->{self.accumulator}" if self.accumulator else ""
        return f"{self.op}[{self.index}]({ins}){acc}->{self.output}"


@dataclasses.dataclass
class OpSpec:
    op: str
    signatures: list[Signature]

    @property
    def integer_signatures(self) -> list[Signature]:
        return [s for s in self.signatures if s.is_integer]

    @property
    def float_signatures(self) -> list[Signature]:
        return [s for s in self.signatures if not s.is_integer]


@dataclasses.dataclass
class HardwareSpec:
    """A validated hardware spec."""

    name: str
    description: str
    target: dict
    features: tuple[str, ...]
    arithmetic: dict
    defaults: dict[str, TensorDesc]
    ops: dict[str, OpSpec]
    fusion: list[tuple[str, ...]]
    fixed_ranges: dict[str, tuple[float, float]]
    same_scale_ops: tuple[str, ...]
    sparq: dict | None
    path: str | None
    raw: dict

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def requantize(self) -> str:
        return self.arithmetic.get("requantize", "fixed_point")

    @property
    def rounding(self) -> str:
        return self.arithmetic.get("rounding", "half_to_even")

    def op(self, op_type: str) -> OpSpec | None:
        return self.ops.get(op_type)

    def integer_signatures(self, op_type: str) -> list[Signature]:
        o = self.ops.get(op_type)
        return o.integer_signatures if o else []

    def fusion_followers(self, leader: str) -> set[str]:
        """Ops that fuse after ``leader`` with no quantizer between them."""
        return {grp[1] for grp in self.fusion if len(grp) >= 2 and grp[0] == leader}

    def describe(self) -> str:
        lines = [f"hardware spec {self.name} ({self.path or 'in memory'})", f"  target: {json.dumps(self.target)}"]
        if self.features:
            lines.append(f"  features: {', '.join(self.features)}")
        for op, o in sorted(self.ops.items()):
            for s in o.signatures:
                lines.append(f"  {s.short()}")
        if self.fusion:
            lines.append("  fusion: " + "; ".join("+".join(f) for f in self.fusion))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<HardwareSpec {self.name}: {len(self.ops)} ops, target {self.target.get('kind')}>"


# ---------------------------------------------------------------------------------------------
# Loading and validation


class _Ctx:
    def __init__(self, file: str | None):
        self.file = file

    def error(self, path: str, msg: str) -> SpecError:
        return SpecError(msg, file=self.file, path=path)


def _no_duplicates(ctx: _Ctx):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ctx.error(f"key {k!r}", f"duplicate key {k!r} (JSON objects must not repeat keys)")
            seen.add(k)
        return dict(pairs)

    return hook


def _expect(ctx: _Ctx, path: str, value, types, what: str):
    if types is bool:
        ok = isinstance(value, bool)
    elif types is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, types) and not isinstance(value, bool)
    if not ok:
        got = type(value).__name__ if not isinstance(value, str) else f"the string {value!r}"
        raise ctx.error(path, f"expected {what}, got {got}")
    return value


def _enum(ctx, path, value, options, what):
    _expect(ctx, path, value, str, what)
    if value not in options:
        raise ctx.error(path, f"expected {what} (one of {', '.join(options)}), got {value!r}")
    return value


def _check_keys(ctx, path, obj: dict, allowed: set, required: set = frozenset()):
    for k in obj:
        if k not in allowed:
            raise ctx.error(f"{path}.{k}", f"unknown field {k!r}; allowed: {', '.join(sorted(allowed))}")
    for k in required:
        if k not in obj:
            raise ctx.error(path, f"missing required field {k!r}")


def _bits(ctx, path, value, dtype) -> tuple[int, int]:
    width = INT_DTYPES[dtype][1]
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        lo, hi = value
    else:
        raise ctx.error(path, f"expected bits as an integer or [min, max], got {value!r}")
    if not (2 <= lo <= hi):
        raise ctx.error(path, f"impossible bit range {value!r}: need 2 <= min <= max")
    if hi > width:
        raise ctx.error(path, f"{hi} bits do not fit the {dtype} container ({width} bits)")
    return lo, hi


_DESC_KEYS = {"role", "dtype", "bits", "symmetric", "granularity"}


def _desc(ctx, path, raw, role: str | None, defaults: dict[str, TensorDesc]) -> TensorDesc:
    """Parse a tensor descriptor: a role name, a dtype name, or an object overriding a role's default."""
    if isinstance(raw, str):
        if raw in ROLES:
            if raw not in defaults:
                raise ctx.error(path, f"role {raw!r} used but defaults.{raw} is not defined")
            return defaults[raw]
        if raw in FLOAT_DTYPES:
            return TensorDesc(role=role or "activation", dtype=raw, bits=(32, 32), granularity=())
        if raw in INT_DTYPES:
            w = INT_DTYPES[raw][1]
            return TensorDesc(role=role or "activation", dtype=raw, bits=(w, w))
        raise ctx.error(path, f"expected a role ({', '.join(ROLES)}) or a dtype "
                              f"({', '.join(list(INT_DTYPES) + list(FLOAT_DTYPES))}), got {raw!r}")
    _expect(ctx, path, raw, dict, "a tensor descriptor object or string")
    _check_keys(ctx, path, raw, _DESC_KEYS)
    base_role = raw.get("role", role)
    if base_role is not None:
        _enum(ctx, f"{path}.role", base_role, ROLES, "a role")
    base = defaults.get(base_role) if base_role else None
    dtype = raw.get("dtype", base.dtype if base else None)
    if dtype is None:
        raise ctx.error(path, "missing required field 'dtype' (no role default to inherit it from)")
    _enum(ctx, f"{path}.dtype", dtype, tuple(INT_DTYPES) + FLOAT_DTYPES, "a dtype")
    if dtype in FLOAT_DTYPES:
        for k in ("bits", "symmetric", "granularity"):
            if k in raw:
                raise ctx.error(f"{path}.{k}", f"{k!r} makes no sense for a {dtype} input")
        return TensorDesc(role=base_role or "activation", dtype=dtype, bits=(32, 32), granularity=())
    width = INT_DTYPES[dtype][1]
    if "bits" in raw:
        bits = _bits(ctx, f"{path}.bits", raw["bits"], dtype)
    elif base is not None and not base.is_float and base.dtype == dtype:
        bits = base.bits
    else:
        bits = (width, width)
    if bits[1] > width:
        raise ctx.error(f"{path}.bits", f"{bits[1]} bits do not fit the {dtype} container ({width} bits)")
    symmetric = raw.get("symmetric", base.symmetric if base else None)
    if symmetric is not None:
        _expect(ctx, f"{path}.symmetric", symmetric, bool, "true or false")
    gran = raw.get("granularity", list(base.granularity) if base else ["per_tensor"])
    if isinstance(gran, str):
        gran = [gran]
    _expect(ctx, f"{path}.granularity", gran, list, "a granularity or a list of them")
    if not gran:
        raise ctx.error(f"{path}.granularity", "expected at least one granularity")
    for i, gv in enumerate(gran):
        _enum(ctx, f"{path}.granularity[{i}]", gv, GRANULARITIES, "a granularity")
    role_final = base_role or "activation"
    if role_final == "activation" and "per_channel" in gran:
        raise ctx.error(f"{path}.granularity", "per_channel activations are not supported (scales of activations are per tensor)")
    if role_final == "bias" and dtype != "int32":
        raise ctx.error(f"{path}.dtype", f"a bias must be int32 (it is added to the accumulator), got {dtype!r}")
    return TensorDesc(role=role_final, dtype=dtype, bits=bits, symmetric=symmetric, granularity=tuple(gran))


def _onnx_op_schema(op: str):
    import onnx.defs

    try:
        return onnx.defs.get_schema(op, "")
    except Exception:
        return None


_SIG_KEYS = {"inputs", "accumulator", "output", "pair_saturation"}


def _signature(ctx, path, raw, op: str, index: int, defaults, arithmetic) -> Signature:
    if isinstance(raw, str) and raw == "float":
        return Signature(op=op, index=index, inputs=(TensorDesc("activation", "float32", (32, 32), None, ()),), output="float32")
    _expect(ctx, path, raw, dict, "a signature object")
    _check_keys(ctx, path, raw, _SIG_KEYS, {"inputs"})
    ins = _expect(ctx, f"{path}.inputs", raw["inputs"], list, "a list of input descriptors")
    if not ins:
        raise ctx.error(f"{path}.inputs", "expected at least one input")
    schema = _onnx_op_schema(op)
    if schema is not None and schema.max_input < len(ins):
        raise ctx.error(f"{path}.inputs", f"{op} has at most {schema.max_input} inputs, the signature lists {len(ins)}")
    default_roles = {"Conv": ["activation", "weight", "bias"], "Gemm": ["activation", "weight", "bias"],
                     "MatMul": ["activation", "weight"], "ConvTranspose": ["activation", "weight", "bias"]}
    roles = default_roles.get(op, [])
    descs = tuple(_desc(ctx, f"{path}.inputs[{i}]", d, roles[i] if i < len(roles) else None, defaults) for i, d in enumerate(ins))
    acc = raw.get("accumulator")
    if acc is not None:
        _enum(ctx, f"{path}.accumulator", acc, ACCUMULATORS, "an accumulator dtype")
    output = raw.get("output", acc or ("float32" if all(d.is_float for d in descs) else "same"))
    _enum(ctx, f"{path}.output", output, tuple(INT_DTYPES) + FLOAT_DTYPES + ("same",), "an output dtype or 'same'")
    int_ins = [d for d in descs if not d.is_float and d.role != "bias"]
    if acc is not None:
        if not int_ins:
            raise ctx.error(f"{path}.accumulator", "an accumulator needs integer inputs")
        acc_w = INT_DTYPES[acc][1]
        if any(d.max_bits >= acc_w for d in int_ins):
            raise ctx.error(f"{path}.accumulator", f"an {acc} accumulator cannot hold products of "
                                                    f"{max(d.max_bits for d in int_ins)}-bit inputs")
        for i, d in enumerate(descs):
            if d.role == "bias" and not d.is_float and INT_DTYPES[d.dtype][1] > acc_w:
                raise ctx.error(f"{path}.inputs[{i}]", f"an int32 bias does not fit the {acc} accumulator; use \"{acc}\" or float32")
    if output in INT_DTYPES and int_ins and acc is None and output != "same":
        pass
    ps = raw.get("pair_saturation")
    if ps is not None:
        _enum(ctx, f"{path}.pair_saturation", ps, ("int16",), "the saturating pair-sum dtype")
    return Signature(op=op, index=index, inputs=descs, accumulator=acc, output=output, pair_saturation=ps)


def parse_spec(raw: Any, file: str | None = None) -> HardwareSpec:
    """Validate a parsed JSON spec and build a :class:`HardwareSpec`."""
    ctx = _Ctx(file)
    _expect(ctx, "$", raw, dict, "a JSON object at the top level")
    _check_keys(ctx, "$", raw, TOP_KEYS, {"hago_spec", "name", "target", "ops"})
    version = _expect(ctx, "$.hago_spec", raw["hago_spec"], int, "the spec format version (an integer)")
    if version != SPEC_VERSION:
        raise ctx.error("$.hago_spec", f"unsupported spec format version {version}; this hago reads version {SPEC_VERSION}")
    name = _expect(ctx, "$.name", raw["name"], str, "a name string")
    desc = _expect(ctx, "$.description", raw.get("description", ""), str, "a description string")

    target = _expect(ctx, "$.target", raw["target"], dict, "a TVM target as a JSON object (e.g. {\"kind\": \"llvm\"})")
    if "kind" not in target:
        raise ctx.error("$.target", "missing required field 'kind'")
    _enum(ctx, "$.target.kind", target["kind"], TARGET_KINDS, "a TVM target kind")
    for k in ("mcpu", "mtriple", "arch", "model"):
        if k in target:
            _expect(ctx, f"$.target.{k}", target[k], str, "a string")
    if "mattr" in target:
        _expect(ctx, "$.target.mattr", target["mattr"], list, "a list of strings such as \"+avx2\"")
        for i, a in enumerate(target["mattr"]):
            if not (isinstance(a, str) and a[:1] in "+-" and len(a) > 1):
                raise ctx.error(f"$.target.mattr[{i}]", f"expected a feature like \"+avx2\", got {a!r}")
    if target["kind"] == "cuda" and "arch" in target and not target["arch"].startswith("sm_"):
        raise ctx.error("$.target.arch", f"expected a CUDA arch like \"sm_80\", got {target['arch']!r}")

    features = _expect(ctx, "$.features", raw.get("features", []), list, "a list of feature names")
    for i, f in enumerate(features):
        _expect(ctx, f"$.features[{i}]", f, str, "a feature name string")

    arithmetic = _expect(ctx, "$.arithmetic", raw.get("arithmetic", {}), dict, "an object")
    _check_keys(ctx, "$.arithmetic", arithmetic, {"requantize", "rounding", "note"})
    if "requantize" in arithmetic:
        _enum(ctx, "$.arithmetic.requantize", arithmetic["requantize"], REQUANTIZE, "a requantization rule")
    if "rounding" in arithmetic:
        _enum(ctx, "$.arithmetic.rounding", arithmetic["rounding"], ROUNDING, "a rounding mode")

    defaults_raw = _expect(ctx, "$.defaults", raw.get("defaults", {}), dict, "an object")
    _check_keys(ctx, "$.defaults", defaults_raw, set(ROLES))
    defaults: dict[str, TensorDesc] = {}
    for role in ROLES:  # activation and weight first, so nothing refers to an undefined default
        if role in defaults_raw:
            d = defaults_raw[role]
            if isinstance(d, dict) and "role" in d:
                raise ctx.error(f"$.defaults.{role}.role", "a default's role is its key; remove 'role'")
            defaults[role] = _desc(ctx, f"$.defaults.{role}", {**d, "role": role} if isinstance(d, dict) else d, role, {})

    ops_raw = _expect(ctx, "$.ops", raw["ops"], dict, "an object mapping ONNX op types to {\"signatures\": [...]}")
    if not ops_raw:
        raise ctx.error("$.ops", "expected at least one op")
    ops: dict[str, OpSpec] = {}
    for op, o in ops_raw.items():
        p = f"$.ops.{op}"
        if _onnx_op_schema(op) is None:
            raise ctx.error(p, f"unknown op {op!r}: not an ONNX operator of the default domain")
        _expect(ctx, p, o, dict, "an object with a 'signatures' list")
        _check_keys(ctx, p, o, {"signatures"}, {"signatures"})
        sigs_raw = _expect(ctx, f"{p}.signatures", o["signatures"], list, "a list of signatures")
        if not sigs_raw:
            raise ctx.error(f"{p}.signatures", "expected at least one signature")
        sigs = [_signature(ctx, f"{p}.signatures[{i}]", s, op, i, defaults, arithmetic) for i, s in enumerate(sigs_raw)]
        ops[op] = OpSpec(op, sigs)

    fusion_raw = _expect(ctx, "$.fusion", raw.get("fusion", []), list, "a list of op-type lists")
    fusion = []
    for i, grp in enumerate(fusion_raw):
        _expect(ctx, f"$.fusion[{i}]", grp, list, "a list of op types such as [\"Conv\", \"Relu\"]")
        if len(grp) != 2:
            raise ctx.error(f"$.fusion[{i}]", f"expected a pair [leader, activation], got {len(grp)} ops")
        for j, op in enumerate(grp):
            _expect(ctx, f"$.fusion[{i}][{j}]", op, str, "an op type")
            if op not in ops:
                raise ctx.error(f"$.fusion[{i}][{j}]", f"{op!r} is not listed in ops")
        if not ops[grp[0]].integer_signatures:
            raise ctx.error(f"$.fusion[{i}][0]", f"{grp[0]} has no integer signature to fuse into")
        fusion.append(tuple(grp))

    fixed_raw = _expect(ctx, "$.fixed_ranges", raw.get("fixed_ranges", {}), dict, "an object mapping op types to [min, max]")
    fixed = {}
    for op, rng in fixed_raw.items():
        p = f"$.fixed_ranges.{op}"
        if _onnx_op_schema(op) is None:
            raise ctx.error(p, f"unknown op {op!r}")
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)):
            raise ctx.error(p, f"expected [min, max] numbers, got {rng!r}")
        if not rng[0] < rng[1]:
            raise ctx.error(p, f"impossible range {rng!r}: min must be below max")
        fixed[op] = (float(rng[0]), float(rng[1]))

    same = _expect(ctx, "$.same_scale_ops", raw.get("same_scale_ops", []), list, "a list of op types")
    for i, op in enumerate(same):
        _expect(ctx, f"$.same_scale_ops[{i}]", op, str, "an op type")
        if _onnx_op_schema(op) is None:
            raise ctx.error(f"$.same_scale_ops[{i}]", f"unknown op {op!r}")

    sparq = raw.get("sparq")
    if sparq is not None:
        _expect(ctx, "$.sparq", sparq, dict, "an object")
        _check_keys(ctx, "$.sparq", sparq, {"window_bits", "placements", "pairs", "speedup"}, {"window_bits"})
        wb = _expect(ctx, "$.sparq.window_bits", sparq["window_bits"], int, "an integer")
        if not 2 <= wb < 8:
            raise ctx.error("$.sparq.window_bits", f"expected 2..7 bits, got {wb}")
        if "placements" in sparq:
            pl = _expect(ctx, "$.sparq.placements", sparq["placements"], int, "an integer")
            if pl not in (2, 3, 5):
                raise ctx.error("$.sparq.placements", f"expected 2, 3 or 5 window placements, got {pl}")
        if "pairs" in sparq:
            _expect(ctx, "$.sparq.pairs", sparq["pairs"], bool, "true or false")

    return HardwareSpec(name=name, description=desc, target=dict(target), features=tuple(features),
                        arithmetic=dict(arithmetic), defaults=defaults, ops=ops, fusion=fusion, fixed_ranges=fixed,
                        same_scale_ops=tuple(same), sparq=sparq, path=file, raw=raw)


def load_spec(path_or_dict) -> HardwareSpec:
    """Load and validate a hardware spec from a JSON file (or an already parsed dict).

    A bare name such as ``"x86_avx2"`` loads the spec shipped in ``hwspecs/``; ``"host"`` the shipped spec that
    fits this machine's CPU (:func:`host_spec_name`).
    """
    if isinstance(path_or_dict, HardwareSpec):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        return parse_spec(path_or_dict, None)
    path = os.fspath(path_or_dict)
    if path == "host" and not os.path.exists(path):
        path = host_spec_name()
    if not os.path.exists(path):
        shipped = shipped_spec_path(path)
        if shipped is None:
            raise SpecError(f"no such file (shipped specs: {', '.join(list_shipped_specs())})", file=path)
        path = shipped
    ctx = _Ctx(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read the file ({e})", file=path) from None
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicates(ctx))
    except json.JSONDecodeError as e:
        raise SpecError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})", file=path) from None
    return parse_spec(raw, path)


def _spec_dirs() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(here, "specs"), os.path.join(os.path.dirname(os.path.dirname(here)), "hwspecs")]


def list_shipped_specs() -> list[str]:
    names = set()
    for d in _spec_dirs():
        if os.path.isdir(d):
            names.update(f[:-5] for f in os.listdir(d) if f.endswith(".json") and not f.endswith(".schema.json"))
    return sorted(names)


def shipped_spec_path(name: str) -> str | None:
    base = name[:-5] if name.endswith(".json") else name
    if os.sep in base or "/" in base:
        return None
    for d in _spec_dirs():
        p = os.path.join(d, base + ".json")
        if os.path.exists(p):
            return p
    return None


def cpu_flags() -> set[str]:
    """This machine's CPU flags as /proc/cpuinfo spells them (x86 ``flags`` or ARM ``Features``; empty if unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_spec_name(flags: set[str] | None = None) -> str:
    """The shipped spec for this machine's CPU: ``x86_avx512_vnni`` with AVX-512 VNNI (and BW), ``x86_avx2`` with
    AVX2, ``arm_cortex_a72`` on 64-bit ARM. ``flags``: CPU flags as /proc/cpuinfo spells them (default: read)."""
    import platform

    flags = cpu_flags() if flags is None else set(flags)
    arch = platform.machine().lower()
    if {"avx512_vnni", "avx512bw"} <= flags:
        return "x86_avx512_vnni"
    if "avx2" in flags:
        return "x86_avx2"
    if arch in ("aarch64", "arm64") or "asimd" in flags:
        return "arm_cortex_a72"
    raise SpecError(f"no shipped spec fits this CPU ({arch}, without AVX2 or NEON); pass a spec file",
                    file="host")
