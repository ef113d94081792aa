"""MetaSchedule tuning of a fused Relax module's kernels, with a persistent database per target.

:func:`tune_module` takes an IRModule whose Relax operators are already legalized and fused (one PrimFunc per
fused kernel), tunes the kernels that have not been tuned enough yet, and returns the MetaSchedule database that
:func:`apply_database` then applies. The database is a ``JSONDatabase`` in ``cache_dir/<key>/``
(``database_workload.json``, ``database_tuning_record.json``) where ``<key>`` hashes the target and the design
space; beside it ``hago_tuned.json`` records, per kernel (its structural hash: buffer and block names do not count),
how many trials were granted to it. A kernel that already got at least ``trials_per_task`` trials, or whose workload
already has that many records in the database, is not tuned again, so compiling the same shapes twice costs nothing
the second time, nor does a mixed configuration whose float convs the all-float model already has.

Budget: ``trials_per_task`` MetaSchedule trials for each distinct kernel (the global budget is that times the
number of kernels to tune), cost model xgboost, evolutionary search, gradient task scheduler.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time

from ..errors import CompileError

__all__ = ["TuningReport", "tune_module", "apply_database", "open_database", "kernel_tasks", "default_cache_dir"]


def prepare_tensor_intrinsics(target) -> None:
    """Import TVM's tensor intrinsics for ``target`` only.

    ``tvm.s_tir.tensor_intrin`` (imported by every MetaSchedule TuneContext and build) parses the CUDA, ARM, x86,
    ROCm, Hexagon and RISC-V intrinsic TVMScript on import: 40 s to over 2 minutes on this 2-core machine. For a
    CPU target only the CPU ones are needed, so the package is registered without running its ``__init__`` and the
    x86/ARM submodules are imported; a later GPU target runs the full ``__init__``.
    """
    import importlib
    import importlib.util
    import sys

    name = "tvm.s_tir.tensor_intrin"
    mod = sys.modules.get(name)
    gpu = "gpu" in [str(k) for k in target.keys]
    if mod is not None:
        if gpu and getattr(mod, "_hago_partial", False):
            mod.__spec__.loader.exec_module(mod)
            mod._hago_partial = False
        return
    if gpu:
        importlib.import_module(name)
        return
    spec = importlib.util.find_spec(name)
    mod = importlib.util.module_from_spec(spec)
    mod._hago_partial = True
    sys.modules[name] = mod
    import tvm.s_tir as s_tir_pkg

    setattr(s_tir_pkg, "tensor_intrin", mod)
    triple = str(target.attrs.get("mtriple", "") or "")
    subs = ("arm_cpu",) if triple.startswith(("aarch64", "arm")) else ("x86",)
    for sub in subs:
        try:
            importlib.import_module(f"{name}.{sub}")
        except Exception:  # noqa: BLE001 - an intrinsic set that fails to load only narrows the design space
            pass


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "hago", "tuning")


@dataclasses.dataclass
class TuningReport:
    """What a compile's tuning did."""

    database_dir: str | None = None
    tasks: int = 0  # distinct kernels in the module
    tuned_tasks: int = 0  # kernels tuned in this call
    cached_tasks: int = 0  # kernels skipped: already tuned enough
    new_trials: int = 0  # MetaSchedule candidates measured in this call
    failed_trials: int = 0
    seconds: float = 0.0
    applied: int = 0  # kernels that got a schedule from the database
    errors: list = dataclasses.field(default_factory=list)  # first few build/run errors
    tuned_names: list = dataclasses.field(default_factory=list)  # the kernels tuned in this call

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Task:
    name: str
    mod: object  # normalized IRModule with one PrimFunc "main"
    key: str
    weight: int
    old_key: str = ""  # the script key ledgers used before (:func:`_script_key`)


def _script_key(mod) -> str:
    """The tuning ledger's key of a task before the tenth session: its printed script, buffer and block names
    included (still read, so that ledgers written then stay valid)."""
    return hashlib.sha1(mod.script(show_meta=False).encode()).hexdigest()


def _structural_key(mod) -> str:
    """The tuning ledger's key of a task: its structural hash (the one MetaSchedule's database finds workloads by),
    blind to buffer and block names. A float conv of a mixed configuration is named after other Relax variables
    than the same conv in the all-float model; keyed by its script it counted as a new kernel and was tuned again
    for every configuration the search measured."""
    import tvm_ffi

    return f"s{tvm_ffi.structural_hash(mod):016x}"


def _records_in_database(db, mod, k: int) -> int:
    """How many tuning records (up to ``k``) the database holds for ``mod``'s workload (found by structural hash,
    names ignored): a kernel tuned under other names before the ledger was keyed structurally is not tuned again."""
    try:
        if not db.has_workload(mod):
            return 0
        return len(db.get_top_k(db.commit_workload(mod), k))
    except Exception:  # noqa: BLE001 - a database that cannot answer: fall back to the ledger
        return 0


def kernel_tasks(mod) -> list[_Task]:
    """Distinct unscheduled PrimFuncs of a fused module, normalized as MetaSchedule does."""
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    seen: dict[str, _Task] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
            continue
        nmod = _normalize_mod(func)
        key = _structural_key(nmod)
        if key in seen:
            seen[key].weight += 1
        else:
            seen[key] = _Task(gv.name_hint, nmod, key, 1, _script_key(nmod))
    return list(seen.values())


_OPEN_DBS: dict = {}  # path -> (file stamp, JSONDatabase): opening a large database costs tens of seconds


def _db_stamp(path: str) -> tuple:
    out = []
    for name in ("database_workload.json", "database_tuning_record.json"):
        try:
            st = os.stat(os.path.join(path, name))
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _remember_database(path: str, db) -> None:
    """Keep ``db`` as the open database of ``path`` as long as its files are not changed by someone else (the
    records ``db`` itself appends are in it already)."""
    _OPEN_DBS[os.path.abspath(path)] = (_db_stamp(path), db)


def open_database(path: str):
    """The MetaSchedule JSON database at ``path``; opened once per process while its files do not change (a
    search compiles hundreds of candidates against one database)."""
    cached = _OPEN_DBS.get(os.path.abspath(path))
    if cached is not None and cached[0] == _db_stamp(path):
        return cached[1]
    db = _open_database(path)
    _remember_database(path, db)
    return db


def _open_database(path: str):
    from tvm.s_tir import meta_schedule as ms

    from .x86_int8 import register_intrinsics

    register_intrinsics()  # records may name hago's intrinsics: they must be registered to parse the traces
    os.makedirs(path, exist_ok=True)

    def _open():
        return ms.database.JSONDatabase(
            path_workload=os.path.join(path, "database_workload.json"),
            path_tuning_record=os.path.join(path, "database_tuning_record.json"),
            allow_missing=True,
            module_equality="structural",
        )

    try:
        return _open()
    except Exception:  # noqa: BLE001 - a record that no longer replays: drop it (kept aside) and reopen
        dropped = repair_database(path)
        if not dropped:
            raise
        import warnings

        warnings.warn(f"tuning database {path}: {dropped} record(s) could not be replayed on their workload and "
                      f"were moved to database_tuning_record.json.bad", stacklevel=2)
        return _open()


def repair_database(path: str) -> int:
    """Move the tuning records of ``path`` that do not parse or replay on their workload (e.g. written by an
    older hago whose traces named blocks of a differently named but structurally equal kernel) to
    ``database_tuning_record.json.bad``; returns how many were moved."""
    from tvm.s_tir import meta_schedule as ms

    wpath = os.path.join(path, "database_workload.json")
    rpath = os.path.join(path, "database_tuning_record.json")
    try:
        with open(wpath) as f:
            wlines = [ln for ln in f.read().splitlines() if ln.strip()]
        with open(rpath) as f:
            rlines = [ln for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return 0
    workloads: dict[int, object] = {}
    good, bad = [], []
    for ln in rlines:
        try:
            rec = json.loads(ln)
            i = int(rec[0])
            if i not in workloads:
                workloads[i] = ms.database.Workload.from_json(json.loads(wlines[i]))
            ms.database.TuningRecord.from_json(rec[1], workloads[i])
            good.append(ln)
        except Exception:  # noqa: BLE001
            bad.append(ln)
    if bad:
        with open(rpath + ".bad", "a") as f:
            f.write("\n".join(bad) + "\n")
        with open(rpath, "w") as f:
            f.write("\n".join(good) + ("\n" if good else ""))
    return len(bad)


def _read_ledger(path: str) -> dict:
    try:
        with open(os.path.join(path, "hago_tuned.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_ledger(path: str, ledger: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".hago_tuned", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(ledger, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, "hago_tuned.json"))


def _progress_callback(total: int, enabled: bool, report: TuningReport, per_task: dict):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    bar = None
    if enabled:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="tuning", unit="trial", leave=True)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            bar = None

    @derived_object
    class _Count(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            n = len(measure_candidates)
            failed = 0
            for b, r in zip(builder_results, runner_results):
                if b.error_msg is not None or r.error_msg is not None or r.run_secs is None:
                    failed += 1
                    if len(report.errors) < 5:
                        report.errors.append(str(b.error_msg or r.error_msg)[-2000:])
            report.new_trials += n
            report.failed_trials += failed
            per_task[int(task_id)] = per_task.get(int(task_id), 0) + n
            if bar is not None:
                bar.update(n)

    return _Count(), bar


_BUILT: dict[str, object] = {}


def _in_process_builder_runner(evaluator_number: int = 3, min_repeat_ms: int = 40, threads: int | None = None):
    """A MetaSchedule builder and runner that compile and time candidates in this process.

    TVM's LocalBuilder/LocalRunner start a pool of worker processes that each import TVM (over 10 s apiece on a
    loaded 2-core machine) per batch, and were seen to hang; in-process building is faster and deterministic here.
    """
    import numpy as np
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    counter = [0]

    @derived_object
    class _Builder(PyBuilder):
        def build(self, build_inputs):
            out = []
            for bi in build_inputs:
                try:
                    rt = default_build(bi.mod, bi.target, None)
                    counter[0] += 1
                    key = f"hago-inproc-{id(self)}-{counter[0]}"
                    _BUILT[key] = rt
                    out.append(BuilderResult(key, None))
                except Exception as e:  # noqa: BLE001 - a failed candidate is data, not an error
                    out.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            return out

    @derived_object
    class _Runner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            rs = np.random.RandomState(0)
            for ri in runner_inputs:
                rt = _BUILT.pop(ri.artifact_path, None)
                if rt is None:
                    futures.append(LocalRunnerFuture(None, "artifact not found"))
                    continue
                try:
                    dev = tvm.device(ri.device_type, 0)
                    args = []
                    for info in ri.args_info:
                        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
                        if "float" in dtype:
                            a = rs.uniform(-1, 1, size=shape).astype(dtype)
                        elif dtype == "bool":
                            a = rs.randint(0, 2, size=shape).astype(dtype)
                        else:
                            a = rs.randint(0, 64, size=shape).astype(dtype)
                        args.append(tvm.runtime.tensor(a, dev))
                    ev = rt.time_evaluator(rt.entry_name, dev, number=evaluator_number, repeat=1,
                                           min_repeat_ms=min_repeat_ms)
                    res = ev(*args)
                    futures.append(LocalRunnerFuture([float(c) for c in res.results], None))
                except Exception as e:  # noqa: BLE001
                    futures.append(LocalRunnerFuture(None, f"{type(e).__name__}: {e}"))
            return futures

    return _Builder(), _Runner()


def _evolutionary(trials_per_task: int):
    from tvm.s_tir.meta_schedule.search_strategy import EvolutionarySearch

    # small budgets: a smaller population and fewer genetic iterations keep the search overhead in proportion
    pop = 512 if trials_per_task >= 256 else max(64, 4 * trials_per_task)
    return EvolutionarySearch(population_size=pop, init_measured_ratio=0.2, genetic_num_iters=4 if pop >= 256 else 2,
                              genetic_mutate_prob=0.85, genetic_max_fail_count=10, eps_greedy=0.05)


def tune_module(mod, target, *, trials_per_task: int, database_dir: str, progress: bool = True,
                space=None, threads: int | None = None, seed: int | None = 0,
                report: TuningReport | None = None, in_process: bool | None = None, task_filter=None):
    """Tune the kernels of ``mod`` (fused Relax module) that need it; return ``(database, report)``.

    ``space``: a MetaSchedule space generator (e.g. :func:`hago.backend.x86_int8.space_generator`) or None for
    TVM's default for the target. ``threads``: thread count the candidates run with (the runtime thread pool,
    TVM_NUM_THREADS for worker processes). ``task_filter``: ``PrimFunc -> bool``, which kernels may be tuned.
    """
    from tvm.s_tir import meta_schedule as ms

    report = report or TuningReport()
    if in_process is None:
        in_process = target.kind.name == "llvm"
    report.database_dir = database_dir
    t0 = time.perf_counter()
    db = open_database(database_dir)
    tasks = kernel_tasks(mod)
    if task_filter is not None:  # e.g. only the conv/matmul kernels: the others keep records or default lowering
        tasks = [t for t in tasks if task_filter(t.mod["main"])]
    report.tasks = len(tasks)
    if trials_per_task <= 0 or not tasks:
        report.cached_tasks = len(tasks)
        return db, report
    ledger = _read_ledger(database_dir)
    prepare_tensor_intrinsics(target)
    todo = []
    for t in tasks:
        granted = max(int(ledger.get(k, {}).get("trials", 0)) for k in (t.key, t.old_key))
        if granted < trials_per_task:  # a structurally equal workload may hold the records (ledger of old keys)
            granted = max(granted, _records_in_database(db, t.mod, trials_per_task))
        if granted >= trials_per_task:
            report.cached_tasks += 1
        else:
            todo.append(t)
    if not todo:
        report.seconds = time.perf_counter() - t0
        return db, report

    old_threads = os.environ.get("TVM_NUM_THREADS")
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
        if in_process:
            from .measure import set_num_threads

            set_num_threads(int(threads))
    per_task: dict[int, int] = {}
    total = trials_per_task * len(todo)
    callback, bar = _progress_callback(total, progress, report, per_task)
    try:
        with tempfile.TemporaryDirectory(prefix="hago-ms-") as work_dir:
            contexts = []
            # explicit counts everywhere: MetaSchedule's own core detection needs psutil
            n_threads = int(threads) if threads else max(1, os.cpu_count() or 1)
            seeds = ms.utils.fork_seed(seed, n=len(todo)) if seed is not None else [None] * len(todo)
            for t, s in zip(todo, seeds):
                # a structurally equal kernel may already be in the database under other block names (they come
                # from Relax variable names): tune the stored one, so that the new records replay on it
                stored = db.commit_workload(t.mod).mod
                contexts.append(
                    ms.TuneContext(
                        mod=stored,
                        target=target,
                        space_generator=space if space is not None else "post-order-apply",
                        search_strategy=_evolutionary(trials_per_task),
                        task_name=t.name,
                        rand_state=s if s is not None else -1,
                        num_threads=n_threads,
                        logger=ms.logging.get_logger(f"hago.tune.{t.name}"),
                    ).clone()
                )
            n_workers = max(1, min(os.cpu_count() or 1, 2))
            if in_process:
                builder, runner = _in_process_builder_runner(threads=threads)
            else:
                builder = ms.builder.LocalBuilder(max_workers=n_workers)
                runner = ms.runner.LocalRunner(
                    evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40), timeout_sec=30)
            ms.tune_tasks(
                tasks=contexts,
                task_weights=[float(t.weight) for t in todo],
                work_dir=work_dir,
                max_trials_global=total,
                max_trials_per_task=trials_per_task,
                num_trials_per_iter=min(64, trials_per_task),
                builder=builder,
                runner=runner,
                database=db,
                cost_model=ms.cost_model.XGBModel(
                    extractor=ms.feature_extractor.PerStoreFeature(),
                    adaptive_training=True,
                    num_tuning_cores=n_workers,
                ),
                measure_callbacks=(
                    [ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel(), callback]
                    if in_process else [*ms.measure_callback.MeasureCallback.create("default"), callback]),
                task_scheduler="gradient",
            )
    except CompileError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM raises many kinds
        raise CompileError(f"MetaSchedule tuning failed for target {target}: {type(e).__name__}: {e}") from e
    finally:
        if bar is not None:
            bar.close()
        if threads:
            if old_threads is None:
                os.environ.pop("TVM_NUM_THREADS", None)
            else:
                os.environ["TVM_NUM_THREADS"] = old_threads
    for i, t in enumerate(todo):
        entry = ledger.get(t.key, {})
        # the budget was granted even if the search space ran out of new candidates earlier
        entry["trials"] = max(int(entry.get("trials", 0)), trials_per_task)
        entry["measured"] = int(entry.get("measured", 0)) + per_task.get(i, 0)
        entry["name"] = t.name
        ledger[t.key] = entry
    report.tuned_tasks = len(todo)
    report.tuned_names = [t.name for t in todo]
    _write_ledger(database_dir, ledger)
    _remember_database(database_dir, db)  # its new records are in memory and on disk: no reopening
    report.seconds = time.perf_counter() - t0
    return db, report


def apply_database(mod, target, db, report: TuningReport | None = None):
    """Replace the PrimFuncs of ``mod`` that have tuning records with their best schedule."""
    import tvm
    from tvm import relax

    before = sum(1 for _, f in mod.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled", False)))
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    after = sum(1 for _, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled", False)))
    if report is not None:
        report.applied = before - after
    return mod
