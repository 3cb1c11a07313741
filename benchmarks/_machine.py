"""What a benchmark ran on, printed at its top: the CPU, its vector units, the threads,
the GEMM library and which kernels a compiled program holds.

Shared by ``benchmarks/layer.py``, ``routing.py`` and ``breakdown.py``, so that every
figure can name its CPU (the README's figures carry these lines).
"""

from __future__ import annotations

import os
import platform

import jax

from sigmoid_moe import _native, _native_ffn

# /proc/cpuinfo flags worth naming, in the order printed, with their usual names.
_EXTENSIONS = (
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("avx512f", "AVX-512F"),
    ("avx512bw", "AVX-512BW"),
    ("avx512vl", "AVX-512VL"),
    ("avx512_vnni", "AVX-512-VNNI"),
    ("avx512_bf16", "AVX-512-BF16"),
    ("amx_tile", "AMX-TILE"),
    ("amx_bf16", "AMX-BF16"),
    ("amx_int8", "AMX-INT8"),
)


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (Linux), else what Python and
    the native extension know."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model, flags = fields.get("model name", ""), set(fields.get("flags", "").split())
    if model and "cpu family" in fields:  # names a CPU whose model string is generic
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    if not flags:
        flags = {name for name, present in _native.cpu_features().items() if present}
    return model or platform.processor() or platform.machine(), flags


def threads() -> int:
    """Threads XLA:CPU runs a program's ops on: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe() -> str:
    """Lines naming the CPU, its vector extensions (AVX2, AVX-512, AMX), the thread count,
    jax, the native kernels and the expert kernel's GEMM library."""
    model, flags = _cpuinfo()
    extensions = [name for flag, name in _EXTENSIONS if flag in flags]
    if not any(flag.startswith("avx512") for flag in flags):
        extensions.append("no AVX-512")
    if not any(flag.startswith("amx") for flag in flags):
        extensions.append("no AMX")
    lines = [
        f"cpu: {model}, {os.cpu_count()} logical CPUs; vector extensions: " + ", ".join(extensions),
        f"threads: {threads()} (XLA:CPU intra-op pool); jax {jax.__version__} on "
        f"{jax.default_backend()}",
    ]
    if _native.LIMITS is None:
        lines.append("native kernels: not built (every path is the portable pure-JAX one)")
    else:
        library = _native.gemm_library()
        state = "on" if _native.available() else "off (SIGMOID_MOE_NATIVE=0)"
        rule = "native kernel" if _native_ffn.gemm_uses_widest_vectors() else "block scan"
        lines.append(
            f"native kernels: {state}; expert GEMMs: {library['config'].strip()}, kernels "
            f"'{library['core']}'; kernel='auto' runs the float32 experts with the {rule}"
        )
    return "\n".join(lines)


def kernels_in(hlo_text: str) -> str:
    """Which kernels a compiled (or lowered) program holds: the experts' and the router's."""
    if "sigmoid_moe_expert_ffn_fwd" in hlo_text:
        experts = "native expert kernel"
    elif "blocked_ffn" in hlo_text:
        experts = "block scan"
    else:
        experts = "XLA"
    if "sigmoid_moe_route_candidates" in hlo_text:
        router = "native route"
    elif "sigmoid_moe_top_k" in hlo_text:
        router = "native top-k"
    else:
        router = "portable top-k"
    return f"experts: {experts}, router: {router}"
