"""qcore's own compiled CPU kernels (``q4_avx512.c``): a 4-bit matmul for CPUs with AVX512-BF16,
and for batches on CPUs with AMX-BF16 a tiled one (:func:`q4_amx`, :func:`amx_unavailable_reason`).

Built on first use with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native
-fopenmp``, about a second) into ``$QCORE_CACHE_DIR`` (default ``~/.cache/qcore``), keyed by
the source, the compiler and this CPU, written to a temporary name and renamed (a crash never
leaves a half-written library). Beside it a JSON record (:func:`record_path`) holds the library's
sha256 taken at build time; a cached library is loaded only when its bytes still match that record
(:func:`check_cached`), otherwise it is rebuilt with a warning. It is loaded with ``ctypes``; its
OpenMP threads are torch's (the same ``libgomp.so.1``), their number ``torch.get_num_threads()``.

When it cannot be used -- no compiler, a CPU without AVX512-BF16, a failed build, or
``QCORE_NATIVE=0`` -- :func:`unavailable_reason` says why and QuantLinear runs torch's int4
kernel instead; nothing else changes.

Pure tensor functions here: :func:`pack_tiled` / :func:`unpack_tiled` convert between codes
``uint8 [N, K]`` and the kernel's layout, :func:`transpose_groups` / :func:`untranspose_groups`
between per-group scales or zeros ``[N, K / G]`` and the kernel's (see the C file's header).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from qcore.checkpoint.atomic import atomic_file, write_json
from qcore.progress import get_logger

log = get_logger("qcore.quant.native")

SOURCE = Path(__file__).with_name("q4_avx512.c")
CFLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ABI = 4
ROWS = 64
"""Output rows per supertile (out_features is padded to a multiple of this inside the pack)."""
SLICE = 32
"""in_features must be a multiple of this (and the group, as for torch's int4 kernel)."""
ENV_DISABLE = "QCORE_NATIVE"
ENV_CACHE = "QCORE_CACHE_DIR"

_c_int = ctypes.c_int
_ptr = ctypes.c_void_p  # tensors are passed as data_ptr() integers


def cache_dir() -> Path:
    base = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcore")
    return Path(base) / "native"


def _cpu_id() -> str:
    """This CPU's model and flags (a library built with -march=native is only for this CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


RECORD_BUILDER = "qcore.quant.native"
"""The ``builder`` field of the record written beside each library qcore compiles."""


def record_path(lib: Path) -> Path:
    """The build record beside a cached library (``q4_avx512-KEY.so`` -> ``q4_avx512-KEY.json``)."""
    return lib.with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_cached(lib: Path) -> str | None:
    """Why the cached library ``lib`` must not be loaded, or None when it is the one qcore built:
    a build record beside it, written by qcore, whose sha256 matches the file's bytes."""
    record = record_path(lib)
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has no build record {record.name}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"has an unreadable build record {record.name} ({exc})"
    if not isinstance(doc, dict) or doc.get("builder") != RECORD_BUILDER or not isinstance(doc.get("sha256"), str):
        return f"has a build record {record.name} that qcore did not write"
    actual = file_sha256(lib)
    if actual != doc["sha256"]:
        return f"does not match its build record (sha256 {actual[:16]}..., recorded {doc['sha256'][:16]}...)"
    return None


def _build(cc: str) -> Path:
    """Compile the kernel (once per source/compiler/CPU) and return the library's path; a cached
    library is reused only when :func:`check_cached` accepts it."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(CFLAGS), version, _cpu_id()]).encode())
    out_dir = cache_dir()
    lib = out_dir / f"q4_avx512-{key.hexdigest()[:16]}.so"
    if lib.exists():
        why = check_cached(lib)
        if why is None:
            return lib
        log.warning("rebuilding qcore's CPU kernel: the cached %s %s", lib, why)
    log.info("compiling qcore's CPU kernel into %s (once)", lib)
    with atomic_file(lib, mode=0o777) as tmp:  # a shared library: executable, like the compiler's output
        proc = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        sha = file_sha256(tmp)
    write_json(record_path(lib), {"builder": RECORD_BUILDER, "sha256": sha, "abi": ABI, "cflags": list(CFLAGS),
                                  "compiler": cc, "source_sha256": file_sha256(SOURCE)})
    return lib


_built: list[Path] = []
"""The path of the library :func:`_load` loaded (set on a successful load)."""


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return None, f"disabled by {ENV_DISABLE}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"needs an x86-64 CPU with AVX512-BF16 (this is {platform.machine()})"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("qcore's CPU kernel could not be built, using torch's int4 kernel: %s", exc)
        return None, f"build failed: {exc}"
    if lib.qc_abi() != ABI:
        return None, f"stale library (ABI {lib.qc_abi()}, expected {ABI}); delete {cache_dir()}"
    if not lib.qc_supported():
        return None, "this CPU has no AVX512-BF16"
    for name in ("qc_q4_gemv", "qc_q4_dequant_bf16", "qc_q4_amx"):
        getattr(lib, name).restype = None
    lib.qc_q4_gemv.argtypes = [_ptr] * 5 + [_c_int] * 5
    lib.qc_q4_amx.argtypes = [_ptr] * 5 + [_c_int] * 6
    lib.qc_q4_dequant_bf16.argtypes = [_ptr] * 4 + [_c_int] * 4
    _built[:] = [path]
    return lib, None


def _lib() -> ctypes.CDLL:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"qcore's native kernel is unavailable: {reason}")
    return lib


def unavailable_reason() -> str | None:
    """Why the native kernel cannot run here (None when it can); builds it on first call."""
    return _load()[1]


def available() -> bool:
    return _load()[0] is not None


@functools.lru_cache(maxsize=1)
def amx_unavailable_reason() -> str | None:
    """Why the AMX kernel (:func:`q4_amx`) cannot run here (None when it can)."""
    lib, reason = _load()
    if lib is None:
        return reason
    if not lib.qc_amx_supported():
        return "this CPU has no AMX-BF16 (or the operating system refused AMX state)"
    return None


def amx_available() -> bool:
    return amx_unavailable_reason() is None


def dispatch_table_path() -> Path:
    """The JSON table of measured crossovers kept beside the loaded library
    (``q4_avx512-KEY.so`` -> ``q4_avx512-KEY-dispatch.json``: the same source, compiler and CPU)."""
    _lib()
    return _built[0].with_name(_built[0].stem + "-dispatch.json")


def padded_rows(n: int) -> int:
    return -(-n // ROWS) * ROWS


def pack_tiled(codes: Tensor) -> Tensor:
    """uint8 codes ``[N, K]`` (values < 16) -> the kernel's int16 layout ``[ceil(N / 64) * 64 * K / 4]``
    (see the C file's header; padding rows hold zero codes)."""
    n, k = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, 0, 0, padded_rows(n) - n))
    c = c.reshape(-1, 4, 16, k // 8, 4, 2)  # supertile, tile, row, octet, pair (nibble), column in pair
    c = c.permute(0, 3, 1, 2, 5, 4)  # supertile, octet, tile, lane = (row, column in pair), nibble
    words = (c << (torch.arange(4, dtype=torch.int32) * 4)).sum(-1)  # < 2**16
    return words.where(words < 2**15, words - 2**16).to(torch.int16).reshape(-1).contiguous()


def unpack_tiled(words: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_tiled`."""
    w = words.to(torch.int32) & 0xFFFF
    c = (w.reshape(-1, k // 8, 4, 16, 2, 1) >> (torch.arange(4, dtype=torch.int32) * 4)) & 0xF
    c = c.permute(0, 2, 3, 1, 5, 4).reshape(-1, k)  # supertile, tile, row, octet, nibble, column in pair
    return c[:n].to(torch.uint8).contiguous()


def transpose_groups(t: Tensor) -> Tensor:
    """Per-group values ``[N, G]`` -> the kernel's bf16 ``[ceil(N / 64), G, 64]`` (zero padding)."""
    n, g = t.shape
    t = torch.nn.functional.pad(t.to(torch.bfloat16), (0, 0, 0, padded_rows(n) - n))
    return t.reshape(-1, ROWS, g).transpose(1, 2).contiguous()


def untranspose_groups(t: Tensor, n: int) -> Tensor:
    """Inverse of :func:`transpose_groups`."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n].contiguous()


def q4_mm(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, group_size: int, n: int) -> Tensor:
    """``x [M, K] float32 -> [M, n] float32`` with the packed weight and the transposed bf16
    scales/zeros of :func:`transpose_groups`."""
    lib = _lib()
    m, k = x.shape
    x = x.to(torch.float32).contiguous()
    y = torch.empty(m, padded_rows(n), dtype=torch.float32)
    lib.qc_q4_gemv(words.data_ptr(), scales.data_ptr(), zeros.data_ptr(), x.data_ptr(), y.data_ptr(), m,
                   y.shape[1], k, k if group_size == -1 else group_size, torch.get_num_threads())
    return y if y.shape[1] == n else y[:, :n]


AMX_ROWS = 16
"""The AMX kernel's activation rows per tile (a batch is padded to a multiple of this)."""


def q4_amx(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, group_size: int, n: int) -> Tensor:
    """:func:`q4_mm` on AMX tiles (the weight dequantized panel by panel into bf16, as
    :func:`q4_dequant_bf16` writes it; bf16 activations, fp32 accumulation); the result is bf16
    for bf16 ``x`` (rounded once from the fp32 sums), else float32."""
    lib = _lib()
    why = amx_unavailable_reason()
    if why is not None:
        raise RuntimeError(f"qcore's AMX kernel is unavailable: {why}")
    m, k = x.shape
    mp = -(-m // AMX_ROWS) * AMX_ROWS
    xb = x.to(torch.bfloat16)
    if mp != m:
        xb = torch.nn.functional.pad(xb, (0, 0, 0, mp - m))
    xb = xb.contiguous()
    bf16_out = x.dtype == torch.bfloat16
    y = torch.empty(mp, padded_rows(n), dtype=torch.bfloat16 if bf16_out else torch.float32)
    lib.qc_q4_amx(words.data_ptr(), scales.data_ptr(), zeros.data_ptr(), xb.data_ptr(), y.data_ptr(), mp,
                  y.shape[1], k, k if group_size == -1 else group_size, torch.get_num_threads(), int(bf16_out))
    return y[:m, :n] if (mp, y.shape[1]) != (m, n) else y


def q4_dequant_bf16(words: Tensor, scales: Tensor, zeros: Tensor, group_size: int, n: int, k: int,
                    out: Tensor | None = None) -> Tensor:
    """The bf16 ``[n, K]`` weight ``s * (q - z)`` (for batches a dense bf16 matmul runs faster),
    written into ``out`` (``[ceil(n / 64) * 64, K]``) when given."""
    lib = _lib()
    np_ = padded_rows(n)
    if out is None:
        out = torch.empty(np_, k, dtype=torch.bfloat16)
    assert out.shape == (np_, k) and out.dtype == torch.bfloat16 and out.is_contiguous()
    lib.qc_q4_dequant_bf16(words.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), np_, k,
                           k if group_size == -1 else group_size, torch.get_num_threads())
    return out[:n]
