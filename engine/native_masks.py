"""``trainer.native_masks``: fast dropout's keep masks from a compiled counter-based generator.

With ``trainer.fast_dropout`` on, a mask costs the random words and the passes that turn their
16-bit lanes into 0/1 values: ~650 us for a 16 x 56 x 384 mask and ~950 us for the 16 x 12 x 56 x 56
attention weights on this project's 2-core CPU, because torch's CPU generator (mt19937) is serial
and each pass allocates and walks the whole tensor; a MiniLM bf16 training step of 16 x 56 tokens
makes 20 masks, 16.9 ms of its ~270 ms (timed inside the step). ``engine/native/keep_mask.c``
computes the lanes with Threefry-2x32-20 (the counter-based generator of Salmon et al., SC'11,
behind JAX's PRNG keys; vectorised over 64 blocks at a time) and writes the 0/1 mask in the mask's
dtype in the same pass: 110 / 190 us for those two masks alone, 5.4-7.1 ms for the step's 20
(~200 us a call in the library, ~70 us allocating the output and drawing the key). A mask's
chunks are split over torch's OpenMP threads (a lane depends only on its index, so the mask is the
same for any thread count): 73 -> 40 us and 124 -> 66 us alone on this project's later 2-core CPU.

The semantics are fast dropout's: element ``i`` is dropped when its 16-bit lane is below
``round(p * 65536)``, so exactly that many of the 65536 lane values drop. Each mask's 64-bit key is
one draw from torch's default CPU generator, so ``seed``, and resumed runs (which restore torch's
generator), reproduce every mask as before; the masks differ from the torch draws' masks.

The C file is compiled with the system C compiler (``$CC``, else ``cc``) on first use into
``~/.cache/engine/native`` (``$XDG_CACHE_HOME/engine/native`` where set), one library per source
and machine type, and checked against Threefry's published known-answer vectors when loaded.
``null`` falls back to torch's generator, with a warning, where no compiler is found.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineError

log = logging.getLogger("engine.native_masks")

SOURCE = Path(__file__).with_name("native") / "keep_mask.c"
FLAGS = ("-fopenmp",)  # a mask's chunks run on torch's OpenMP threads
# The 0/1 bit patterns the library writes, and their width, per mask dtype.
_ONE = {torch.bfloat16: (0x3F80, 16), torch.float16: (0x3C00, 16), torch.float32: (0x3F800000, 32)}
# Threefry-2x32-20 known answers (Random123's kat_vectors): (counter, key) -> output words.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
]

_library: ctypes.CDLL | None = None  # the active library; None: fast dropout draws through torch


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "engine" / "native"


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def build(
    directory: Path | None = None,
    source: Path = SOURCE,
    flags: tuple[str, ...] = FLAGS,
    setting: str = "trainer.native_masks",
) -> Path:
    """The compiled library for ``source`` (linked with ``flags``) and this machine, compiling it with
    :func:`compiler` if it is not cached yet; an :class:`EngineError` naming ``setting``, the
    compiler and its output if that fails."""
    cc = compiler()
    machine = platform.machine()
    headers = b"".join(header.read_bytes() for header in sorted(source.parent.glob("*.h")))  # what it may include
    tag = hashlib.sha256(source.read_bytes() + headers + machine.encode() + " ".join(flags).encode()).hexdigest()[:16]
    directory = Path(directory or cache_dir())
    target = directory / f"{source.stem}-{machine}-{tag}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / target.name
        command = [*cc, "-O3", "-fPIC", "-shared", "-o", str(partial), str(source), *flags]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EngineError(f"{setting}: could not run the C compiler {shlex.join(cc)}: {error}") from None
        if done.returncode != 0:
            raise EngineError(f"{setting}: {shlex.join(command)} failed ({done.returncode}):\n{done.stderr.strip()}")
        os.replace(partial, target)  # atomic: a half-written library is never loaded
    return target


def built_library(
    setting: bool | None, name: str, source: Path, flags: tuple[str, ...], load: Callable[[Path], Any], instead: str
) -> tuple[Path | None, Any]:
    """For an enabled ``name`` setting (true or null): ``source``'s library path and what ``load``
    made of it; where that fails (no compiler, a compile error, an unwritable cache, a library that
    will not load), an :class:`EngineError` under true and (None, None) with a warning saying what
    the run does ``instead`` under null."""
    try:
        path = build(source=source, flags=flags, setting=name)
        return path, load(path)
    except (EngineError, OSError) as error:  # OSError: an unwritable cache, a library that will not load
        if setting:
            if isinstance(error, EngineError):
                raise
            raise EngineError(f"{name}: {error}") from None
        log.warning("%s; %s (%s=false)", error, instead, name)
        return None, None


def eager_cpu_library(
    setting: bool | None, device: torch.device | str, compiled: bool, *args: Any
) -> tuple[Path | None, Any]:
    """:func:`built_library` (``*args``) for a kernel of the engine's eager CPU path: null means on for
    eager CPU runs (a compiled graph makes its own kernels; CUDA never takes that path), false off."""
    if setting is False or (setting is None and (torch.device(device).type != "cpu" or compiled)):
        return None, None
    return built_library(setting, *args)


def load(path: Path) -> ctypes.CDLL:
    """Load the library and check its generator against the known answers."""
    library = ctypes.CDLL(str(path))
    library.engine_keep_mask.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_uint64,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_int,
    ]
    library.engine_keep_mask.restype = None
    library.engine_threefry.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint64,
        ctypes.c_int64,
        ctypes.c_uint32,
        ctypes.c_uint32,
    ]
    library.engine_threefry.restype = None
    for counter, key, expected in KNOWN_ANSWERS:
        words = threefry(library, counter[0] | counter[1] << 32, 1, key)
        if tuple(words.tolist()) != expected:
            raise EngineError(f"trainer.native_masks: {path} fails Threefry's known answers: got {words.tolist()}")
    return library


def threefry(library: ctypes.CDLL, first: int, count: int, key: tuple[int, int]) -> torch.Tensor:
    """``count`` blocks of Threefry-2x32-20 from counter ``first`` under ``key`` as 32-bit words
    (an int64 tensor, two words a block)."""
    words = torch.zeros(2 * count, dtype=torch.int32)
    library.engine_threefry(words.data_ptr(), first, count, key[0], key[1])
    return words.to(torch.int64) & 0xFFFFFFFF


def use_native_masks(setting: bool | None, fast_dropout: bool) -> Path | None:
    """``trainer.native_masks``: make this process's fast-dropout masks come from the library
    (returned) or from torch's generator (None). null: the library where it builds."""
    global _library
    _library = None
    if setting is False or (setting is None and not fast_dropout):
        return None
    if not fast_dropout:
        raise EngineError("trainer.native_masks=true draws fast dropout's masks; trainer.fast_dropout is off")
    path, _library = built_library(
        setting, "trainer.native_masks", SOURCE, FLAGS, load, "fast dropout draws its masks through torch instead"
    )
    return path


def active() -> bool:
    return _library is not None


def supports(dtype: torch.dtype) -> bool:
    return dtype in _ONE


def keep_multiplier(shape: torch.Size | tuple[int, ...], dropped: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU ``dtype`` tensor of ``shape``: 0 where the element's lane is below ``dropped`` (of
    65536), else 1; the key is one draw from torch's default generator."""
    one, bits = _ONE[dtype]
    out = torch.empty(shape, dtype=dtype)
    _draw(out, out.numel(), dropped, one, bits)
    return out


def keep_bits(numel: int, dropped: int) -> torch.Tensor:
    """:func:`keep_multiplier`'s mask (the same draw: one key from torch's default generator) for
    ``numel`` elements as packed bits: bit ``i % 8`` of byte ``i // 8`` set where element ``i`` is kept.
    A uint8 tensor of ``numel / 8`` bytes rounded up, and 8 zero bytes past them (whole words may be read)."""
    out = torch.empty((numel + 7) // 8 + 8, dtype=torch.uint8)
    out[-8:] = 0
    _draw(out, numel, dropped, 0, 1)
    return out


def _draw(out: torch.Tensor, numel: int, dropped: int, one: int, bits: int) -> None:
    """One key from torch's default generator, then the library's mask of ``numel`` elements into ``out``
    (``bits`` 16 or 32: ``one``-valued elements; 1: packed bits): every mask form the same draw."""
    if _library is None:
        raise EngineError("native masks are not enabled (engine.native_masks.use_native_masks)")
    key = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) % 2**64
    _library.engine_keep_mask(out.data_ptr(), numel, key, dropped, one, bits, torch.get_num_threads())
