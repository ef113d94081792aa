"""Small ONNX graphs built with onnx.helper for tests (deterministic random weights)."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def conv_bn_net(seed=0, batch="N", opset=13, dropout=True):
    """input [N,3,16,16] -> Conv-BN-Relu -> Dropout -> Conv-BN-Relu -> MaxPool -> Add(residual conv) -> GAP -> Flatten -> Gemm."""
    rs = np.random.RandomState(seed)
    inits = [
        _init("w1", rs.randn(8, 3, 3, 3) * 0.3), _init("b1", rs.randn(8) * 0.1),
        _init("g1", 1 + 0.1 * rs.randn(8)), _init("be1", 0.1 * rs.randn(8)), _init("m1", 0.1 * rs.randn(8)), _init("v1", 0.5 + rs.rand(8)),
        _init("w2", rs.randn(8, 8, 3, 3) * 0.2),
        _init("g2", 1 + 0.1 * rs.randn(8)), _init("be2", 0.1 * rs.randn(8)), _init("m2", 0.1 * rs.randn(8)), _init("v2", 0.5 + rs.rand(8)),
        _init("w3", rs.randn(8, 8, 1, 1) * 0.3), _init("b3", rs.randn(8) * 0.1),
        _init("wf", rs.randn(10, 8) * 0.3), _init("bf", rs.randn(10) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["bn1"]),
        helper.make_node("Relu", ["bn1"], ["r1"]),
    ]
    cur = "r1"
    if dropout:
        nodes.append(helper.make_node("Dropout", ["r1"], ["d1"]))
        nodes.append(helper.make_node("Identity", ["d1"], ["id1"]))
        cur = "id1"
    nodes += [
        helper.make_node("Conv", [cur, "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["bn2"]),
        helper.make_node("Relu", ["bn2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"]),
        helper.make_node("Add", ["c3", "p2"], ["a3"]),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    g = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def dynamic_reshape_net(seed=0):
    """Symbolic N, H, W; a Shape -> Gather -> Concat -> Reshape chain; MatMul on a constant."""
    rs = np.random.RandomState(seed)
    inits = [_init("w", rs.randn(4, 4, 3, 3) * 0.3), _init("wm", rs.randn(4, 6) * 0.3),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "idx0"),
             numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "tail")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Shape", ["t"], ["s"]),
        helper.make_node("Gather", ["s", "idx0"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "tail"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["t", "newshape"], ["flat"]),  # [N, H*W, 4]
        helper.make_node("MatMul", ["flat", "wm"], ["y"]),
    ]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def control_flow_net(seed=0):
    """A Conv followed by an If whose branches differ, and a Loop that accumulates."""
    rs = np.random.RandomState(seed)
    inits = [_init("w", rs.randn(4, 2, 3, 3) * 0.3), _init("two", np.array(2.0)),
             numpy_helper.from_array(np.array(3, dtype=np.int64), "trip")]
    then_g = helper.make_graph([helper.make_node("Mul", ["r", "two"], ["o_then"])], "then", [],
                               [helper.make_tensor_value_info("o_then", TensorProto.FLOAT, [1, 4, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Neg", ["r"], ["o_else"])], "else", [],
                               [helper.make_tensor_value_info("o_else", TensorProto.FLOAT, [1, 4, 8, 8])])
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "two"], ["acc_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 4, 8, 8])])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "two"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "", "branch"], ["looped"], body=body),
    ]
    g = helper.make_graph(nodes, "cf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                          [helper.make_tensor_value_info("looped", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def calib(shape, n=4, seed=1, name="x"):
    rs = np.random.RandomState(seed)
    return [{name: rs.randn(*shape).astype(np.float32)} for _ in range(n)]
