"""The search driver: per-edge bits, float fallbacks and thresholds vs accuracy and measured latency."""
from .driver import SearchResult, Trial, load_result, pareto_front, search  # noqa: F401
from .space import Config, SearchSpace, build_space  # noqa: F401


# ``hago.search`` is both this package and the public function ``hago.search(graph, spec, ...)``:
# make the package callable so that importing a submodule never shadows the function.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
