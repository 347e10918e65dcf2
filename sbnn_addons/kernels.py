"""Fused CPU kernel of the spike function, compiled on first use (optional).

The PyTorch implementation of a sampled spike (:class:`~sbnn_addons.estimators.BernoulliSpike`)
costs about fifteen elementwise passes over the neurons per step: a Gaussian draw from
the global Mersenne twister, the comparison, and the IW-ST backward. On a CPU these
passes, not the arithmetic, are the cost. This module compiles ``_kernels/spike.c`` once
per machine with the system C compiler (``$CC``, else ``cc``) into
``$SBNN_ADDONS_CACHE`` (default ``~/.cache/sbnn_addons``) and loads it with ``ctypes``.
It does the forward in one pass and the backward in one pass:

.. code-block:: text

    forward   h   = 1[U < Phi(u / sigma)],  sigma = sqrt(var),  U ~ Uniform(0, 1)
    backward  g_u = g J(h),   g_var = -z g J(h) / (2 sigma)      (J: Method page, section 4)

(plus, on request, the auxiliary ``sum z^2`` of the Method page, section 5 and its gradient, in the
same passes). The spikes returned are the tensor kept for the backward, marked ``kept``
so that a layer they feed shares it (:func:`~sbnn_addons.functional.mark_binary`), and
a broadcast variance is read in place.

``U`` comes from a counter-based Philox4x32-10 stream keyed by a 64-bit seed drawn from
the torch generator (the global one, or the spike function's own after
:func:`~sbnn_addons.seed_spikes`), so ``torch.manual_seed`` replays a pass exactly, and a
draw does not depend on the number of threads. ``P(h = 1) = Phi(z)`` is the same law as
the PyTorch path (``h = 1[u + sigma eps > 0]``); the individual draws differ between
the two paths.

The same library holds the window sums of the variance (:func:`window_sum`: the
receptive-field sum of a convolution's LRT variance and the average-pooling rule, with
its transpose for the backward), :func:`fused_lif_step` runs one step of the core
:class:`~sbnn_addons.LIF` (charge, spike and reset) in one pass, and
:func:`lif_sequence` runs a whole LIF sequence (the core ``LIF`` or a linked
SpikingJelly node) as one autograd node around the spike kernel, keeping its spikes as
bytes.

The kernel serves float32 CPU tensors outside ``torch.func`` transforms and
``torch.compile``; everything else (CUDA, float16 / bfloat16 / float64, ``vmap``) takes
the PyTorch path, which is also the fallback when no C compiler is found. Set
``SBNN_ADDONS_KERNELS=0`` to turn the kernel off, or use :func:`use_kernels`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .base import SettingSwitch, check_flag, forward_ad_active, is_exporting
from .tensors import (
    apply_function,
    broadcasts_to,
    check_windows,
    mark_binary,
    parse_estimator_spec,
    scaled_jacobian,
    standard_normal,
)

__all__ = [
    "available", "enabled", "use_kernels", "can_fuse", "sequence_backend", "fused_spike",
    "FusedSpike",
    "can_fuse_compiled", "compiled_spike",
    "spike_forward", "spike_backward", "broadcast_layout", "Dynamics", "LIFSequence",
    "lif_sequence", "LIFStep", "fused_lif_step", "window_sum", "can_window_sum",
]

_SOURCE = Path(__file__).with_name("_kernels") / "spike.c"
_OP_SOURCE = Path(__file__).with_name("_kernels") / "spike_op.cpp"
_KIND_CODES = {"st": 0, "iwst": 1, "agr": 2}
_FLAG_SETS = (  # tried in order; the first that builds and loads is used
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp"],
    ["-O3", "-ffast-math", "-fopenmp"],
    ["-O3", "-ffast-math"],
    ["-O3"],
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_operator: str | None = None  # "cpp" once the C++ operator kernel is loaded
_operator_error: str | None = None
_enabled = os.environ.get("SBNN_ADDONS_KERNELS", "1").strip().lower() not in ("0", "false", "no")


def _cache_dir() -> Path:
    env = os.environ.get("SBNN_ADDONS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sbnn_addons"


def _cpu_signature() -> str:
    """The CPU model and flags: a library built with ``-march=native`` is tied to them."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        lines = [ln for ln in info if ln.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def _compile(compiler: str, source: Path, target: Path, flags: list[str]) -> None:
    """Compile with ``flags``, then link **without** ``-ffast-math``: linking a shared
    library with it adds ``crtfastmath.o``, which would flush denormals process-wide.

    With ``-fopenmp`` the library needs ``libgomp.so.1``; torch has loaded a library of
    that name already, so the dynamic loader binds the kernel to torch's OpenMP runtime
    and its threads are torch's intra-op threads.
    """
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj = Path(tmp) / "spike.o"
        so = Path(tmp) / "spike.so"
        run = dict(check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([compiler, "-c", "-fPIC", *flags, str(source), "-o", str(obj)], **run)
        link = [f for f in flags if f == "-fopenmp"]
        libs = ["-lmvec", "-lm"] if "-ffast-math" in flags else ["-lm"]
        subprocess.run([compiler, "-shared", *link, str(obj), "-o", str(so), *libs], **run)
        os.replace(so, target)  # atomic: concurrent builders (pytest -n) never see half a file


def _load() -> ctypes.CDLL | None:
    global _lib, _load_error
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        try:
            _lib = _build_and_open()
        except Exception as exc:  # noqa: BLE001 - any failure means: use the PyTorch path
            _load_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "sbnn_addons: the fused CPU spike kernel could not be built or loaded "
                f"({_load_error}); using the PyTorch implementation, which is slower. "
                "Install a C compiler (or set CC) to enable it, or set SBNN_ADDONS_KERNELS=0 "
                "to silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _lib


def _build_and_open() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc)")
    # global: the operator library (_OP_SOURCE) resolves sbnn_spike_forward here
    lib = _open_cached("spike", _SOURCE, compiler, _FLAG_SETS, _cpu_signature(), _compile,
                       mode=ctypes.RTLD_GLOBAL)
    _declare(lib)
    return lib


def _open_cached(stem: str, source: Path, compiler: str, flag_sets, salt: str,
                 build: Callable[[str, Path, Path, list[str]], None],
                 mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL:
    """The shared library built from ``source`` with the first of ``flag_sets`` that builds
    and loads. It is cached in :func:`_cache_dir` under a name that hashes the source, the
    flags, the compiler and ``salt`` (what else the build depends on);
    ``build(compiler, source, target, flags)`` writes a missing one, atomically.

    Raises:
        RuntimeError: no flag set built and loaded (each one's error, in order).
    """
    code = source.read_bytes()
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(
            code + repr(flags).encode() + compiler.encode() + salt.encode()
        ).hexdigest()[:16]
        target = cache / f"{stem}-{key}.so"
        try:
            if not target.exists():
                build(compiler, source, target, flags)
            return ctypes.CDLL(str(target), mode=mode)
        except (subprocess.CalledProcessError, OSError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            errors.append(f"{' '.join(flags)}: {detail.strip()[:300]}")
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, u64, i32, f32 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_float)
    lib.sbnn_spike_forward.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, u64, i32, i32, f32,
                                       i32]
    lib.sbnn_spike_forward.restype = ctypes.c_double
    lib.sbnn_spike_backward.argtypes = [ptr, ptr, ptr, i64, i64, ptr, i32, ptr, ptr, i64, i32,
                                        f32, f32, f32, f32, f32, i32, f32, i32]
    lib.sbnn_spike_backward.restype = None
    lib.sbnn_spike_backward_compact.argtypes = lib.sbnn_spike_backward.argtypes
    lib.sbnn_spike_backward_compact.restype = None
    lib.sbnn_lif_step_forward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32, f32, i32, ptr,
                                          ptr, ptr, ptr, i64, u64, i32, i32, f32, i32]
    lib.sbnn_lif_step_forward.restype = ctypes.c_double
    lib.sbnn_lif_step_backward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ptr, f32, f32, i32,
                                           ptr, ptr, ptr, i32, i64, i32, f32, f32, f32, f32,
                                           f32, i32, f32, i32]
    lib.sbnn_lif_step_backward.restype = None
    lib.sbnn_window_sum.argtypes = [ptr, ptr, *[i64] * 12, i32, f32, i32]
    lib.sbnn_window_sum.restype = ctypes.c_int
    lib.sbnn_window_sum_backward.argtypes = [ptr, ptr, *[i64] * 11, f32, i32]
    lib.sbnn_window_sum_backward.restype = ctypes.c_int
    lib.sbnn_erfcx.argtypes = [ptr, ptr, i64]
    lib.sbnn_erfcx.restype = None
    lib.sbnn_thresholds.argtypes = [ptr, ptr]
    lib.sbnn_thresholds.restype = None
    lib.sbnn_init.argtypes = []
    lib.sbnn_init.restype = None
    lib.sbnn_init()  # the forward's threshold tables


def available() -> bool:
    """Whether the fused kernel is compiled and loaded (builds it on the first call)."""
    return _load() is not None


def enabled() -> bool:
    """Whether spike functions use the kernel when it is available."""
    return _enabled


class use_kernels(SettingSwitch):
    """Turn the fused kernel on or off (``False``: PyTorch path) now; used as a context
    manager, restore the previous setting when the block ends.

    Like ``torch.set_grad_enabled``, it works both ways: ``with use_kernels(False): ...``
    for a block, ``use_kernels(False)`` as a statement for good.
    """

    def __init__(self, flag: bool) -> None:
        self._flag = check_flag("use_kernels(flag)", flag)
        super().__init__()

    def _apply(self) -> Callable[[], None]:
        global _enabled
        previous, _enabled = _enabled, self._flag

        def restore() -> None:
            global _enabled
            _enabled = previous

        return restore


def can_fuse(u: Tensor, variance: Tensor, compiling: bool | None = None) -> bool:
    """Whether :func:`fused_spike` serves this drive and variance (``variance`` must
    broadcast to ``u``). ``compiling``: whether a graph is traced, where the caller knows it."""
    return (
        _enabled
        and u.dtype == torch.float32
        and variance.dtype == torch.float32
        and u.is_cpu
        and variance.is_cpu
        and not torch._C._are_functorch_transforms_active()
        and not (torch.compiler.is_compiling() if compiling is None else compiling)
        and not forward_ad_active()  # the step-by-step path names it (IWSTSpike.fire)
        and (_lib is not None or _load() is not None)
    )


def sequence_backend(x_seq: Tensor, variance: Tensor | None) -> str | None:
    """How :func:`lif_sequence` runs this sequence: ``"kernel"`` (the C kernel: float32
    on the CPU, kernel enabled), ``"torch"`` (PyTorch operations on any device, float32 or
    float64, the same law and estimators: what a CUDA tensor takes), or ``None`` where
    neither serves it (half precision, a graph being compiled, ``torch.func``
    transforms): then the caller steps through its own loop.

    Args:
        x_seq: the mean input ``[T, *]``.
        variance: the input's variance term (or ``None``), of the same dtype and device.
    """
    var = x_seq if variance is None else variance
    if can_fuse(x_seq, var):
        return "kernel"
    if (x_seq.dtype not in (torch.float32, torch.float64) or var.dtype != x_seq.dtype
            or var.device != x_seq.device or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or forward_ad_active()):  # named step by step
        return None
    return "torch"


@functools.lru_cache(maxsize=4096)
def broadcast_layout(var_shape: torch.Size, shape: torch.Size) -> tuple[int, int] | None:
    """``(mid, inner)`` of a variance of ``var_shape`` broadcast to ``shape``.

    The kernel reads the variance of element ``e`` (row-major in ``shape``) at
    ``(e // (mid * inner)) * inner + e % inner`` of the contiguous variance: ``(1, 1)`` for
    the full shape, ``(C, H * W)`` for ``[N, 1, H, W]`` against ``[N, C, H, W]``,
    ``(numel, 1)`` for one element. ``None`` when the broadcast dimensions are not one
    contiguous block (the variance is then expanded).
    """
    nd = len(shape)
    padded = (1,) * (nd - len(var_shape)) + tuple(var_shape)
    differ = [d for d in range(nd) if padded[d] != shape[d]]
    if not differ:
        return 1, 1
    first, last = differ[0], differ[-1] + 1
    if any(padded[d] != 1 for d in range(first, last)):
        return None
    return math.prod(shape[first:last]), math.prod(shape[last:])


def can_window_sum(x: Tensor, n: int) -> bool:
    """Whether :func:`window_sum` serves ``x`` with ``n`` window dimensions."""
    return (
        _enabled and n in (1, 2) and x.dtype == torch.float32 and x.is_cpu
        and x.dim() >= n + 1 and not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling() and (_lib is not None or _load() is not None)
    )


def _window_geometry(shape, kernel, stride, padding):
    """``(H, W, Ho, Wo, kh, kw, sh, sw, ph, pw)`` of 1-D or 2-D windows on ``shape``."""
    if len(kernel) == 1:
        length = shape[-1]
        out = (length + 2 * padding[0] - kernel[0]) // stride[0] + 1
        return 1, length, 1, out, 1, kernel[0], 1, stride[0], 0, padding[0]
    h, w = shape[-2], shape[-1]
    ho = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    wo = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    return h, w, ho, wo, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]


def window_sum(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
               padding: tuple[int, ...], channels: int = 1, square: bool = False,
               scale: float = 1.0) -> Tensor:
    """Zero-padded window sums of the last 1 or 2 dimensions, in one pass (no autograd).

    .. code-block:: text

        out[m, j] = scale * sum_{c < channels} sum_{i in window(j)} f(x[m, c, i]),
        f(v) = v, or v^2 with square

    Args:
        x: float32 CPU ``[*, channels, *window_dims]`` (``channels = 1``: the leading
            dimensions are all batch).
        kernel: window size per window dimension (validated by the caller, see
            :func:`sbnn_addons.functional.box_sum`).
        stride: step per window dimension.
        padding: zeros on both sides, per window dimension.
        channels: the dimension before the window dimensions is summed when > 1.
        square: sum ``x^2`` instead of ``x``.
        scale: factor applied to the sums.

    Returns:
        ``[*, 1, *out_dims]`` for ``channels > 1``, else ``[*, *out_dims]``.

    Raises:
        TypeError: ``x`` is not float32 on the CPU.
        ValueError: bad windows (as :func:`~sbnn_addons.functional.box_sum`), more than
            two window dimensions, or ``channels`` that is not ``x``'s channel count.
    """
    _check("x", x)
    kernel, stride, padding = tuple(kernel), tuple(stride), tuple(padding)
    check_windows(x, kernel, stride, padding)
    n = len(kernel)
    if n > 2 or (channels > 1 and (x.dim() < n + 1 or x.shape[-n - 1] != channels)):
        raise ValueError(f"window_sum takes 1 or 2 window dimensions and x [*, channels, ...] "
                         f"with channels = {channels}, got kernel {kernel} and x of shape "
                         f"{tuple(x.shape)}")
    return _window_sum(x, kernel, stride, padding, channels, square, scale)


def _window_sum(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                padding: tuple[int, ...], channels: int = 1, square: bool = False,
                scale: float = 1.0) -> Tensor:
    """:func:`window_sum` for arguments already checked (box_sum, the conv layers)."""
    n = len(kernel)
    x = x.contiguous()
    h, w, ho, wo, kh, kw, sh, sw, ph, pw = _window_geometry(x.shape, kernel, stride, padding)
    lead = x.shape[:-n - 1] if channels > 1 else x.shape[:-n]
    out_dims = (ho, wo) if n == 2 else (wo,)
    out = torch.empty((*lead, *((1,) if channels > 1 else ()), *out_dims), dtype=x.dtype)
    m = math.prod(lead)
    failed = _require().sbnn_window_sum(x.data_ptr(), out.data_ptr(), m, channels, h, w, ho,
                                        wo, kh, kw, sh, sw, ph, pw, int(square), float(scale),
                                        torch.get_num_threads())
    _check_allocation(failed, h, w, ph, pw)
    return out


def _check_allocation(failed: int, h: int, w: int, ph: int, pw: int) -> None:
    if failed:
        raise MemoryError(
            f"the window-sum kernel could not allocate its work planes of "
            f"{(h + 2 * ph) * (w + 2 * pw) * 12} bytes per thread; free memory, or run this "
            "layer with sbnn_addons.kernels.use_kernels(False)")


def _window_sum_backward(grad: Tensor, shape: torch.Size, kernel: tuple[int, ...],
                        stride: tuple[int, ...], padding: tuple[int, ...],
                        scale: float = 1.0) -> Tensor:
    """The transposed :func:`window_sum` (``channels = 1``, no square) onto ``shape``:
    the backward of ``box_sum``, whose arguments are already checked."""
    n = len(kernel)
    grad = grad.to(torch.float32).contiguous()
    h, w, ho, wo, kh, kw, sh, sw, ph, pw = _window_geometry(shape, kernel, stride, padding)
    out = torch.empty(shape, dtype=torch.float32)
    m = math.prod(shape[:-n])
    failed = _require().sbnn_window_sum_backward(grad.data_ptr(), out.data_ptr(), m, h, w, ho,
                                                 wo, kh, kw, sh, sw, ph, pw, float(scale),
                                                 torch.get_num_threads())
    _check_allocation(failed, h, w, ph, pw)
    return out


def _thresholds() -> tuple[Tensor, Tensor]:
    """The forward's byte tables ``(fire, silent)`` as float64 (for the tests)."""
    fire, silent = torch.empty(256), torch.empty(256)
    _require().sbnn_thresholds(fire.data_ptr(), silent.data_ptr())
    return fire.double(), silent.double()


def _erfcx(x: Tensor) -> Tensor:
    """The backward's float32 ``erfcx`` on ``x`` in [0, 30] (for the tests)."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    _require().sbnn_erfcx(x.data_ptr(), out.data_ptr(), x.numel())
    return out


_draws = threading.local()  # one reused 0-dim int64 tensor per thread for the key draws


def _seed(generator: torch.Generator | None) -> int:
    """A 64-bit Philox key drawn from ``generator`` (the global RNG when ``None``)."""
    draw = getattr(_draws, "tensor", None)
    if draw is None:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of it
            draw = _draws.tensor = torch.empty((), dtype=torch.int64)
    return draw.random_(generator=generator).item() & 0xFFFF_FFFF_FFFF_FFFF


def _require() -> ctypes.CDLL:
    lib = _lib if _lib is not None else _load()
    if lib is None:
        raise RuntimeError(
            f"the fused spike kernel is not available ({_load_error}); check "
            "sbnn_addons.kernels.available() first, or install a C compiler"
        )
    return lib


def _check(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.float32 or not t.is_cpu:
        got = f"{t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(
            f"{name} must be a torch.float32 CPU tensor for the fused kernel, got {got}; use "
            "sbnn_addons.IWSTSpike or sample_spikes, which take the PyTorch path otherwise"
        )


def _layout(u: Tensor, variance: Tensor) -> tuple[Tensor, int, int]:
    # _check of both, called where one fails (its message)
    if not isinstance(u, Tensor) or u.dtype != torch.float32 or not u.is_cpu:
        _check("u", u)
    if not isinstance(variance, Tensor) or variance.dtype != torch.float32 or not variance.is_cpu:
        _check("variance", variance)
    return _layout_of(u, variance)


def _layout_of(u: Tensor, variance: Tensor) -> tuple[Tensor, int, int]:
    """:func:`_layout` for float32 CPU tensors (checked by the caller)."""
    layout = _shape_layout(u.shape, variance.shape)
    if layout is None:
        raise ValueError(
            f"variance of shape {tuple(variance.shape)} does not broadcast to the drive u of "
            f"shape {tuple(u.shape)} (it must not enlarge u)"
        )
    expand, mid, inner = layout
    return (variance.expand_as(u) if expand else variance).contiguous(), mid, inner


@functools.lru_cache(maxsize=1024)
def _shape_layout(u_shape: torch.Size, var_shape: torch.Size) -> tuple[bool, int, int] | None:
    """``(expand, mid, inner)`` of :func:`_layout_of` for these shapes (``expand``: the
    variance is expanded to ``u``'s shape first), ``None`` where the variance does not
    broadcast to ``u``. Cached: the kernel is called once per neuron and step."""
    if var_shape == u_shape:  # the common cases first: no broadcast
        return False, 1, 1
    if len(var_shape) == 0:
        return False, max(math.prod(u_shape), 1), 1
    if not broadcasts_to(var_shape, u_shape, compiling=False):
        return None
    layout = broadcast_layout(var_shape, u_shape)
    return (True, 1, 1) if layout is None else (False, *layout)


def spike_forward(u: Tensor, variance: Tensor, seed: int, at_zero: bool = False,
                  aux_offset: float | None = None) -> tuple[Tensor, Tensor, float]:
    """The kernel's forward (no autograd): spikes ``1[U < Phi(u / sqrt(variance))]``.

    Args:
        u: drive, float32 CPU ``[*]``.
        variance: float32, broadcastable to ``u`` (kept compact where its broadcast
            dimensions form one block, see :func:`broadcast_layout`).
        seed: the 64-bit Philox key.
        at_zero: where ``variance == 0``, fire at ``u == 0`` too.
        aux_offset: if not ``None``, also return ``sum z^2`` of the auxiliary loss with
            ``z = (u + aux_offset) / max(sigma, SIGMA_MIN)`` over the noisy units.

    Returns:
        ``(spikes, spike_bytes, sum_z2)``: the spikes as float32 and as uint8 (shape of
        ``u``) and the auxiliary sum (0 without ``aux_offset``).
    """
    u = u.contiguous()
    var, mid, inner = _layout(u, variance)
    return _forward_raw(u, var, mid, inner, seed, at_zero, aux_offset)


def _forward_raw(u: Tensor, var: Tensor, mid: int, inner: int, seed: int, at_zero: bool,
                 aux_offset: float | None,
                 out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, float]:
    """:func:`spike_forward` for a contiguous ``u`` and a variance in its kernel layout;
    ``out``: contiguous float32 and uint8 tensors of ``u``'s shape to write the spikes to
    (the uint8 one may be ``None``: no bytes)."""
    if out is None:
        h, hb = torch.empty_like(u), torch.empty_like(u, dtype=torch.uint8)
    else:
        h, hb = out
    aux = (_lib if _lib is not None else _require()).sbnn_spike_forward(
        u.data_ptr(), var.data_ptr(), mid, inner, h.data_ptr(),
        0 if hb is None else hb.data_ptr(), u.numel(), seed,
        int(at_zero), int(aux_offset is not None), float(aux_offset or 0.0),
        torch.get_num_threads())
    return h, hb, aux


def spike_backward(grad: Tensor, u: Tensor, variance: Tensor, spikes: Tensor, estimator,
                   grad_aux: float = 0.0, aux_offset: float = 0.0,
                   aux_var: bool = True) -> tuple[Tensor, Tensor]:
    """The kernel's backward for given spikes: ``(g J(h), -z g J(h) / (2 sigma))``.

    ``J`` is :func:`sbnn_addons.functional.estimator_jacobian`. The first result has the
    shape of ``u``, the second the shape of ``variance`` (summed over its broadcast).
    ``grad_aux`` (the gradient of the loss with respect to the forward's ``sum z^2``)
    adds ``grad_aux * 2 z / sigma`` and, with ``aux_var``, ``-grad_aux * z^2 / var``.
    """
    u = u.contiguous()
    var, mid, inner = _layout(u, variance)
    if spikes.shape != u.shape or grad.shape != u.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and spikes {tuple(spikes.shape)} must have "
                         f"the shape of u {tuple(u.shape)}")
    return _backward_raw(grad, u, var, mid, inner, spikes.to(torch.float32), estimator,
                         grad_aux, aux_offset, variance.shape, aux_var)


def _backward_raw(grad: Tensor, u: Tensor, var: Tensor, mid: int, inner: int, h: Tensor,
                  estimator, grad_aux: float, aux_offset: float,
                  var_shape: torch.Size, aux_var: bool = True,
                  pull_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """:func:`spike_backward` in the kernel layout; ``grad_var`` has ``var_shape``. ``h``:
    the spikes, float32 or uint8. ``pull_weight``: ``w`` of the auxiliary pull
    (:attr:`~sbnn_addons.IWSTSpike.aux_pull`), whose factor ``2 w mean|grad|`` the kernel
    computes first.

    A variance broadcast over a block (``mid > 1``) gets its gradient summed in the
    kernel, each thread owning whole outer blocks, when there are at least two of them
    (the choice does not depend on the thread count, so neither do the results);
    otherwise the kernel writes it in full and it is summed here.
    """
    kind, p = _estimator_codes(estimator)
    h = h.contiguous()
    g = grad.to(torch.float32).contiguous()
    grad_u = torch.empty_like(u)
    threads = torch.get_num_threads()
    compact = mid > 1 and u.numel() // (mid * inner) >= 2
    grad_var = torch.empty_like(var) if compact else torch.empty_like(u)
    fn = _require().sbnn_spike_backward_compact if compact else _require().sbnn_spike_backward
    fn(g.data_ptr(), u.data_ptr(), var.data_ptr(), mid, inner, h.data_ptr(),
       int(h.dtype == torch.float32), grad_u.data_ptr(), grad_var.data_ptr(), u.numel(), kind,
       p, estimator.tau, estimator.max_weight, float(grad_aux), float(aux_offset), int(aux_var),
       float(pull_weight), threads)
    if compact:
        return grad_u, grad_var.view(var_shape)
    return grad_u, (grad_var.sum_to_size(var_shape) if var_shape != u.shape else grad_var)


def _refuse_double_backward() -> None:
    """Called first in the kernels' backward passes, which are not differentiable.

    Raises:
        RuntimeError: the backward runs with ``create_graph=True`` (a gradient penalty,
            a Hessian-vector product, MAML): its result would treat the IW-ST Jacobian as
            a constant and give wrong second-order gradients.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused spike kernel's backward is not differentiable, so a second-order "
            "gradient (backward with create_graph=True, torch.autograd.grad of a gradient) "
            "would be wrong; run that code on the PyTorch path, which is twice "
            "differentiable: with sbnn_addons.kernels.use_kernels(False): ..."
        )


def _saved_tensors(ctx, node: str) -> tuple[Tensor, ...]:
    """``ctx.saved_tensors`` of a kernel node that saves the spikes it returns (shared with
    the layer they feed, :func:`~sbnn_addons.functional.mark_binary` ``kept``).

    Raises:
        RuntimeError: those spikes were changed in place after the node returned them
            (PyTorch's version check), with a message naming the cause and the fix.
    """
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if f"output 0 of {node}" not in str(e):
            raise
        raise RuntimeError(
            f"the spikes returned by the fused spike kernel ({node}) were changed in place "
            "after it returned them (e.g. nn.Dropout(inplace=True) or spk.mul_(mask) after "
            "the neuron, or an in-place edit of a spike record): the kernel keeps that very "
            "tensor for its backward (shared with the layer it feeds, which saves memory), "
            "so its gradient cannot be computed. Change a copy instead: nn.Dropout() "
            "without inplace=True, spk = spk * mask") from e


class FusedSpike(torch.autograd.Function):
    """Sampled spike with an IW-ST backward, computed by the compiled kernel.

    Inputs: ``u`` (float32, CPU), ``variance`` (broadcastable to ``u``), the Philox
    ``seed``, the :class:`~sbnn_addons.estimators.Estimator`, ``at_zero`` and
    ``aux_offset`` (``None``: no auxiliary sum) and ``aux_var`` (whether the auxiliary
    sum's gradient reaches the variance). Outputs: spikes (float32) and, with
    ``aux_offset``, ``sum z^2`` (a 0-dim tensor). Gradients flow to ``u`` and
    ``variance``. Check :func:`can_fuse` first.

    The spikes are saved for the backward as they are (float32): a layer fed by them
    saves the same tensor, so the pair keeps one copy (see
    :func:`~sbnn_addons.functional.mark_binary`). The forward takes ``ctx`` (the classic
    form) so that the backward reuses the variance in its kernel layout; the kernel is
    not used under ``torch.func`` transforms, which need the ``setup_context`` form.
    """

    @staticmethod
    def forward(ctx, u: Tensor, variance: Tensor, seed: int, estimator, at_zero: bool,
                aux_offset: float | None, aux_var: bool, aux_pull: float = 0.0):
        u = u.contiguous()
        var, mid, inner = _layout(u, variance)
        h = torch.empty_like(u)
        _, _, aux = _forward_raw(u, var, mid, inner, seed, at_zero, aux_offset, out=(h, None))
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused output
        # the variance is kept in its compact broadcast layout
        ctx.save_for_backward(u, var, h)
        ctx.layout = (mid, inner, variance.shape)
        ctx.estimator = estimator
        ctx.aux_offset = 0.0 if aux_offset is None else float(aux_offset)
        ctx.aux_var, ctx.aux_pull = aux_var, aux_pull
        if aux_offset is None:
            return h
        return h, torch.tensor(aux, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *grad_aux: Tensor | None):
        _refuse_double_backward()
        u, var, h = _saved_tensors(ctx, "FusedSpike")
        g_aux = float(grad_aux[0]) if grad_aux and grad_aux[0] is not None else 0.0
        if grad is None:
            if g_aux == 0.0:
                return None, None, None, None, None, None, None, None
            grad = torch.zeros_like(u)
        mid, inner, var_shape = ctx.layout
        grad_u, grad_var = _backward_raw(grad, u, var, mid, inner, h, ctx.estimator, g_aux,
                                         ctx.aux_offset, var_shape, ctx.aux_var, ctx.aux_pull)
        return grad_u, grad_var, None, None, None, None, None, None


def fused_spike(u: Tensor, variance: Tensor, estimator, at_zero: bool = False,
                generator: torch.Generator | None = None,
                aux_offset: float | None = None,
                aux_var: bool = True, aux_pull: float = 0.0,
                compiling: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Spikes ``h = 1[U < Phi(u / sqrt(variance))]`` with the IW-ST backward of ``estimator``.

    Check :func:`can_fuse` first. Inputs of the wrong dtype or device raise ``TypeError``
    and a variance that does not broadcast to ``u`` raises ``ValueError``; the values are
    not checked (a negative variance counts as 0).

    Args:
        u: drive ``mu - theta``, float32 CPU tensor ``[*]``.
        variance: noise variance, float32, ``>= 0``, broadcastable to ``u`` (a broadcast
            over one block of dimensions, e.g. ``[N, 1, H, W]`` against ``[N, C, H, W]``,
            is read in place; its gradient has the variance's own shape).
        estimator: an :class:`~sbnn_addons.estimators.Estimator`.
        at_zero: where ``variance == 0``, fire at ``u == 0`` too.
        generator: CPU generator the Philox key is drawn from (global RNG when ``None``).
        aux_offset: if not ``None``, also return the differentiable auxiliary sum
            ``sum z^2``, ``z = (u + aux_offset) / sigma``, over the noisy units (Method
            page, section 5), computed in the same pass.
        aux_var: whether the auxiliary sum's gradient reaches the variance too
            (``False``: ``sigma`` is held constant in ``z``, only the drive gets it).
        aux_pull: the backward also adds the auxiliary pull
            (:func:`~sbnn_addons.tensors.aux_pull_gradient`;
            :attr:`~sbnn_addons.IWSTSpike.aux_pull`).
        compiling: whether a graph is traced, where the caller knows it.

    Returns:
        Spikes ``[*]``, float32, values in {0, 1}; with ``aux_offset``, the pair
        ``(spikes, sum_z2)``.
    """
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    out = apply_function(FusedSpike, u, variance, _seed(generator), estimator, at_zero,
                         aux_offset, bool(aux_var), float(aux_pull), compiling=compiling)
    spikes = out if aux_offset is None else out[0]
    # kept (saved by the node just recorded): a layer fed by the spikes saves them as they are
    mark_binary(spikes, kept=spikes.requires_grad, compiling=compiling)
    return spikes if aux_offset is None else (spikes, out[1])


# --------------------------------------------------------------------------- custom ops
# The spike kernel as torch.library custom ops, for compiled graphs: torch.compile keeps them
# as opaque calls (their fake implementations give the shapes) and fuses everything around
# them. The forward draws its Philox key from the global generator inside the op, so the
# graph has no data-dependent seed.


class _EstimatorArgs(NamedTuple):
    """What the kernel reads of an :class:`~sbnn_addons.estimators.Estimator`."""

    kind: str
    p: float
    tau: float
    max_weight: float


# The operator is defined with ``torch.library.Library`` rather than the
# ``torch.library.custom_op`` decorator: the same dispatcher entry and fake kernel for the
# compiler, without the decorator's per-call Python wrapper (14 us against 4.6 us per call,
# measured; a converted network calls it once per neuron and step). Its autograd is
# :class:`_CompiledSpike`, whose backward is PyTorch operations that inductor fuses.
#
# Each call draws its Philox key from the global generator, so the calls must run in the
# order eager mode makes them. ``after`` is the previous call's third output (an empty
# tensor): the data dependency keeps inductor's scheduler from running one layer's calls
# of every time step before the next layer's (it does, and PyTorch 2.13 inductor's own
# ordering of effectful operators does not hold for this one), so that a compiled step
# draws eager mode's spikes under the same seed.
_LIB = torch.library.Library("sbnn_addons", "DEF")
_LIB.define("spike_forward(Tensor u, Tensor variance, bool at_zero, float? aux_offset, "
            "Tensor? after=None) -> (Tensor, Tensor, Tensor)",
            tags=(torch.Tag.nondeterministic_seeded,))


def _spike_forward_impl(u: Tensor, variance: Tensor, at_zero: bool,
                        aux_offset: float | None,
                        after: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    # the spikes as bytes: a graph keeps them for the backward at a quarter of the memory,
    # and inductor fuses their conversion to float into the operations that read them
    u = u.contiguous()
    var, mid, inner = _layout(u, variance)
    hb = torch.empty_like(u, dtype=torch.uint8)
    aux = (_lib if _lib is not None else _require()).sbnn_spike_forward(
        u.data_ptr(), var.data_ptr(), mid, inner, None, hb.data_ptr(), u.numel(), _seed(None),
        at_zero, aux_offset is not None, aux_offset or 0.0, torch.get_num_threads())
    # without aux_offset the kernel's sum is 0: no conversion of a Python float
    z2 = (torch.zeros((), dtype=torch.float32) if aux_offset is None
          else torch.tensor(aux, dtype=torch.float32))
    return hb, z2, torch.empty(0, dtype=torch.uint8)  # the last: the ordering output


def _python_impl() -> torch.library.Library:
    """The operator's CPU kernel in Python, registered in a library object of its own."""
    library = torch.library.Library("sbnn_addons", "IMPL")
    library.impl("spike_forward", _spike_forward_impl, "CPU")
    return library


# the CPU implementation until the C++ one (_install_operator) replaces it, and where that
# cannot be built: its own library object, which the replacement destroys
_PY_IMPL = [_python_impl()]


@torch.library.register_fake("sbnn_addons::spike_forward", lib=_LIB)
def _(u, variance, at_zero, aux_offset, after=None):
    return (torch.empty_like(u, dtype=torch.uint8, memory_format=torch.contiguous_format),
            u.new_empty((), dtype=torch.float32), u.new_empty(0, dtype=torch.uint8))


_spike_forward_op = torch.ops.sbnn_addons.spike_forward.default


# the operator library's flags: the C++ standard torch's headers want, else the one before
_OP_FLAG_SETS = tuple(
    ["-O2", std, "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    for std in ("-std=c++20", "-std=c++17"))


def _compile_operator(compiler: str, source: Path, target: Path, flags: list[str]) -> None:
    """Build the C++ kernel of ``sbnn_addons::spike_forward`` (``_kernels/spike_op.cpp``)
    against the installed torch's headers and libraries (about 10 s)."""
    root = Path(torch.__file__).parent
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        so = Path(tmp) / "spike_op.so"
        subprocess.run(
            [compiler, "-shared", *flags, "-I", str(root / "include"), str(source),
             "-o", str(so), "-L", str(root / "lib"), "-lc10", "-ltorch_cpu"],
            check=True, capture_output=True, text=True, timeout=300)
        os.replace(so, target)  # atomic, as the C kernel's build


def _open_operator() -> ctypes.CDLL:
    """The operator's C++ kernel library, built on first use with the system C++ compiler
    (``$CXX``, else ``c++`` or ``g++``) and cached per torch installation."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++)")
    salt = torch.__version__ + str(Path(torch.__file__).parent)
    return _open_cached("spike_op", _OP_SOURCE, compiler, _OP_FLAG_SETS, salt,
                        _compile_operator)


_op_lock = threading.Lock()


def _install_operator() -> bool:
    """Serve ``sbnn_addons::spike_forward`` on the CPU with its C++ kernel from now on
    (once per process; the C kernel must be loaded). Where the C++ library cannot be built
    or loaded, the Python implementation stays (the same results, about 12 us more per
    call) and ``_operator_error`` says why. Returns whether the C++ kernel serves it.

    Called at trace time (:func:`can_fuse_compiled`), never from inside a call of the
    operator: replacing a kernel while the dispatcher runs it is not safe."""
    global _operator, _operator_error
    with _op_lock:
        if _operator is not None or _operator_error is not None:
            return _operator is not None
        try:
            if _lib is None:
                raise RuntimeError(f"the C kernel is not loaded ({_load_error})")
            library = _open_operator()
        except Exception as exc:  # noqa: BLE001 - any failure: the Python implementation
            _operator_error = f"{type(exc).__name__}: {exc}"
            return False
        _PY_IMPL[0]._destroy()  # one CPU kernel at a time (no override warning)
        message = ctypes.create_string_buffer(1024)
        if library.sbnn_register_operator(message, len(message)) != 0:
            _operator_error = message.value.decode(errors="replace")
            _PY_IMPL[0] = _python_impl()
            return False
        _operator = "cpp"
        return True


@torch.compiler.assume_constant_result
def _ready_for_graphs() -> bool:
    """Whether the kernel is available, loading it and the operator's C++ kernel now, while
    a graph is traced and before it calls the operator. A constant of the graph being
    traced (called once by Dynamo, not traced)."""
    if _lib is None and _load() is None:
        return False
    _install_operator()
    return True


def can_fuse_compiled(u: Tensor, variance: Tensor) -> bool:
    """Under ``torch.compile``: whether the spike op (:func:`compiled_spike`) serves this
    drive and variance (float32 CPU, kernel enabled and available: loaded now, with the
    operator's C++ kernel, if it was not)."""
    return (_enabled and u.dtype == torch.float32 and variance.dtype == torch.float32
            and u.is_cpu and variance.is_cpu and _ready_for_graphs())


class _CompiledSpike(torch.autograd.Function):
    """The custom ops with the estimator as a constant: the form ``torch.compile`` traces."""

    # The constants travel as one tuple, (at_zero, estimator spec, aux_offset, aux_var,
    # aux_pull), with the ordering input `after` (a tensor, never differentiated) last:
    # Dynamo traces PyTorch's per-argument handling of an autograd.Function at every
    # call, once per neuron and time step.
    @staticmethod
    def forward(u, variance, constants):
        at_zero, _estimator, aux_offset, _aux_var, _aux_pull, after = constants
        fired, z2, token = _spike_forward_op(u, variance, at_zero, aux_offset, after)
        return fired.to(u.dtype), z2, fired, token

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, variance, (_at_zero, estimator, aux_offset, aux_var, aux_pull, _after) = inputs
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.save_for_backward(u, variance, output[2])  # the spikes as bytes
        ctx.estimator = estimator  # Estimator.spec: a constant under torch.compile
        ctx.aux_offset = 0.0 if aux_offset is None else aux_offset
        ctx.want_aux = aux_offset is not None
        ctx.aux_var = aux_var
        ctx.aux_pull = aux_pull

    @staticmethod
    def backward(ctx, grad, grad_aux, _grad_bytes, _grad_token):
        # the kernel's formulas as PyTorch operations (spike_backward's): in a compiled
        # graph inductor fuses them with the rest of the backward, which costs less
        # than a call of the kernel as an opaque operator (bench_compile.py)
        u, variance, spikes = ctx.saved_tensors
        grad_u, grad_var = _torch_spike_backward(
            grad, u, variance, spikes, _EstimatorArgs(*parse_estimator_spec(ctx.estimator)),
            grad_aux if ctx.want_aux else None, ctx.aux_offset, ctx.aux_var, ctx.aux_pull)
        return grad_u, grad_var, None


# The last spike operator call's ordering output, read and replaced by every traced call
# (:func:`compiled_spike`): within a graph a chain of data dependencies in eager mode's
# order; across graphs Dynamo stores the graph's last one here (always a tensor, so that
# no graph is traced twice for a ``None``).
_DRAW_ORDER = [torch.empty(0, dtype=torch.uint8)]


def compiled_spike(u: Tensor, variance: Tensor, estimator, at_zero: bool = False,
                   aux_offset: float | None = None, aux_var: bool = True,
                   aux_pull: float = 0.0) -> tuple[Tensor, Tensor]:
    """:func:`fused_spike` for compiled graphs (global RNG): the forward is the kernel as
    the custom operator ``sbnn_addons::spike_forward``, the backward the same formulas in
    PyTorch operations, which inductor fuses.

    Spikes ``h = 1[U < Phi(u / sqrt(variance))]`` with the IW-ST backward of ``estimator``,
    as :func:`fused_spike`: ``u`` float32 CPU ``[*]``, ``variance`` float32 broadcastable to
    ``u``. Returns ``(spikes [*], sum_z2 [])`` (``sum_z2`` is 0 without ``aux_offset``).
    ``aux_pull`` (> 0) adds the auxiliary pull of that weight to ``dL/du`` in the same
    backward (:func:`~sbnn_addons.tensors.aux_pull_gradient`'s term, from the backward's
    own ``1 / sigma``: nothing more is saved for it). Check :func:`can_fuse_compiled`
    first; wrong dtypes or devices raise ``TypeError``.
    """
    # torch.export traces with fake tensors, which must not stay behind in the chain (an
    # exported graph is called on its own: its calls run in their order)
    exporting = is_exporting()
    after = torch.empty(0, dtype=torch.uint8) if exporting else _DRAW_ORDER[0]
    spikes, z2, _, token = _CompiledSpike.apply(
        u, variance, (at_zero, estimator.spec, aux_offset, bool(aux_var), float(aux_pull),
                      after))
    if not exporting:
        _DRAW_ORDER[0] = token
    return spikes, z2


_STEP_RESETS = {"subtract": 0, "zero": 1, "none": 2}


def _estimator_codes(estimator) -> tuple[int, float]:
    """The kernel's estimator code and ``p`` (AGR(0) is IW-ST(1), Method page, section 4)."""
    if estimator.kind == "agr" and estimator.tau == 0.0:
        return _KIND_CODES["iwst"], 1.0
    return _KIND_CODES[estimator.kind], estimator.p


class LIFStep(torch.autograd.Function):
    """One step of the core LIF neuron, charge, spike and reset in one kernel pass.

    .. code-block:: text

        H = beta m + x,   u = H - theta,   h = 1[U < Phi(u / sqrt(var))],
        m' = H - theta h  ("subtract"),  H (1 - h)  ("zero"),  H  ("none")

    With ``r`` (snnTorch's order, where the reset ``r`` is the previous step's spikes,
    subtracted at the charge, and ``reset="none"``): ``H = (beta m + x) - r theta``.

    The same values as the PyTorch operations of
    :func:`~sbnn_addons.functional.lif_fire` followed by :func:`fused_spike` (bitwise:
    same Philox key, no fused multiply-add), in one autograd node whose backward is one
    pass: ``dL/dh`` through the reset too, the IW-ST Jacobian, then ``dL/dx`` and
    ``dL/dm = beta dL/dx``. Inputs: ``x``, ``m`` (``None``: the zero state), the variance
    (broadcastable to ``x``), the Philox seed and a config tuple. Outputs: spikes, ``m'``
    and, with an auxiliary offset, ``sum z^2``. The spikes are saved as they are
    (float32), shared with a layer they feed (as :class:`FusedSpike`'s). ``r`` (or
    ``None``) gets no gradient. Use :func:`fused_lif_step`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor | None, r: Tensor | None, variance: Tensor,
                seed: int, config):
        estimator, beta, theta, reset, at_zero, aux_offset, _aux_var, _aux_pull = config
        var, mid, inner = _layout_of(x, variance)  # both checked by fused_lif_step
        u, h, m_out = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        aux = _require().sbnn_lif_step_forward(
            x.data_ptr(), 0 if m is None else m.data_ptr(), 0 if r is None else r.data_ptr(),
            var.data_ptr(), mid, inner, beta,
            theta, _STEP_RESETS[reset], u.data_ptr(), h.data_ptr(), 0,
            m_out.data_ptr(), x.numel(), seed, int(at_zero), int(aux_offset is not None),
            float(aux_offset or 0.0), torch.get_num_threads())
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, var, h)
        ctx.layout = (mid, inner, variance.shape)
        ctx.config = config
        if aux_offset is None:
            return h, m_out
        return h, m_out, torch.tensor(aux, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g_h: Tensor | None, g_m: Tensor | None, *g_aux: Tensor | None):
        _refuse_double_backward()
        u, var, h = _saved_tensors(ctx, "LIFStep")
        estimator, beta, theta, reset, _, aux_offset, aux_var, aux_pull = ctx.config
        grad_aux = float(g_aux[0]) if g_aux and g_aux[0] is not None else 0.0
        if g_h is None and g_m is None and grad_aux == 0.0:
            return None, None, None, None, None, None
        if g_h is None and grad_aux == 0.0 and reset == "none":
            # no gradient reaches the spikes (a membrane readout): m' = H = beta m + x
            return g_m, beta * g_m if ctx.needs_input_grad[1] else None, None, None, None, None
        mid, inner, var_shape = ctx.layout
        g_h = None if g_h is None else g_h.to(torch.float32).contiguous()
        g_m = None if g_m is None else g_m.to(torch.float32).contiguous()
        g_x = torch.empty_like(u)
        g_mprev = torch.empty_like(u) if ctx.needs_input_grad[1] else None
        compact = mid > 1 and u.numel() // (mid * inner) >= 2
        g_var = torch.empty_like(var) if compact else torch.empty_like(u)
        kind, p = _estimator_codes(estimator)
        # IWSTSpike.aux_pull: the kernel scales it by mean|dL/dh| through the spikes and
        # the reset
        _require().sbnn_lif_step_backward(
            0 if g_h is None else g_h.data_ptr(), 0 if g_m is None else g_m.data_ptr(),
            u.data_ptr(), var.data_ptr(), mid, inner, h.data_ptr(), beta, theta,
            _STEP_RESETS[reset], g_x.data_ptr(), 0 if g_mprev is None else g_mprev.data_ptr(),
            g_var.data_ptr(), int(compact), u.numel(), kind, p, estimator.tau,
            estimator.max_weight, grad_aux, float(aux_offset or 0.0), int(aux_var), float(aux_pull),
            torch.get_num_threads())
        if compact:
            g_var = g_var.view(var_shape)
        elif var_shape != u.shape:
            g_var = g_var.sum_to_size(var_shape)
        return g_x, g_mprev, None, g_var, None, None


def fused_lif_step(x: Tensor, membrane: Tensor | None, variance: Tensor, estimator,
                   beta: float, threshold: float = 1.0, reset: str = "subtract",
                   at_zero: bool = False, generator: torch.Generator | None = None,
                   aux_offset: float | None = None, aux_var: bool = True,
                   aux_pull: float = 0.0) -> tuple[Tensor, ...]:
    """One fused step of the core LIF neuron (:class:`LIFStep`).

    Args:
        x: input current ``[*]``, float32 CPU.
        membrane: ``m``, float32 of the shape of ``x``, or ``None`` (zero state).
        variance: the noise variance of this step's draw, float32, broadcastable to ``x``.
        estimator: an :class:`~sbnn_addons.estimators.Estimator`.
        beta: membrane decay.
        threshold: ``theta``.
        reset: ``"subtract"``, ``"zero"`` or ``"none"``.
        at_zero: where ``variance == 0``, fire at ``u == 0`` too.
        generator: the generator the Philox key is drawn from (global RNG when ``None``),
            one key as :func:`fused_spike` draws.
        aux_offset: if not ``None``, also return the auxiliary ``sum z^2``
            (:func:`spike_forward`), differentiable.
        aux_var: whether the auxiliary sum's gradient reaches the variance too
            (``False``: ``sigma`` is held constant in ``z``, only the drive gets it).
        aux_pull: the backward also adds the auxiliary pull
            (:func:`~sbnn_addons.tensors.aux_pull_gradient`, ``dL/dh`` through the spikes
            and the reset; :attr:`~sbnn_addons.IWSTSpike.aux_pull`).

    Returns:
        ``(spikes, membrane')`` (the spikes marked binary and kept), plus ``sum z^2`` with
        ``aux_offset``.

    Raises:
        TypeError: a tensor is not float32 on the CPU.
        ValueError: a membrane of another shape than ``x``, a variance that does not
            broadcast to ``x``, or an unknown reset.
    """
    _check("x", x)
    _check("variance", variance)
    if not broadcasts_to(variance.shape, x.shape):
        raise ValueError(f"variance of shape {tuple(variance.shape)} does not broadcast to x "
                         f"of shape {tuple(x.shape)}")
    if membrane is not None:
        _check("membrane", membrane)
        if membrane.shape != x.shape:
            raise ValueError(f"membrane of shape {tuple(membrane.shape)} must have the shape "
                             f"of x {tuple(x.shape)}")
    if reset not in _STEP_RESETS:
        raise ValueError(f"reset must be one of {tuple(_STEP_RESETS)}, got {reset!r}")
    config = (estimator, float(beta), float(threshold), reset, bool(at_zero), aux_offset,
              bool(aux_var), float(aux_pull))
    return _fused_lif_step(x, membrane, variance, _seed(generator), config)


def _fused_lif_step(x: Tensor, membrane: Tensor | None, variance: Tensor, seed: int,
                    config: tuple, subtracted: Tensor | None = None) -> tuple[Tensor, ...]:
    """:func:`fused_lif_step` for checked arguments (``config``: estimator, beta, theta,
    reset, at_zero, aux_offset, aux_var, aux_pull); ``subtracted``: snnTorch's reset
    ``r``, the previous step's spikes (float32, the shape of ``x``, no gradient), with
    ``reset="none"`` (:class:`LIFStep`)."""
    out = apply_function(LIFStep, x.contiguous(), None if membrane is None
                         else membrane.contiguous(),
                         None if subtracted is None else subtracted.contiguous(), variance,
                         seed, config)
    # kept (saved by the node just recorded): a layer fed by the spikes saves them as they are
    mark_binary(out[0], kept=out[0].requires_grad)
    return out


class Dynamics(NamedTuple):
    """How :class:`LIFSequence` charges, fires and resets (its equations).

    Attributes:
        charge: ``"leaky"`` (``beta V + X``, the core :class:`~sbnn_addons.LIF`), ``"if"``
            (``V + X``), ``"lif"`` (SpikingJelly, ``decay_input=True``),
            ``"lif_nodecay"`` (``decay_input=False``), or ``"plif"`` /
            ``"plif_nodecay"`` (``ParametricLIFNode``, rate ``q`` given to
            :func:`lif_sequence`).
        beta: membrane decay; the variance decays by ``beta^2`` (``1 - q`` for PLIF).
        tau: SpikingJelly's time constant (``"lif"``, ``"lif_nodecay"``), else ``None``.
        threshold: ``theta``.
        reset: ``"hard"`` (to ``v_reset``), ``"subtract"`` (``theta``), ``"zero"`` (times
            ``1 - h``) or ``"none"``.
        v_reset: the hard-reset potential.
        reset_variance: ``S'_t = S_t (1 - h_t)`` (SpikingJelly's hard reset), else
            ``S'_t = S_t``.
        detach_reset: no gradient through the reset's spike.
    """

    charge: str
    beta: float
    tau: float | None
    threshold: float
    reset: str
    v_reset: float = 0.0
    reset_variance: bool = False
    detach_reset: bool = False


class LIFSequence(torch.autograd.Function):
    """A whole sequence of an LIF / IF neuron with moment-tracked noise, one autograd node.

    .. code-block:: text

        H_t = beta V_{t-1} + X_t                          (charge "leaky")
        H_t = V_{t-1} + (X_t - (V_{t-1} - V_r)) / tau     ("lif", SpikingJelly)
        H_t = V_{t-1} - (V_{t-1} - V_r) / tau + X_t       ("lif_nodecay")
        H_t = V_{t-1} + (X_t - (V_{t-1} - V_r)) q         ("plif", q = sigmoid(w))
        H_t = V_{t-1} + X_t                               ("if")
        S_t = Q_t + beta^2 S'_{t-1}                       (Q_t: the input's variance term)
        h_t = 1[U_t < Phi((H_t - theta) / sqrt(S_t + s_n^2))]      (kernel draw)
        V_t = h_t V_r + (1 - h_t) H_t    ("hard"),   H_t - h_t theta   ("subtract"),
              H_t (1 - h_t)              ("zero"),   H_t               ("none")
        S'_t = S_t (1 - h_t) with reset_variance, else S_t

    The forward uses the same operations as the step-by-step neurons (the core
    :class:`~sbnn_addons.LIF` and a linked SpikingJelly node) and the same Philox keys,
    so spikes and membranes are equal bitwise. The backward runs the recurrences in
    reverse with each step's IW-ST Jacobian (through the reset's spike unless
    ``detach_reset``), and passes each step's gradient of the auxiliary sums to it. Use
    :func:`lif_sequence`.
    """

    @staticmethod
    def forward(ctx, x_seq: Tensor, q_seq: Tensor | None, v0: Tensor, s0: Tensor | None,
                own_var: Tensor | None, rate: Tensor | None, config):
        dyn, estimator, at_zero, noise, aux_offset, aux_var, aux_pull, backend = config
        plif = dyn.charge in _PLIF
        beta2 = (1.0 - rate) * (1.0 - rate) if plif else dyn.beta * dyn.beta
        spikes = torch.empty_like(x_seq)
        # per-step tensors, not [T, ...] buffers: blocks of a step's size are reused by the
        # allocator, while very large ones are mapped afresh (page faults) every time
        # the charged membranes H_t are saved, not the drives u_t = H_t - theta: the
        # backward recomputes u_t exactly (the same operation), while H_t = u_t + theta
        # would lose H_t's low bits to a threshold far larger than the membrane
        hs, hbs, variances, prevs, meta, aux = [], [], [], [], [], []
        v, state = v0, s0
        for t, x in enumerate(x_seq):
            h = _charge(dyn, v, x, rate)
            q = None if q_seq is None else q_seq[t]
            prev = state
            if state is None:
                state = q
            elif q is None:
                state = state * beta2
            elif dyn.charge == "leaky":  # the operations of each step-by-step neuron
                state = beta2 * state + q
            elif plif:
                state = torch.addcmul(q, state, beta2)
            else:
                state = q.add(state, alpha=beta2)
            total = state if own_var is None else (own_var if state is None
                                                   else state + own_var)
            if total is None:  # no noise at all: the deterministic spike 1[u > 0]
                total = torch.zeros((), dtype=x_seq.dtype, device=x_seq.device)
            u = h - dyn.threshold
            if backend == "kernel":
                # the kernel reads u in memory order: a membrane of another layout (a
                # channels_last v0) would pair it with the wrong variances and spike slots
                u = u.contiguous()
                hb = torch.empty_like(u, dtype=torch.uint8)
                var, mid, inner = _layout(u, total)
                _, _, aux_t = _forward_raw(u, var, mid, inner, noise[t], at_zero, aux_offset,
                                           out=(spikes[t], hb))
            else:
                hb, aux_t = _torch_spike_forward(u, total, noise, at_zero, aux_offset)
                spikes[t].copy_(hb)
                var, mid, inner = total, 1, 1
            aux.append(aux_t)
            hs.append(h)
            hbs.append(hb)
            variances.append(var)
            prevs.append(prev if plif else None)
            meta.append((mid, inner, total.shape, None if state is None else state.shape))
            v = _reset(dyn, h, spikes[t])
            if dyn.reset_variance and state is not None:  # S (1 - h), one operation
                state = state.addcmul(state, spikes[t], value=-1.0)
        if state is not None and state._is_view():  # e.g. Q_0 itself after one step
            state = state.clone()
        if state is None:
            state = torch.zeros((), dtype=x_seq.dtype, device=x_seq.device)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*hs, *hbs, *variances, *prevs,
                              *((x_seq, v0, rate) if plif else ()))
        ctx.meta, ctx.dyn, ctx.estimator = meta, dyn, estimator
        ctx.aux_offset = 0.0 if aux_offset is None else float(aux_offset)
        ctx.aux_var, ctx.aux_pull, ctx.backend = aux_var, aux_pull, backend
        ctx.want_aux = aux_offset is not None
        ctx.shapes = tuple(None if t is None else t.shape for t in (q_seq, v0, s0, own_var))
        if backend == "kernel":
            return spikes, v, state, torch.tensor(aux, dtype=torch.float32)  # per step
        sums = (torch.stack(aux) if aux_offset is not None
                else x_seq.new_zeros(len(aux), dtype=torch.float32))
        return spikes, v, state, sums

    @staticmethod
    def backward(ctx, g_spikes, g_v, g_state, g_aux):
        _refuse_double_backward()
        steps = len(ctx.meta)
        saved = ctx.saved_tensors
        hs, hbs = saved[:steps], saved[steps:2 * steps]
        variances, prevs = saved[2 * steps:3 * steps], saved[3 * steps:4 * steps]
        dyn = ctx.dyn
        q_shape, v_shape, s_shape, own_shape = ctx.shapes
        kernel = ctx.backend == "kernel"
        if kernel:
            g_aux = [0.0] * steps if g_aux is None else g_aux.tolist()  # per step
        grad_x = torch.empty((steps, *hs[0].shape), dtype=hs[0].dtype, device=hs[0].device)
        grad_q, g_own, g_rate, rate, v_prev = [], None, None, None, None
        if len(saved) > 4 * steps:  # PLIF: dH_t/dq needs V_{t-1} (recomputed) and X_t
            x_seq, v0, rate = saved[4 * steps:]
            v_prev = [v0] + [_reset(dyn, hs[t], hbs[t].to(hs[t].dtype))
                             for t in range(steps - 1)]
            beta = 1.0 - rate
            beta2, state_coef = beta * beta, -2.0 * beta  # dS_t/dq = -2 (1 - q) S'_{t-1}
            g_rate_x = g_rate_s = None  # sums over t of dL/dH_t dH_t/dq, dL/dS_t S'_{t-1}
        for t in range(steps - 1, -1, -1):
            u = hs[t] - dyn.threshold  # the forward's drive, bitwise
            if kernel:
                u = u.contiguous()
            fired = hbs[t].to(u.dtype)  # 0 / 1: (1 - h) g as one addcmul, g - g h
            g_spike = torch.zeros_like(u) if g_spikes is None else g_spikes[t]
            g_h = None
            if g_v is not None:  # V_t = reset(H_t, h_t)
                g_h, g_spike = _reset_backward(dyn, g_v, fired, hs[t], g_spike)
            mid, inner, total_shape, state_shape = ctx.meta[t]
            # IWSTSpike.aux_pull, by dL/dh_t through the spikes and the reset
            if kernel:
                g_u, g_total = _backward_raw(
                    g_spike, u, variances[t], mid, inner, hbs[t], ctx.estimator, g_aux[t],
                    ctx.aux_offset, total_shape, ctx.aux_var, ctx.aux_pull)
            else:
                g_u, g_total = _torch_spike_backward(
                    g_spike, u, variances[t], hbs[t], ctx.estimator,
                    None if g_aux is None or not ctx.want_aux else g_aux[t], ctx.aux_offset,
                    ctx.aux_var,
                    ctx.aux_pull)
            g_h = g_u if g_h is None else g_h + g_u
            if own_shape is not None:
                g = _sum_to(g_total, own_shape)
                g_own = g if g_own is None else g_own + g
            if state_shape is not None:  # dL/dS_t: from the spike and from S'_t
                g_s = _sum_to(g_total, state_shape)
                if g_state is not None:
                    if dyn.reset_variance:
                        g_state = g_state.addcmul(g_state, fired, value=-1.0)
                    g_s = g_s + _sum_to(g_state, state_shape)
                if q_shape is not None:
                    grad_q.append(_sum_to(g_s, q_shape[1:]))
                if rate is None:
                    g_state = g_s * (dyn.beta * dyn.beta)
                else:  # S_t = Q_t + (1 - q)^2 S'_{t-1}
                    g_state = g_s * beta2
                    if prevs[t] is not None:  # compact states: a sum per step
                        term = (g_s * prevs[t]).sum()
                        g_rate_s = term if g_rate_s is None else g_rate_s + term
            if rate is not None:  # dH_t/dq
                v_p = v_prev[t] if dyn.v_reset == 0.0 else v_prev[t] - dyn.v_reset
                drive = x_seq[t] - v_p if dyn.charge == "plif" else -v_p
                # the membrane's shape: accumulated elementwise, summed once at the end
                g_rate_x = (g_h * drive if g_rate_x is None
                            else g_rate_x.addcmul_(g_h, drive))
            grad_x[t], g_v = _charge_backward(dyn, g_h, rate)
        grad_q.reverse()
        g_v0 = _sum_to(g_v, v_shape)
        g_s0 = None if s_shape is None or g_state is None else _sum_to(g_state, s_shape)
        if rate is not None:
            terms = [t.sum() for t in (g_rate_x,) if t is not None]
            if g_rate_s is not None:
                terms.append(g_rate_s.sum() * state_coef)
            g_rate = sum(terms[1:], terms[0]).reshape(rate.shape) if terms else None
        return (grad_x, None if q_shape is None else torch.stack(grad_q), g_v0, g_s0, g_own,
                g_rate, None)


def _torch_spike_forward(u: Tensor, total: Tensor, generator: torch.Generator | None,
                         at_zero: bool, aux_offset: float | None) -> tuple[Tensor, Tensor]:
    """One step's spikes on the ``"torch"`` backend of :class:`LIFSequence`: the operations
    and draws of a spike function's PyTorch path (``h = 1[u + sigma eps > 0]``,
    ``sigma = sqrt(max(total, 0))``, ``eps`` from ``generator``), so the same spikes as
    the neuron's own loop. Returns the spikes as bool and the auxiliary ``sum z^2`` over
    the noisy units (``z = (u + aux_offset) / max(sigma, SIGMA_MIN)``; 0 without
    ``aux_offset``)."""
    # plain operations: a variance computed by a rule (e.g. after a pooling) can be a
    # variance carrier, whose comparisons the variance flow would refuse
    with torch._C.DisableTorchFunctionSubclass():
        sigma = total.clamp_min(0).sqrt().expand_as(u)
        fired = u + sigma * standard_normal(u, generator)
        fired = fired >= 0 if at_zero else fired > 0
        if aux_offset is None:
            return fired, u.new_zeros((), dtype=torch.float32)
        z = _aux_z(u, sigma.clamp_min(1e-6), aux_offset)  # SIGMA_MIN
        return fired, torch.where(sigma > 0, z * z, 0.0).sum()


def _aux_z(u: Tensor, clamped_sigma: Tensor, aux_offset: float) -> Tensor:
    """The auxiliary loss's ``z = (u + aux_offset) / clamped_sigma`` (``clamped_sigma =
    max(sigma, SIGMA_MIN)``)."""
    return (u + aux_offset if aux_offset else u) / clamped_sigma


def _torch_spike_backward(g: Tensor, u: Tensor, total: Tensor, fired: Tensor, estimator,
                          g_aux: Tensor | None, aux_offset: float, aux_var: bool,
                          aux_pull: float) -> tuple[Tensor, Tensor]:
    """One step's ``(dL/du, dL/dtotal)`` on the ``"torch"`` backend of
    :class:`LIFSequence` and in compiled graphs, the kernel's formulas
    (:func:`spike_backward`) in PyTorch operations::

        dL/du     = g J(h) + pull clamp(z, -3, 3) / sigma + g_aux 2 z_a / sigma
        dL/dtotal = -z g J(h) / (2 sigma) - g_aux z_a^2 / total   (with aux_var)

    (``pull = 2 w mean|g|``; every term 0 where ``total = 0``; ``z_a`` the auxiliary
    ``z``; ``sigma`` clamped at ``SIGMA_MIN`` in the divisions). ``dL/dtotal`` has the
    shape of ``total``; no value is read back to the host.

    Everything that depends on ``total`` alone (one square root and one reciprocal, from
    which ``1 / max(sigma, SIGMA_MIN)``, ``1 / (2 sigma)`` and ``1 / total`` follow) is
    formed in ``total``'s compact shape, e.g. ``[B, 1]`` for a per-layer std, and
    ``dL/dtotal``'s factors of it are applied after the sum over the broadcast
    dimensions: per unit, the backward is multiplications and one ``exp`` (inductor
    recomputes what it inlines at every element).
    """
    with torch._C.DisableTorchFunctionSubclass():  # plain operations (_torch_spike_forward)
        work = torch.float64 if u.dtype == torch.float64 else torch.float32
        u = u.to(work)
        total = total.to(work)
        sigma = total.clamp_min(0).sqrt()
        noisy = sigma > 0
        # one reciprocal: r = 1 / sigma, and 1 / max(sigma, SIGMA_MIN) = min(r, 1 / SIGMA_MIN),
        # 0 without noise (no jacobian, pull or aux term there)
        r = sigma.clamp_min(1e-30).reciprocal()
        inv = torch.where(noisy, r.clamp_max(1e6), 0.0)
        # the drive 0 without noise: an infinite one times inv = 0 is no NaN (z, the pull's
        # and the aux terms are 0 there, and the jacobian sigma J(0) times inv = 0)
        u = torch.where(noisy, u, 0.0)
        z = u * inv
        fired = fired.bool() if fired.dtype != torch.bool else fired
        jac = scaled_jacobian(z, fired, estimator.kind, estimator.p, estimator.tau,
                              estimator.max_weight) * inv
        grad_u = g.to(work) * jac
        # -z g J / (2 sigma), summed over the broadcast dimensions, then the factor
        # 1 / (2 sigma) of total's shape (z = -inf where J = 0: the limit 0)
        grad_var = torch.where(noisy, _sum_to(z.clamp(-1e30, 1e30) * grad_u, total.shape)
                               * (-0.5 * r), 0.0)
        if aux_pull and g.numel():
            scale = g.abs().mean().to(work) * (2.0 * aux_pull)
            grad_u = grad_u + z.clamp(-3.0, 3.0) * (inv * scale)  # AUX_PULL_Z_MAX
        if g_aux is not None:
            centred = u + aux_offset if aux_offset else u
            grad_u = grad_u + centred * (inv * inv * (2.0 * g_aux))  # 2 g_aux z_a / sigma
            if aux_var:  # -g_aux z_a^2 / total, 0 below SIGMA_MIN (also for an infinite sum)
                grad_var = grad_var + torch.where(
                    sigma >= 1e-6,
                    _sum_to(centred * centred, total.shape) * (-g_aux * (inv * r).square()),
                    0.0)
        return grad_u, grad_var


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


def _charge(dyn: Dynamics, v: Tensor, x: Tensor, rate: Tensor | None) -> Tensor:
    if dyn.charge == "leaky":
        return dyn.beta * v + x
    if dyn.charge == "if":
        return v + x
    # V - V_r: V itself for V_r = 0 (v - 0.0 is v, bitwise: one operation fewer per step)
    rest = v if dyn.v_reset == 0.0 else v - dyn.v_reset
    if dyn.charge == "lif":
        return v + (x - rest) / dyn.tau
    if dyn.charge == "lif_nodecay":
        return v - rest / dyn.tau + x
    if dyn.charge == "plif":
        return v + (x - rest) * rate
    return v - rest * rate + x


def _charge_backward(dyn: Dynamics, g_h: Tensor,
                     rate: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(dL/dX_t, dL/dV_{t-1})`` from ``dL/dH_t``."""
    if dyn.charge == "leaky":
        return g_h, dyn.beta * g_h
    if dyn.charge == "if":
        return g_h, g_h
    if rate is not None:
        scaled = g_h * rate
        return (scaled if dyn.charge == "plif" else g_h), g_h - scaled
    scaled = g_h / dyn.tau
    return (scaled if dyn.charge == "lif" else g_h), g_h - scaled


def _reset(dyn: Dynamics, h: Tensor, fired: Tensor) -> Tensor:
    """``V_t`` from ``H_t`` and the spikes ``h_t`` (0 / 1): the step-by-step neurons'
    values (``H - H h`` is ``H (1 - h)`` exactly for finite ``H``, in one operation)."""
    if dyn.reset == "hard":
        if dyn.v_reset == 0.0:
            return h.addcmul(h, fired, value=-1.0)
        return fired * dyn.v_reset + (1.0 - fired) * h
    if dyn.reset == "subtract":
        return h - fired * dyn.threshold
    if dyn.reset == "zero":
        return h.addcmul(h, fired, value=-1.0)
    return h


def _reset_backward(dyn: Dynamics, g_v: Tensor, fired: Tensor, h: Tensor,
                    g_spike: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dH_t, dL/dh_t)`` through ``V_t = reset(H_t, h_t)``; ``h = H_t``, ``fired``:
    the spikes ``h_t`` as 0 / 1 floats, ``g_spike``: ``dL/dh_t`` through the spikes
    (the reset's term is added unless ``detach_reset``; one operation each)."""
    if dyn.reset == "none":
        return g_v, g_spike
    if dyn.reset == "subtract":
        g_h = g_v
        if not dyn.detach_reset:  # dV/dh = -theta
            g_spike = g_spike.add(g_v, alpha=-dyn.threshold)
        return g_h, g_spike
    g_h = g_v.addcmul(g_v, fired, value=-1.0)  # dV/dH = 1 - h ("hard", "zero")
    if not dyn.detach_reset:  # dV/dh = V_r - H ("hard"), -H ("zero")
        if dyn.reset == "hard" and dyn.v_reset != 0.0:
            g_spike = g_spike.addcmul(g_v, dyn.v_reset - h)
        else:
            g_spike = g_spike.addcmul(g_v, h, value=-1.0)
    return g_h, g_spike


def lif_sequence(x_seq: Tensor, q_seq: Tensor | None, v0: Tensor, s0: Tensor | None,
                 dynamics: Dynamics, estimator, *, rate: Tensor | None = None,
                 own_var: Tensor | None = None,
                 at_zero: bool = False, aux_offset: float | None = None,
                 aux_var: bool = True, aux_pull: float = 0.0,
                 generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """Run an LIF / IF neuron with moment-tracked noise over a sequence
    (:class:`LIFSequence`).

    Float32 CPU tensors run on the C kernel; other float32 and float64 tensors (a CUDA
    device, the kernel switched off) on PyTorch operations with the same law, estimators
    and auxiliary terms, drawing their noise as the neuron's own loop does
    (:func:`sequence_backend`).

    Args:
        x_seq: mean input ``X`` ``[T, *S]``.
        q_seq: the input's variance term ``Q_t`` ``[T, *]``, broadcastable to each step,
            of ``x_seq``'s dtype and device, or ``None`` (no input variance).
        v0: membrane before the first step, broadcastable to ``S``.
        s0: variance state ``S'`` before the first step, or ``None``.
        dynamics: the charge, reset and variance reset (:class:`Dynamics`).
        estimator: an :class:`~sbnn_addons.estimators.Estimator`.
        rate: for the ``"plif"`` charges, the learned ``q = sigmoid(w)`` (0-dim,
            differentiable): ``H_t = V_{t-1} + (X_t - (V_{t-1} - V_r)) q`` and
            ``beta = 1 - q``.
        own_var: the spike function's own noise variance ``s_n^2``, added to ``S_t`` for
            the draw only (broadcastable, may require grad), or ``None``.
        at_zero: fire at ``H - theta = 0`` where the variance is 0 (SpikingJelly's ``>=``).
        aux_offset: if not ``None``, also return the auxiliary ``sum z^2`` of each step
            (:func:`spike_forward`), differentiable.
        aux_var: whether the auxiliary sum's gradient reaches the variance too
            (``False``: ``sigma`` is held constant in ``z``, only the drive gets it).
        aux_pull: the backward also adds each step's auxiliary pull
            (:func:`~sbnn_addons.tensors.aux_pull_gradient`, ``dL/dh_t`` through the spikes
            and, unless ``detach_reset``, the reset; :attr:`~sbnn_addons.IWSTSpike.aux_pull`).
        generator: the generator the noise comes from (``None``: the global one): the T
            per-step Philox keys of the kernel, in order (the same keys as T calls of
            :func:`fused_spike`), or the per-step Gaussian draws of the PyTorch operations.

    Returns:
        ``(spikes [T, *S], V_T, S'_T)``, plus ``sum z^2`` per step ``[T]`` with
        ``aux_offset``. The spikes are marked binary.

    Raises:
        TypeError: a tensor of another dtype or device than ``x_seq``, or a sequence no
            backend serves (half precision, under ``torch.compile`` or ``torch.func``).
        ValueError: an empty sequence, shapes that do not broadcast to the membrane, or an
            unknown charge or reset.
    """
    given = [(name, t) for name, t in (("x_seq", x_seq), ("q_seq", q_seq), ("v0", v0),
                                        ("s0", s0), ("own_var", own_var)) if t is not None]
    backend = None
    if all(isinstance(t, Tensor) for _, t in given):
        backend = sequence_backend(x_seq, q_seq)
    if backend == "kernel":
        for name, t in given:
            _check(name, t)
    elif backend is None or any(t.dtype != x_seq.dtype or t.device != x_seq.device
                                for _, t in given):
        got = ", ".join(f"{name} {t.dtype} on {t.device}" if isinstance(t, Tensor)
                        else f"{name} {type(t).__name__}" for name, t in given)
        raise TypeError(
            "lif_sequence takes float32 or float64 tensors of one dtype on one device "
            f"(eager: not while torch.compile traces, not under torch.func), got {got}")
    if x_seq.dim() < 1 or x_seq.shape[0] == 0:
        raise ValueError(f"x_seq must be [T, *] with T >= 1, got shape {tuple(x_seq.shape)}")
    step = x_seq.shape[1:]
    if q_seq is not None and (q_seq.dim() < 1 or q_seq.shape[0] != x_seq.shape[0]
                              or not broadcasts_to(q_seq.shape[1:], step)):
        raise ValueError(f"q_seq of shape {tuple(q_seq.shape)} must have the T steps of x_seq "
                         f"{tuple(x_seq.shape)} and broadcast to each step")
    for name, t in (("v0", v0), ("s0", s0), ("own_var", own_var)):
        if t is not None and not broadcasts_to(t.shape, step):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the "
                             f"membrane of shape {tuple(step)}")
    if dynamics.charge not in _CHARGES or dynamics.reset not in _RESETS:
        raise ValueError(f"charge must be one of {_CHARGES} and reset one of {_RESETS}, got "
                         f"{dynamics.charge!r} and {dynamics.reset!r}")
    if dynamics.charge in ("lif", "lif_nodecay") and not (dynamics.tau or 0.0) >= 1.0:
        raise ValueError(f"tau must be >= 1 for charge {dynamics.charge!r}, got {dynamics.tau}")
    if (dynamics.charge in _PLIF) != (rate is not None) or (
            rate is not None and (rate.dim() != 0 or rate.dtype != x_seq.dtype)):
        raise ValueError(f"rate must be a 0-dim tensor of x_seq's dtype exactly for the "
                         f"charges {_PLIF}, "
                         f"got {None if rate is None else tuple(rate.shape)} for "
                         f"{dynamics.charge!r}")
    # the kernel: T Philox keys from the generator; PyTorch operations: the generator's
    # Gaussian draws, step by step (as the neuron's own loop draws them)
    noise = (tuple(_seed(generator) for _ in range(x_seq.shape[0])) if backend == "kernel"
             else generator)
    config = (dynamics, estimator, bool(at_zero), noise, aux_offset, bool(aux_var),
              float(aux_pull), backend)
    if backend == "kernel":  # all in one layout: no copy at each step
        x_seq, v0 = x_seq.contiguous(), v0.contiguous()
    # (PyTorch operations keep the input's layout: channels_last spikes and membranes, as
    # the neuron's own loop returns them, for the layers after it)
    spikes, v, state, aux = apply_function(
        LIFSequence, x_seq, q_seq, v0, s0, own_var, rate, config)
    mark_binary(spikes)
    return (spikes, v, state) if aux_offset is None else (spikes, v, state, aux)


_PLIF = ("plif", "plif_nodecay")
_CHARGES = ("leaky", "if", "lif", "lif_nodecay", *_PLIF)
_RESETS = ("hard", "subtract", "zero", "none")
