"""Hardware spec loading and validation: every shipped spec loads; each malformed spec gives one clear error."""
import copy
import json
import os

import pytest

import hago
from hago.errors import SpecError
from hago.hwspec import list_shipped_specs, load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["x86_avx2", "x86_avx512_vnni", "cuda_sm80", "arm_cortex_a72", "hago_accelerator", "hago_accelerator_int16",
           "sparq_accelerator"]


def test_shipped_specs_load():
    assert set(SHIPPED) <= set(list_shipped_specs())
    for name in SHIPPED:
        s = load_spec(os.path.join(ROOT, "hwspecs", name + ".json"))
        assert s.name == name
        assert s.integer_signatures("Conv"), name
        assert s.target["kind"] in ("llvm", "cuda")


def test_shipped_specs_match_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    with open(os.path.join(ROOT, "hwspecs", "hago-spec.schema.json")) as f:
        schema = json.load(f)
    for name in SHIPPED:
        with open(os.path.join(ROOT, "hwspecs", name + ".json")) as f:
            jsonschema.validate(json.load(f), schema)


def test_spec_semantics():
    avx2 = load_spec("x86_avx2")
    conv = avx2.integer_signatures("Conv")[0]
    assert conv.inputs[0].dtype == "uint8" and conv.inputs[1].dtype == "int8"
    assert conv.inputs[1].max_bits == 7  # vpmaddubsw saturation is avoided with 7-bit weights
    assert conv.pair_saturation == "int16"
    assert conv.accumulator == "int32"
    vnni = load_spec("x86_avx512_vnni")
    assert vnni.integer_signatures("Conv")[0].inputs[1].max_bits == 8
    acc16 = load_spec("hago_accelerator_int16")
    assert acc16.integer_signatures("Conv")[0].accumulator == "int16"
    assert acc16.op("Gemm").integer_signatures == []  # dense stays float in HAGO's accelerator
    assert ("Conv", "Relu") in avx2.fusion
    assert avx2.fixed_ranges["Softmax"] == (0.0, 1.0)


def _base():
    with open(os.path.join(ROOT, "hwspecs", "x86_avx2.json")) as f:
        return json.load(f)


def _mut(fn):
    d = _base()
    fn(d)
    return d


BAD = {
    "missing name": (lambda d: d.pop("name"), "missing required field 'name'"),
    "missing target": (lambda d: d.pop("target"), "missing required field 'target'"),
    "missing ops": (lambda d: d.pop("ops"), "missing required field 'ops'"),
    "wrong version": (lambda d: d.update(hago_spec=7), "unsupported spec format version 7"),
    "version as string": (lambda d: d.update(hago_spec="1"), "$.hago_spec"),
    "unknown top field": (lambda d: d.update(colour="red"), "unknown field 'colour'"),
    "unknown op": (lambda d: d["ops"].update(Convolution={"signatures": ["float"]}), "unknown op 'Convolution'"),
    "bits too wide": (lambda d: d["defaults"]["weight"].update(bits=[2, 9]), "9 bits do not fit the int8 container"),
    "bits reversed": (lambda d: d["defaults"]["activation"].update(bits=[8, 4]), "impossible bit range"),
    "bits as string": (lambda d: d["defaults"]["activation"].update(bits="8"), "expected bits"),
    "string boolean": (lambda d: d["defaults"]["weight"].update(symmetric="True"), "expected true or false, got the string 'True'"),
    "unknown dtype": (lambda d: d["defaults"]["activation"].update(dtype="uint9"), "expected a dtype"),
    "per-channel activation": (lambda d: d["defaults"]["activation"].update(granularity=["per_channel"]), "per_channel activations"),
    "bad granularity": (lambda d: d["defaults"]["weight"].update(granularity=["per_row"]), "expected a granularity"),
    "narrow accumulator": (lambda d: d["ops"]["Conv"]["signatures"][0].update(accumulator="int8"), "expected an accumulator dtype"),
    "accumulator too small": (lambda d: d["ops"]["Conv"]["signatures"].insert(0, {"inputs": [{"role": "activation", "dtype": "int16"}, "weight"], "accumulator": "int16"}), "cannot hold products"),
    "too many inputs": (lambda d: d["ops"]["Relu"]["signatures"].insert(0, {"inputs": ["activation", "activation"]}), "Relu has at most 1 inputs"),
    "empty signatures": (lambda d: d["ops"]["Conv"].update(signatures=[]), "expected at least one signature"),
    "target without kind": (lambda d: d.update(target={"mcpu": "x"}), "missing required field 'kind'"),
    "bad target kind": (lambda d: d.update(target={"kind": "fpga"}), "expected a TVM target kind"),
    "bad mattr": (lambda d: d["target"].update(mattr=["avx2"]), "expected a feature like"),
    "fusion of unknown op": (lambda d: d.update(fusion=[["Conv", "Gelu"]]), "'Gelu' is not listed in ops"),
    "fixed range reversed": (lambda d: d.update(fixed_ranges={"Sigmoid": [1, 0]}), "impossible range"),
    "bias not int32": (lambda d: d["defaults"].update(bias={"dtype": "int8"}), "a bias must be int32"),
    "bad requantize": (lambda d: d["arithmetic"].update(requantize="magic"), "expected a requantization rule"),
    "signature not object": (lambda d: d["ops"]["Conv"].update(signatures=[42]), "expected a signature object"),
    "bits on float input": (lambda d: d["ops"]["Add"]["signatures"].insert(0, {"inputs": [{"dtype": "float32", "bits": 8}]}), "'bits' makes no sense"),
    "sparq window": (lambda d: d.update(sparq={"window_bits": 9}), "expected 2..7 bits"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_spec_errors(case, tmp_path):
    fn, expected = BAD[case]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_mut(fn)))
    with pytest.raises(SpecError) as e:
        load_spec(str(path))
    msg = str(e.value)
    assert str(path) in msg, msg  # names the file
    assert expected in msg, msg


def test_bad_json_and_duplicates(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"hago_spec": 1, "name": "x",')
    with pytest.raises(SpecError, match=r"broken.json: invalid JSON: .*line 1"):
        load_spec(str(p))
    p.write_text('{"hago_spec": 1, "name": "a", "name": "b", "target": {"kind": "llvm"}, "ops": {}}')
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        load_spec(str(p))
    with pytest.raises(SpecError, match="no such file"):
        load_spec(str(tmp_path / "missing.json"))
    p.write_text("[1, 2]")
    with pytest.raises(SpecError, match="expected a JSON object at the top level"):
        load_spec(str(p))


def test_error_names_json_path(tmp_path):
    d = _base()
    d["ops"]["Conv"]["signatures"][0]["inputs"][1] = {"role": "weight", "bits": [2, 12]}
    p = tmp_path / "s.json"
    p.write_text(json.dumps(d))
    with pytest.raises(SpecError) as e:
        load_spec(str(p))
    assert "$.ops.Conv.signatures[0].inputs[1].bits" in str(e.value)


def test_cli_spec_check(tmp_path, capsys):
    from hago.cli import main

    assert main(["spec", "check", os.path.join(ROOT, "hwspecs", "x86_avx2.json")]) == 0
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(_mut(lambda d: d.pop("ops"))))
    assert main(["spec", "check", str(p)]) == 2
    err = capsys.readouterr().err
    assert "missing required field 'ops'" in err and "Traceback" not in err


def test_host_spec_name_follows_cpu_flags():
    from hago.hwspec import host_spec_name

    assert host_spec_name({"avx2", "avx512bw", "avx512_vnni"}) == "x86_avx512_vnni"
    assert host_spec_name({"avx2", "avx512f"}) == "x86_avx2"
    assert host_spec_name({"fp", "asimd"}) == "arm_cortex_a72"
    assert hago.load_spec("host").name == host_spec_name()
