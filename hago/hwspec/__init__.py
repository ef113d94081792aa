"""Hardware specs (JSON): which ops run in integer on a target, with which types."""
from .spec import (  # noqa: F401
    HardwareSpec,
    OpSpec,
    Signature,
    TensorDesc,
    host_spec_name,
    list_shipped_specs,
    load_spec,
    parse_spec,
)
