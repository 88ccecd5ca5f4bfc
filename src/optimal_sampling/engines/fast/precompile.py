"""Compile a warmup's Triton kernels in parallel before it runs them (issue 15's one-off cost).

A cold warmup compiles each kernel variant the first time a capture launches it, one after the
other (~1 s each, most of a cold start). `compile_only()` runs code with every Triton launch
turned into a compile submitted to a thread pool (Triton's AsyncCompileMode; ptxas runs as a
subprocess) and no kernel run: the engine walks its warmup once that way, without graphs,
so the real warmup finds every kernel built. Nothing a kernel would write is written, so the dry
walk must not feed its outputs into indexing (the engine resets its last tokens after it). The
switch is process-wide while it lasts: nothing else may launch Triton kernels meanwhile (warmup
runs between calls, as the engine's contract says).

Measured (H100, cold Triton cache, the benchmark pair): warmup 22.0 s against 24.7 s compiling in
turn; each compile takes about twice as long with 16 at once (code generation holds the GIL). So
`record_compiles()` + `ProcessCompiler` do the same walk recording each variant a launch would
build, which fresh interpreters (`compile_worker`, started before the walk) compile into Triton's
disk cache as it is recorded; the warmup proper then loads them: no GIL shared. Opt-in
(`FastEngine.compile_processes`) until a device run has measured it.
"""

from __future__ import annotations

import importlib
import os
import pickle
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def parallel_compile_available() -> bool:
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return hasattr(triton, "AsyncCompileMode") and hasattr(JITFunction, "run")


def compile_workers() -> int:
    """Threads for compiles: the cores this process may use, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


@contextmanager
def launches_only_compile():
    """Inside: a Triton launch does what its first launch would before running (Triton's warmup:
    build the variant, or whatever builds it now) and runs nothing."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def compile_launch(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = compile_launch
    try:
        yield
    finally:
        JITFunction.run = original


@contextmanager
def compile_only(workers: int | None = None):
    """Inside: Triton launches compile (in `workers` threads) and do not run; on exit every
    compile has finished and its kernel is in its function's cache."""
    import triton

    with launches_only_compile(), ThreadPoolExecutor(workers or compile_workers()) as pool:
        with triton.AsyncCompileMode(pool):
            yield


@dataclass(frozen=True)
class CompileJob:
    """One kernel variant as Triton's JITFunction._do_compile would build it (picklable: the kernel
    by module and name, a compile worker imports it)."""

    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    target: object
    options: dict


@contextmanager
def record_compiles(on_job=None):
    """Inside: Triton launches build nothing and run nothing; each kernel variant they would build
    is added to the yielded dict and passed to on_job (e.g. `ProcessCompiler.submit`) once."""
    from triton.runtime.jit import JITFunction

    original = JITFunction._do_compile
    jobs: dict = {}

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        at = (self.fn.__module__, self.fn.__name__, key)
        if at not in jobs:  # (the walk launches each variant many times)
            target = self.device_caches[device][2]
            jobs[at] = CompileJob(*at[:2], signature, constexprs, attrs, target, dict(vars(options)))
            if on_job is not None:
                on_job(jobs[at])
        return None  # (JITFunction.run returns at once, caching nothing)

    JITFunction._do_compile = record
    try:
        with launches_only_compile():
            yield jobs
    finally:
        JITFunction._do_compile = original


class ProcessCompiler:
    """`workers` fresh interpreters (running `compile_worker`) compiling kernel variants into
    Triton's disk cache as they are submitted. They start on entry, so their imports overlap the
    walk that records the jobs; each takes the next job no worker has claimed (compiles differ in
    length: fixed shares would leave workers idle). On exit they finish the jobs and `built`
    counts what they compiled; a worker still busy `timeout` seconds later (a whole cold warmup
    compiles in about 15 s on an H100 host), or any worker after an error inside, is killed, and
    what it did not build compiles where it is first launched, as without this. Jobs travel as
    files of one folder: N.job (written whole, then renamed into place), then `done`."""

    def __init__(self, workers: int, timeout: float = 120.0):
        self.workers, self.timeout = max(1, workers), timeout
        self.submitted = self.built = 0
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> ProcessCompiler:
        self.folder = Path(tempfile.mkdtemp(prefix="optimal-sampling-compile-"))
        home = str(Path(__file__).resolve().parents[3])  # appended: importable as here, shadowing nothing
        code = (
            f"import sys; sys.path.append({home!r}); from {__name__} import compile_worker; "
            "compile_worker(sys.argv[1], int(sys.argv[2]))"
        )
        try:
            for _ in range(self.workers):
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", code, str(self.folder), str(os.getpid())],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                )
        except OSError:  # (nothing built here: each kernel compiles at its first launch)
            pass
        return self

    def submit(self, job: CompileJob) -> bool:
        """Queue a job for the workers; False where none runs, or the job does not pickle or
        cannot be written (it then compiles at its first launch)."""
        if not self.procs:
            return False
        partial = self.folder / f"{self.submitted}.part"
        try:
            partial.write_bytes(pickle.dumps(job))
            os.replace(partial, self.folder / f"{self.submitted}.job")
        except (OSError, pickle.PicklingError, TypeError, AttributeError):
            return False
        self.submitted += 1
        return True

    def __exit__(self, kind, value, traceback) -> bool:
        kill = kind is not None  # (an error inside: the walk did not finish)
        try:
            (self.folder / "done").touch()
        except OSError:  # (the folder gone: nothing can tell the workers to stop)
            kill = True
        deadline = time.monotonic() + self.timeout
        for proc in self.procs:
            if not kill:
                try:
                    out, _ = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
                    self.built += built_count(out, proc.returncode)
                    continue
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
            proc.communicate()
        shutil.rmtree(self.folder, ignore_errors=True)
        return False


def built_count(out: str, returncode: int) -> int:
    """What a compile worker reports: its last line of output, if it exited cleanly (a library
    may print before it); 0 otherwise."""
    last = out.strip().rsplit("\n", 1)[-1] if out.strip() else ""
    return int(last) if returncode == 0 and last.isdigit() else 0


def claim(folder: Path, index: int) -> bool:
    """Whether this worker is the first to take job `index` (creating its claim file is atomic)."""
    try:
        os.close(os.open(folder / f"{index}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def compile_worker(folder: str, parent: int, poll: float = 0.005) -> int:
    """Compile each job of `folder` (ProcessCompiler's) that no other worker has claimed, until
    `done` is there and every job is taken, or its parent (that pid) is gone; prints how many it
    built (a job whose kernel does not import or compile here is left to its first launch)."""
    import triton
    from triton.compiler import ASTSource

    for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        if module.name.startswith("triton_"):  # the kernels' modules, imported while the walk runs
            importlib.import_module(f"{__package__}.{module.name}")
    path, index, built = Path(folder), 0, 0
    while os.getppid() == parent:  # (a parent that died writes no `done`)
        finished = (path / "done").exists()  # (every job file is in place before `done`)
        job_file = path / f"{index}.job"
        if not job_file.exists():
            if finished:
                break
            time.sleep(poll)
            continue
        index += 1
        if not claim(path, index - 1):
            continue
        try:
            job = pickle.loads(job_file.read_bytes())
            kernel = getattr(importlib.import_module(job.module), job.name)
            source = ASTSource(kernel, job.signature, job.constexprs, job.attrs)
            triton.compile(source, target=job.target, options=job.options)
            built += 1
        except Exception:  # (its first launch compiles it instead, and reports what fails)
            continue
    print(built)
    return built
