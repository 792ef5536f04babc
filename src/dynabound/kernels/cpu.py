"""Fused AdaBound step for CPU tensors: a small C++ kernel compiled on first use.

Why this design (``python benchmarks/step_time.py``: shared 2-core AMD EPYC, 2 threads,
medians of 7 interleaved repeats; benchmarks/README.md has the full tables):

* One pass per element reading p, g, m, v (and vmax) and writing p, m, v: 28 bytes per fp32
  parameter, the traffic of torch's fused Adam, and the same cost. CIFAR ResNet-34 (21.3M
  parameters, 110 tensors): 19.1 ms per step against 18.4 ms for torch's fused Adam
  (1.04x); GPT-2 124M: 105 ms against 117 ms (0.90x). The eager foreach path takes
  4.5x-8x longer (about ten passes over memory instead of one).
* The kernel (``cpu_kernel.cpp``, which includes ``cpu_kernel_avx512.h``) includes no torch
  headers, so the first build takes about a minute (62 s of compiler CPU time on that EPYC,
  26 s before the loops of ``final_lr="auto"`` below), and later processes load the
  cached shared object in 0.2 s. Python hands it data pointers, sizes
  and the per-tensor scalars from :func:`dynabound.bounds.step_coefficients`; the scalar
  math exists only there.
* Built with :func:`torch.utils.cpp_extension.load_inline` into the standard extension
  cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), under a name
  that hashes the source, flags, machine type and torch version, so different versions
  never share a build folder; torch's file lock serialises concurrent first builds.
* No ``-march=native``: plain loops vectorised at ``-O3`` plus AVX2/F16C and AVX-512 copies,
  the widest the CPU runs picked at run time (:func:`vector_isa`), so one cached build runs
  on every x86-64 machine sharing the cache. Software prefetching 2 KB ahead made the
  one-thread step 5-10% faster on 64 MB tensors. The low-precision-state loops are
  compute-bound, and 512-bit vectors make them faster; whole blocks of float32 parameters
  with 8-bit moments take a loop written with AVX-512 intrinsics
  (``cpu_kernel_avx512.h``), which keeps decoded moments and codes in registers: 0.75x
  torch's fused Adam with two threads on GPT-2 124M shapes, against 1.09x for the AVX2
  copy of the portable loops (benchmarks/README.md).
* Per step, Python compares the tensors' addresses (and the gradients' strides) with a
  cached plan of validated kernel calls, rebuilt when a tensor moves: small models, where
  the host side is most of a step, stay near torch's fused Adam (a 784-256-10 perceptron:
  156 against 154 us per step, 1 thread).
* Threads: OpenMP (the libgomp torch already loaded), ``torch.get_num_threads()`` threads,
  dynamic scheduling over 32K-element units of all tensors laid end to end, in one parallel
  region per step (torch's per-op regions each wait at a barrier).
* ``final_lr="auto"``: while a group estimates its rate, its steps ask for the projection
  sums (:class:`~dynabound.spec.StepTensors`). Separate instances of every loop add them
  during the same pass, per work unit; the units' sums are added in unit order, so the
  result is the same for any thread count, and ordinary steps run the loops they ran
  before. An estimating step costs 1.0x-1.1x an ordinary one with AVX-512; with AVX2 only,
  1.0x-1.2x, and up to 1.3x with bfloat16 state, where the arithmetic bounds the step
  (``python benchmarks/estimating_step.py``, benchmarks/README.md).

Nothing is built at import. If the compiler or ninja is missing, :func:`is_available`
returns False and a fused step raises ``RuntimeError`` with the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import platform
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .. import state_formats as formats
from ..bounds import decoupled_decay_factor, step_coefficients_from, within_range
from ..spec import FLOATS, StepSpec, StepTensors
from . import compat
from .layout import dense_in_any_order, dense_in_standard_order

__all__ = [
    "encoded_step",
    "float_step",
    "is_available",
    "load",
    "supported_dtypes",
    "unavailable_reason",
    "vector_isa",
]

_SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# Included by _SOURCE: part of what a build is made from.
_HEADERS = (Path(__file__).with_name("cpu_kernel_avx512.h"),)
# Elements per unit of work handed to a thread (about 1 MB of fp32 traffic).
_CHUNK = 1 << 15
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

# The arrays the kernel reads, by position. cpu_kernel.cpp names its own layouts
# (dynabound_layout), which load() compares with these.
# `hyper`, shared by every tensor of a call: the step's floats (lr as a float; eps 0 where
# the schedule adds none), then the values the kernel derives from the other fields.
HYPER = (*FLOATS, "decay", "sign", "grad_scale", "box_lo", "box_hi")
# A row of `coef` per tensor: its step's scalars (dynabound.bounds.StepCoefficients,
# the rate scale times lr) and, for the encoded kernel, its random seed and step.
COEF = ("numerator", "lower", "upper", "rate_scale")
ENCODED_COEF = (*COEF, "seed", "step")
_LAYOUTS = {"hyper": HYPER, "coef": COEF, "encoded coef": ENCODED_COEF}
_EPS = HYPER.index("eps")

# The C signatures of cpu_kernel.cpp's entry points: i int, q int64, p pointer, s string.
_CTYPES = {"i": ctypes.c_int, "q": ctypes.c_int64, "p": ctypes.c_void_p, "s": ctypes.c_char_p}
_SIGNATURES = {
    name: (_CTYPES[result] if result else None, [_CTYPES[code] for code in args])
    for name, result, args in (
        ("dynabound_adabound_cpu", "i", "iqppppiiiiqp"),
        ("dynabound_adabound_cpu_encoded", "i", "iiqppppiiiiiqp"),
        ("dynabound_increment_steps", None, "qpp"),
        ("dynabound_supported_dtypes", "i", ""),
        ("dynabound_layout", "s", "i"),
        ("dynabound_vector_isa", "i", ""),
    )
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
build_seconds: float | None = None


def _flags() -> tuple[list[str], list[str]]:
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    # Strict IEEE order (no FMA contraction) keeps both ISA copies bit-identical;
    # no errno lets sqrt vectorise.
    cflags = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp: single-threaded there
        return cflags, []
    return cflags + ["-fopenmp"], ["-fopenmp"]


def load() -> ctypes.CDLL:
    """Build (first use) or load (cached) the kernel; raise RuntimeError if impossible."""
    global _lib, _error, build_seconds
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            start = time.perf_counter()
            try:
                _lib = _build()
            except Exception as exc:  # compiler, ninja or loader: report it, never raise here
                _error = f"{type(exc).__name__}: {exc}".strip()
            build_seconds = time.perf_counter() - start
    if _lib is None:
        raise RuntimeError(
            "dynabound's fused CPU kernel is unavailable (it is compiled on first use and "
            "needs a C++ compiler and ninja): " + str(_error) + ". Use fused=False."
        )
    return _lib


def _build() -> ctypes.CDLL:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    source = _SOURCE.read_text()
    cflags, ldflags = _flags()
    name = extension_name()
    if not is_built(name):
        # A first step that silently takes this long looks like a hang inside a trainer.
        print(
            "dynabound: compiling the fused CPU kernel (once per torch version; about a minute, "
            "cached afterwards; `python -m dynabound.kernels build` does it ahead of time)",
            file=sys.stderr,
            flush=True,
        )
    headers = {header.name: header.read_text() for header in _HEADERS}
    path = compat.compile_library(name, source, headers, cflags=cflags, ldflags=ldflags)
    lib = ctypes.CDLL(path)
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    _check_layouts(lib)
    return lib


def _check_layouts(lib: ctypes.CDLL) -> None:
    """Refuse a library whose arrays are laid out otherwise than this module writes them
    (a field added on one side only), instead of letting it read the wrong values."""
    for index, (name, layout) in enumerate(_LAYOUTS.items()):
        exported = tuple(lib.dynabound_layout(index).decode().rstrip(",").split(","))
        if exported != layout:
            raise RuntimeError(
                f"cpu_kernel.cpp reads its {name} array as {exported}, but cpu.py writes "
                f"{layout}: give both the same fields in the same order"
            )


def extension_name() -> str:
    """The cache name of this build: a hash of the source, flags, machine and torch version,
    so different versions never share a build folder."""
    cflags, ldflags = _flags()
    sources = [path.read_text() for path in (_SOURCE, *_HEADERS)]
    parts = [*sources, *cflags, *ldflags, platform.machine(), torch.__version__]
    return "dynabound_cpu_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def is_built(name: str) -> bool:
    """Whether the extension cache already holds a build of ``name``."""
    return compat.library_path(name).exists()


def is_available() -> bool:
    """True if the kernel builds (or is cached) and loads; builds it on the first call."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def supported_dtypes() -> set[torch.dtype]:
    """Parameter dtypes the built kernel handles (float16 needs compiler support)."""
    mask = load().dynabound_supported_dtypes()
    return {dtype for dtype, code in _DTYPE_CODES.items() if (mask >> code) & 1}


def vector_isa() -> str:
    """The copy of the loops this CPU runs: ``"avx512"``, ``"avx2"`` or ``"generic"``.

    All copies compute the same bits. ``DYNABOUND_CPU_ISA=avx2`` or ``generic``, set before
    the first step, caps the choice (to compare copies)."""
    return ("generic", "avx2", "avx512")[load().dynabound_vector_isa()]


def unavailable_reason() -> str | None:
    """Why the kernel could not be built, or None (it is available or was never tried)."""
    return _error


class _Batch:
    """Raw pointers and sizes of the tensors of one dtype, in kernel order."""

    __slots__ = ("pointers", "numels", "members", "copies")

    def __init__(self) -> None:
        self.pointers: list[int] = []
        self.numels: list[int] = []
        self.members: list[int] = []
        self.copies: list[tuple[Tensor, Tensor]] = []


def float_step(tensors: StepTensors, spec: StepSpec) -> None:
    """One step of CPU tensors whose moments are stored in the parameter's dtype."""
    _step(tensors, spec, encoded=False)


def encoded_step(tensors: StepTensors, spec: StepSpec) -> None:
    """One step of CPU tensors with low-precision moments or stochastically rounded
    bfloat16 parameters."""
    _step(tensors, spec, encoded=True)


def _step(tensors: StepTensors, spec: StepSpec, encoded: bool) -> None:
    """One AdaBound step over CPU tensors, in place; the step counters are incremented.

    With ``found_inf`` nonzero nothing changes (not even the steps); with ``grad_scale`` the
    gradients are divided by it and left unscaled, as torch's fused Adam does. On CPU these
    reads cost no device synchronisation, so ``capturable`` changes nothing here.

    With ``tensors.projection`` the kernel adds the step's projection sums to it
    (:class:`~dynabound.spec.StepTensors`), accumulated during the update.
    """
    lib = load()
    params, grads, exp_avgs, exp_avg_sqs, all_maxima, state_steps, rounding_seeds = tensors[:7]
    if not params:
        return
    projection = _projection_pointer(tensors.projection)
    grad_scale, found_inf = spec.grad_scale, spec.found_inf
    if found_inf is not None and found_inf.item() != 0:
        return
    lr_value = spec.lr.item() if isinstance(spec.lr, Tensor) else float(spec.lr)
    max_exp_avg_sqs = all_maxima if spec.amsbound else None
    if encoded:
        moments = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        plan = _encoded_plan(lib, params, grads, moments, state_steps, spec.state_dtype)
    else:
        plan = _plan(lib, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    values = _increment_steps(lib, state_steps, plan.step_pointers)
    rows, hyper_array = _scalars(
        values, lr_value, spec, _math_dtypes(plan, len(params)) if projection else None
    )
    flags = (
        _weight_decay_mode(spec.weight_decay, spec.decoupled_weight_decay),
        int(spec.amsbound),
        int(grad_scale is not None),
    )
    for launch in plan.launches:
        n = len(launch.members)
        if encoded:
            coef: list[float] = []
            for i in launch.members:
                # The kernel derives the random keys (state_formats.step_key) from these two.
                seed = rounding_seeds[i] if rounding_seeds is not None else i
                coef += rows[i]
                coef += (seed % 2**32, values[i])
            round_param = spec.stochastic_rounding and launch.code == _DTYPE_CODES[torch.bfloat16]
            status = lib.dynabound_adabound_cpu_encoded(
                launch.code, _state_format(spec.state_dtype), n, launch.pointers,
                launch.numels, (ctypes.c_double * (len(ENCODED_COEF) * n))(*coef), hyper_array,
                *flags, int(round_param), torch.get_num_threads(), _CHUNK, projection,
            )  # fmt: skip
        else:
            coef = [x for i in launch.members for x in rows[i]]
            status = lib.dynabound_adabound_cpu(
                launch.code, n, launch.pointers, launch.numels,
                (ctypes.c_double * (len(COEF) * n))(*coef), hyper_array, *flags,
                torch.get_num_threads(), _CHUNK, projection,
            )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"dynabound's fused CPU kernel failed with status {status}")
        if grad_scale is not None:
            for grad, copy in launch.copies:
                grad.copy_(copy)
    # The kernel writes through raw pointers: tell autograd the tensors changed.
    compat.bump_versions(params)
    if grad_scale is not None:
        compat.bump_versions(grads)
    if tensors.projection is not None:
        compat.bump_versions([tensors.projection])


def _projection_pointer(projection: Tensor | None) -> int | None:
    """The address the kernel adds the projection sums to, or None for an ordinary step."""
    if projection is None:
        return None
    if not (
        projection.dtype is torch.float64
        and projection.is_cpu
        and projection.shape == (2,)
        and projection.is_contiguous()
    ):
        raise RuntimeError(
            "the projection output of a fused CPU step must be a contiguous float64 CPU "
            f"tensor of shape (2,), got {projection.dtype} of shape {tuple(projection.shape)} "
            f"on {projection.device}"
        )
    return projection.data_ptr()


def _math_dtypes(plan: _Plan, n: int) -> list[torch.dtype]:
    """The dtype each tensor's update is computed in: float64 for float64 parameters."""
    dtypes = [torch.float32] * n
    for launch in plan.launches:
        if launch.code == _DTYPE_CODES[torch.float64]:
            for i in launch.members:
                dtypes[i] = torch.float64
    return dtypes


def _weight_decay_mode(weight_decay: float, decoupled: bool) -> int:
    return 0 if weight_decay == 0 else (2 if decoupled else 1)


def _scalars(
    values: list[float],
    lr_value: float,
    spec: StepSpec,
    projected: list[torch.dtype] | None = None,
) -> tuple[list[tuple[float, float, float, float]], ctypes.Array]:
    """Per-tensor rows of :data:`COEF` and the shared :data:`HYPER` array.

    ``projected``: the dtype each tensor is computed in, when the step adds projection sums.
    Its rows are then :func:`~dynabound.bounds.within_range`'s with ``lr``, as the eager
    paths compute them: the sums are per unit of ``lr * scale``, which the estimate of
    ``final_lr="auto"`` reads from the same call. Where that rescales, it multiplies the
    numerator and bounds by a power of two and divides the scale by it, so the rates, and
    so the update, are the same.
    """
    # Steps are usually equal across tensors: evaluate the scalars once per distinct step.
    cache: dict[tuple[float, torch.dtype], tuple[float, float, float, float]] = {}
    rows = []
    eps_used = True
    for i, value in enumerate(values):
        dtype = projected[i] if projected is not None else torch.float32  # float math
        row = cache.get((value, dtype))
        if row is None:
            rescale_for = lr_value if projected is not None else None
            c = within_range(step_coefficients_from(value, spec), dtype, rescale_for)
            eps_used = c.eps_used
            row = (float(c.numerator), float(c.lower), float(c.upper), lr_value * float(c.scale))
            cache[value, dtype] = row
        rows.append(row)
    box = spec.box
    hyper = [lr_value, *(getattr(spec, name) for name in FLOATS[1:])]
    hyper[_EPS] = spec.eps if eps_used else 0.0
    hyper += (
        decoupled_decay_factor(lr_value, spec.weight_decay, spec.unscaled_decay),
        -1.0 if spec.maximize else 1.0,
        spec.grad_scale.item() if spec.grad_scale is not None else 1.0,
        box[0] if box is not None else -math.inf,
        box[1] if box is not None else math.inf,
    )
    return rows, (ctypes.c_double * len(HYPER))(*map(float, hyper))


def _state_format(state_dtype) -> int:
    """The moments' format code in cpu_kernel.cpp (2: the parameter's dtype)."""
    if state_dtype == formats.EIGHT_BIT:
        return 1
    return 0 if state_dtype is torch.bfloat16 else 2


def _encoded_plan(lib, params, grads, moments, state_steps, state_dtype) -> _Plan:
    """:func:`_plan` for low-precision moments, keyed by the addresses of their codes and
    block scales as well."""
    eight_bit = state_dtype == formats.EIGHT_BIT
    try:
        if eight_bit:
            stored = [a for ms in moments if ms for m in ms for a in (m.codes, m.scales)]
        else:
            stored = [m for ms in moments if ms for m in ms]
        addresses = [t.data_ptr() for t in stored]
    except AttributeError:  # moments of another format: validation says so
        addresses = None
    key = (
        "encoded",
        _state_format(state_dtype),
        moments[2] is not None,
        *[p.data_ptr() for p in params],
        *[g.data_ptr() for g in grads],
        *(addresses or ()),
        *[s.data_ptr() for s in state_steps],
        *[p.numel() for p in params],
    )
    return _cached_plan(
        None if addresses is None else key,
        [g.stride() for g in grads],
        lambda: (
            _launches(lib, _collect_encoded(params, grads, moments, state_dtype), 8),
            _step_pointers(state_steps),
        ),
    )


_ENCODED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _collect_encoded(params, grads, moments, state_dtype) -> dict[torch.dtype, _Batch]:
    """Group by dtype, validate, and gather the 8 pointers of each tensor: p, g, the three
    moments' codes and their block scales (0 where absent)."""
    eight_bit = state_dtype == formats.EIGHT_BIT
    state_format = _state_format(state_dtype)
    batches: dict[torch.dtype, _Batch] = {}
    for i, p in enumerate(params):
        g = grads[i]
        if p.is_complex():
            p, g = torch.view_as_real(p), torch.view_as_real(g)
        if p.dtype not in _ENCODED_DTYPES or not p.is_cpu:
            raise RuntimeError(
                "dynabound's fused CPU kernel keeps low-precision moments for float32, "
                f"bfloat16 and float16 CPU parameters (complex64 too), got {p.dtype} on "
                f"{p.device}"
            )
        if not dense_in_any_order(p):
            raise RuntimeError(
                "low-precision optimizer state needs parameters stored without gaps "
                "(contiguous, channels-last or another dense layout)"
            )
        batch = batches.setdefault(p.dtype, _Batch())
        if g.stride() != p.stride() or g.dtype != p.dtype or not g.is_cpu:
            copy = torch.empty_like(p).copy_(g)
            batch.copies.append((g, copy))
            g = copy
        pointers = [p.data_ptr(), g.data_ptr()]
        scales = []
        for k, stored in enumerate(moments):
            if stored is None:
                pointers.append(0)
                scales.append(0)
                continue
            moment = stored[i]
            codes = moment.codes if eight_bit else moment
            if eight_bit:
                expected: tuple[torch.dtype, ...] = (torch.int8 if k == 0 else torch.uint8,)
            else:
                expected = (torch.bfloat16 if state_format == 0 else p.dtype,)
            if codes.is_complex():
                codes = torch.view_as_real(codes)
            if (
                isinstance(moment, formats.Quantized) != eight_bit
                or codes.dtype not in expected
                or codes.shape != p.shape
                or codes.stride() != p.stride()
                or not codes.is_cpu
            ):
                raise RuntimeError(
                    f"fused AdaBound expected {state_dtype} moments in the parameter's shape "
                    "and layout; build the optimizer with this state_dtype or load its "
                    "state with load_state_dict"
                )
            pointers.append(codes.data_ptr())
            if eight_bit:
                if moment.scales.numel() != formats.scale_count(p.numel()):
                    raise RuntimeError("8-bit moments with the wrong number of block scales")
                scales.append(moment.scales.data_ptr())
            else:
                scales.append(0)
        batch.pointers += pointers + scales
        batch.numels.append(p.numel())
        batch.members.append(i)
    return batches


def _step_pointers(steps: list[Tensor]) -> ctypes.Array | None:
    if all(s.dtype is torch.float32 and s.is_cpu and s.numel() == 1 for s in steps):
        return (ctypes.c_void_p * len(steps))(*(s.data_ptr() for s in steps))
    return None


class _Launch(NamedTuple):
    """One kernel call: the tensors of one dtype."""

    code: int  # the dtype's code in cpu_kernel.cpp
    pointers: ctypes.Array  # p, g, m, v, vmax of each tensor (and 3 block scales if encoded)
    numels: ctypes.Array
    members: list[int]  # their indices in the step's lists
    copies: list[tuple[Tensor, Tensor]]  # (gradient, copy in its parameter's layout)


class _Plan(NamedTuple):
    launches: list[_Launch]
    step_pointers: ctypes.Array | None  # None: counters the kernel cannot increment
    grad_strides: list[tuple[int, ...]]


_plans: OrderedDict[tuple, _Plan] = OrderedDict()
_CACHE_SIZE = 8


def _plan(lib, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps) -> _Plan:
    """The validated kernel calls for these tensors, cached by their addresses and sizes: a
    step then reads addresses and gradient strides instead of validating every tensor."""
    key = (
        *[p.data_ptr() for p in params],
        *[g.data_ptr() for g in grads],
        *[m.data_ptr() for m in exp_avgs],
        *[v.data_ptr() for v in exp_avg_sqs],
        *[v.data_ptr() for v in max_exp_avg_sqs or ()],
        *[s.data_ptr() for s in state_steps],
        *[p.numel() for p in params],
    )

    def build():
        batches, step_pointers = _collect(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        if step_pointers is not None:
            step_pointers = (ctypes.c_void_p * len(step_pointers))(*step_pointers)
        return _launches(lib, batches, 5), step_pointers

    return _cached_plan(key, [g.stride() for g in grads], build)


def _cached_plan(key: tuple | None, grad_strides: list, build) -> _Plan:
    """The plan cached under ``key`` for these gradient strides, else a new one from
    ``build() -> (launches, step pointers)``. Plans that copy a gradient into its
    parameter's layout are never cached, nor any under the key None."""
    plan = _plans.get(key) if key is not None else None
    if key is not None and plan is not None and plan.grad_strides == grad_strides:
        _plans.move_to_end(key)
        return plan
    launches, step_pointers = build()
    plan = _Plan(launches, step_pointers, grad_strides)
    if key is not None and not any(launch.copies for launch in launches):
        _plans[key] = plan
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _launches(lib, batches: dict[torch.dtype, _Batch], width: int) -> list[_Launch]:
    """One kernel call per dtype; ``width``: pointers per tensor."""
    supported = lib.dynabound_supported_dtypes()
    launches = []
    for dtype, batch in batches.items():
        code = _DTYPE_CODES.get(dtype)
        if code is None or not (supported >> code) & 1:
            raise RuntimeError(f"dynabound's fused CPU kernel does not support {dtype} parameters")
        n = len(batch.numels)
        pointers = (ctypes.c_void_p * (width * n))(*batch.pointers)
        numels = (ctypes.c_int64 * n)(*batch.numels)
        launches.append(_Launch(code, pointers, numels, batch.members, batch.copies))
    return launches


def _collect(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
    """Group by dtype, validate, and gather data pointers (one pass, cheap checks first)."""
    batches: dict[torch.dtype, _Batch] = {}
    step_pointers: list[int] | None = []
    for i, p in enumerate(params):
        g, m, v = grads[i], exp_avgs[i], exp_avg_sqs[i]
        vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs is not None else v
        if p.is_complex():
            # Real and imaginary parts are independent coordinates, as in the reference.
            p, g, m, v, vmax = (torch.view_as_real(t) for t in (p, g, m, v, vmax))
        stride = p.stride()
        batch = batches.get(p.dtype)
        if batch is None:
            batch = batches[p.dtype] = _Batch()
        if not (
            g.stride() == m.stride() == v.stride() == vmax.stride() == stride
            and g.dtype == m.dtype == v.dtype == vmax.dtype == p.dtype
            and g.is_cpu
            and m.is_cpu
            and v.is_cpu
            and vmax.is_cpu
            and (p.is_contiguous() or dense_in_standard_order(p))
        ):
            g = _checked_grad(p, g, (m, v, vmax), batch.copies)
        addresses = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), vmax.data_ptr())
        numel = p.numel()
        if numel and not all(addresses):  # a wrapper subclass that owns no storage
            raise RuntimeError(
                f"fused AdaBound cannot update a {type(p).__name__} without storage of its "
                "own (data_ptr() is 0); use fused=False"
            )
        batch.pointers += addresses
        batch.numels.append(numel)
        batch.members.append(i)
        step = state_steps[i]
        if step_pointers is not None:
            if step.dtype is torch.float32 and step.is_cpu and step.numel() == 1:
                step_pointers.append(step.data_ptr())
            else:
                step_pointers = None
    return batches, step_pointers


def _increment_steps(lib, steps: list[Tensor], pointers: ctypes.Array | None) -> list[float]:
    """Add one to every step counter; return the new values."""
    if pointers is None:  # not the optimizer's float32 counters: the slower generic way
        torch._foreach_add_(steps, 1.0)
        return [s.item() for s in steps]
    n = len(pointers)
    values = (ctypes.c_double * n)()
    lib.dynabound_increment_steps(n, pointers, values)
    compat.bump_versions(steps)
    return values[:]


def _checked_grad(p: Tensor, g: Tensor, state: tuple[Tensor, ...], copies: list) -> Tensor:
    """Validate one parameter's tensors; return the gradient to read (maybe a copy)."""
    if not all(t.is_cpu for t in (p, g, *state)):
        raise RuntimeError("the fused CPU kernel got a tensor that is not on the CPU")
    if any(t.dtype != p.dtype for t in (g, *state)):
        raise RuntimeError(
            "fused AdaBound needs gradients and state of the parameter's dtype, got "
            f"{p.dtype} parameter with {g.dtype} gradient"
        )
    if not dense_in_standard_order(p) or any(t.stride() != p.stride() for t in state):
        raise RuntimeError(
            "fused AdaBound needs each parameter and its state in the same dense memory "
            "layout; use fused=False for this parameter group"
        )
    # A gradient in another layout (assigned by hand): work on a copy in the parameter's.
    copy = torch.empty_like(p).copy_(g)
    copies.append((g, copy))
    return copy
