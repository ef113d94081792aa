"""hago's graph IR (onnx-ir based): load, canonicalize, annotate edges, export QDQ."""
from .annotation import EdgeAnnotation  # noqa: F401
from .graph import Fallback, Graph, load  # noqa: F401
