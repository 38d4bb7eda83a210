"""Storage formats, each described once: how a param's moments are stored (the ``state_dtype`` option: a
MomentFormat) and how its master weights are (the ``master_weights`` option: a MasterMode).

A description says what the optimizer, the state_dict checks, the step's checks, dispatch and the launchers need:
the option's value, the state keys, the storage dtypes, a per-block scale and its block size, the feature a backend
must list, the kernels' type names and mode numbers. They read these records instead of writing the facts again;
the arithmetic of a format stays in the kernels and in the torch backend's helpers (docs/storage-formats.md says
what a new format touches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch

from adam_gpu import quantization
from adam_gpu.kernel_abi import Master, cuda_constant_name

Record = TypeVar("Record")
# torch.optim's keys of a param's moments (amsgrad's max is always stored plain, under its own key).
PLAIN_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class StorageType:
    """A dtype the kernels store, and its name in each kernel: a CUDA C type, a ``triton.language`` dtype."""

    dtype: torch.dtype
    cuda: str
    triton: str


STORAGE_TYPES = (
    StorageType(torch.float32, "float", "float32"),
    StorageType(torch.float16, "__half", "float16"),
    StorageType(torch.bfloat16, "__nv_bfloat16", "bfloat16"),
    StorageType(torch.uint8, "unsigned char", "uint8"),  # the codes of 8-bit moments
)
# The param (and grad) dtypes the kernels update; math is fp32 whatever the storage.
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockScale:
    """A moment stored as codes plus one scale per ``block`` consecutive elements, under its own state keys (so that
    torch.optim, which would read codes as moments, fails loudly on such a state_dict)."""

    keys: tuple[str, str]  # the scales of exp_avg and exp_avg_sq
    block: int  # elements sharing one scale
    constant: str  # the name the kernels know ``block`` by (Triton: as is; CUDA C: kQuantBlock, say)
    min_numel: int  # tensors with fewer elements keep plain moments, in ``small_dtype``
    small_dtype: torch.dtype = torch.float32
    dtype: torch.dtype = torch.float32  # of the scales
    description: str = "an fp32 absmax"

    def blocks(self, numel: int) -> int:
        """Scales of a tensor of ``numel`` elements (the last block may be short)."""
        return -(-numel // self.block)


@dataclass(frozen=True)
class MomentFormat:
    """How exp_avg and exp_avg_sq are stored: ``option`` is the ``state_dtype`` value that asks for it; ``dtype``
    their storage dtype (None: the param's); ``keys`` the state keys they are stored under; ``scale`` their
    per-block scale, if they are codes; ``feature``, what a backend must list in its FEATURES to step them."""

    option: object
    name: str  # as messages say it: "8-bit" (moments, codes, optimizer state)
    dtype: torch.dtype | None
    keys: tuple[str, str] = PLAIN_KEYS[:2]
    scale: BlockScale | None = None
    feature: str | None = None
    amsgrad: bool = True  # whether it comes with amsgrad (max_exp_avg_sq, stored plain)

    @property
    def plain_dtype(self) -> torch.dtype | None:
        """The dtype of what it stores under PLAIN_KEYS (None: the param's): its moments, or for codes the max and
        the small tensors' moments."""
        return self.scale.small_dtype if self.scale is not None else self.dtype

    @property
    def option_text(self) -> str:
        if self.option is None:
            return "None (the param dtype)"
        return str(self.option) if isinstance(self.option, torch.dtype) else repr(self.option)

    def scaled(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s moments are stored as codes and scales (small tensors keep plain moments)."""
        return self.scale is not None and param.numel() >= self.scale.min_numel

    def new_moments(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """A param's zero exp_avg and exp_avg_sq, by state key (codes of 0 with scale 0 read as 0.0)."""
        if not self.scaled(param):
            return {key: self.new_plain(param) for key in PLAIN_KEYS[:2]}
        blocks, moments = self.scale.blocks(param.numel()), {}
        for key, scale_key in zip(self.keys, self.scale.keys, strict=True):
            moments[key] = torch.zeros(param.shape, dtype=self.dtype, device=param.device)
            moments[scale_key] = torch.zeros(blocks, dtype=self.scale.dtype, device=param.device)
        return moments

    def new_plain(self, param: torch.Tensor) -> torch.Tensor:
        """A zero moment stored plain (max_exp_avg_sq, or any moment of a plain format), laid out as the param."""
        return torch.zeros_like(param, dtype=self.plain_dtype or param.dtype, memory_format=torch.preserve_format)


EIGHT_BIT_SCALE = BlockScale(
    ("exp_avg_absmax", "exp_avg_sq_absmax"), quantization.BLOCK, "QUANT_BLOCK", quantization.SMALL_TENSOR
)
# 8-bit moments: uint8 codes of adam_gpu.quantization's maps, one fp32 absmax per block.
EIGHT_BIT_MOMENTS = MomentFormat(
    "8bit", "8-bit", torch.uint8, ("exp_avg_codes", "exp_avg_sq_codes"), EIGHT_BIT_SCALE, "8-bit moments", False
)
MOMENT_FORMATS = (
    MomentFormat(None, "param-dtype", None),
    MomentFormat(torch.float32, "fp32", torch.float32),
    MomentFormat(torch.bfloat16, "bf16", torch.bfloat16),
    EIGHT_BIT_MOMENTS,
)
SCALED_FORMATS = tuple(f for f in MOMENT_FORMATS if f.scale is not None)
# Every feature a moment format asks of a backend (a backend that steps every format lists them all).
MOMENT_FEATURES = frozenset(f.feature for f in MOMENT_FORMATS if f.feature)
# A chunk of this many elements holds whole blocks of every scaled format (launches of one step share a chunking).
SCALE_BLOCK = math.lcm(*(f.scale.block for f in SCALED_FORMATS))
# The dtypes moments may be stored in besides the param's.
MOMENT_DTYPES = frozenset(f.dtype for f in MOMENT_FORMATS if f.dtype is not None)
# The keys the moments and their scales are stored under, in any format.
MOMENT_STATE_KEYS = tuple(
    dict.fromkeys(k for f in MOMENT_FORMATS for k in (*f.keys, *(f.scale.keys if f.scale else ())))
)


def moment_format(option: object) -> MomentFormat:
    """The format ``state_dtype=option`` asks for; ValueError naming the values there are."""
    found = _lookup(_MOMENT_BY_OPTION, option)
    if found is not None:
        return found
    texts = [f.option_text for f in MOMENT_FORMATS]
    raise ValueError(f"state_dtype must be {', '.join(texts[:-1])} or {texts[-1]}, got {option!r}")


_MOMENT_BY_OPTION = {f.option: f for f in MOMENT_FORMATS}


def scaled_format(dtype: torch.dtype) -> MomentFormat | None:
    """The scaled format whose codes are stored as ``dtype`` (None: moments of that dtype are plain)."""
    return _SCALED_BY_DTYPE.get(dtype)


_SCALED_BY_DTYPE = {f.dtype: f for f in SCALED_FORMATS}


def moment_features(formats: Iterable[MomentFormat | None]) -> set[str]:
    """The features backends need for moments of these formats (None: plain moments, which need none)."""
    return {f.feature for f in formats if f is not None and f.feature}


def stored_moment(state: dict, moment: int) -> torch.Tensor | None:
    """Moment ``moment`` (0: exp_avg, 1: exp_avg_sq) of a param's state, under whichever format's key it has."""
    for key in _KEYS_OF[moment]:
        if key in state:
            return state[key]
    return None


def stored_scale(state: dict, moment: int) -> torch.Tensor | None:
    """The per-block scale of moment ``moment`` in a param's state (None: it is stored plain)."""
    for key in _SCALE_KEYS_OF[moment]:
        if key in state:
            return state[key]
    return None


_KEYS_OF = tuple(tuple(dict.fromkeys(f.keys[moment] for f in MOMENT_FORMATS)) for moment in (0, 1))
_SCALE_KEYS_OF = tuple(tuple(f.scale.keys[moment] for f in SCALED_FORMATS) for moment in (0, 1))


def has_moment(state: dict, moment: int) -> bool:
    return any(key in state for key in _KEYS_OF[moment])


def fp32_copy(param: torch.Tensor) -> torch.Tensor:
    return param.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def zero_remainder(param: torch.Tensor) -> torch.Tensor:
    # The bf16 param is the master's high half and the remainder starts at 0: they rebuild it exactly.
    # (zeros_like: a DTensor param gets a DTensor remainder, sharded like it.)
    return torch.zeros_like(param, dtype=torch.int16, memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class MasterMode:
    """Master weights as ``master_weights=option`` keeps them: under state key ``key`` in ``dtype``, for params of
    ``param_dtypes`` (the kernels' mode ``kernel``). ``splits_param``: the param holds the master's high bits and
    the master the rest (the pair is the value exactly; a re-seed zeroes the master), else the master is a copy
    the param is the rounding of (a re-seed copies the param)."""

    option: object
    kernel: Master
    key: str | None = None
    dtype: torch.dtype | None = None
    param_dtypes: tuple[torch.dtype, ...] = ()
    description: str = ""  # what a master tensor of this mode is, as messages say it
    create: Callable[[torch.Tensor], torch.Tensor] | None = None  # the master of a param at its first step
    splits_param: bool = False
    refusal: str = ""  # why a 16-bit param outside param_dtypes is refused, and what to use instead

    def holds(self, dtype: torch.dtype) -> bool:
        """Whether a param of ``dtype`` has a master in this mode."""
        return dtype in self.param_dtypes


NO_MASTER = MasterMode(False, Master.NO_MASTER)
MASTER_MODES = (
    NO_MASTER,
    MasterMode(
        True, Master.FP32_MASTER, "master_param", torch.float32, (torch.float16, torch.bfloat16),
        "a float32 copy", fp32_copy,
    ),
    MasterMode(
        "lean", Master.LEAN_MASTER, "master_remainder", torch.int16, (torch.bfloat16,), "an int16 remainder",
        zero_remainder, splits_param=True,
        refusal="rebuilds fp32 from a bf16 param's bits; use master_weights=True for float16 params",
    ),
)  # fmt: skip
STORED_MASTERS = tuple(m for m in MASTER_MODES if m.key is not None)
MASTER_KEYS = tuple(m.key for m in STORED_MASTERS)
# Params that can have a master: a torch.optim optimizer casts a saved master to such a param's dtype.
MASTERED_DTYPES = tuple(dict.fromkeys(d for m in MASTER_MODES for d in m.param_dtypes))
_MASTER_BY_DTYPE = {m.dtype: m for m in MASTER_MODES}  # (None: no master)


def master_option(option: object) -> MasterMode:
    """The mode ``master_weights=option`` asks for (as ``in`` would find it: 1 is True); ValueError naming the
    values there are."""
    found = _lookup(_MASTER_BY_OPTION, option)
    if found is not None:
        return found
    texts = [repr(m.option) for m in MASTER_MODES]
    raise ValueError(f"master_weights must be {', '.join(texts[:-1])} or {texts[-1]}, got {option!r}")


_MASTER_BY_OPTION = {m.option: m for m in MASTER_MODES}


def _lookup(by_option: dict[object, Record], option: object) -> Record | None:
    """The record of ``option`` (as ``option in options`` finds it, by identity or equality), or None."""
    try:
        return by_option.get(option)  # (a dict finds a hashable option by hash and equality: 1 is True)
    except TypeError:  # unhashable: compare with each
        return next((record for key, record in by_option.items() if option is key or option == key), None)


def master_of(dtype: torch.dtype | None) -> MasterMode | None:
    """The mode whose masters are stored as ``dtype`` (``dtype`` None, no master: NO_MASTER); None for a dtype no
    mode stores."""
    return _MASTER_BY_DTYPE.get(dtype)


def master_modes_of(param_dtype: torch.dtype) -> tuple[MasterMode, ...]:
    """The modes a param of ``param_dtype`` can be stepped in (NO_MASTER first)."""
    return tuple(m for m in MASTER_MODES if m is NO_MASTER or m.holds(param_dtype))


def cuda_definitions() -> str:
    """The C++ constants of the formats, for kernels/adam_cuda.cu (after kernel_abi's): each scaled format's block
    size, by its ``constant`` name (``kQuantBlock``)."""
    constants = [f"constexpr int {cuda_constant_name(f.scale.constant)} = {f.scale.block};" for f in SCALED_FORMATS]
    return "\n".join(["// Generated by adam_gpu/storage_formats.py (cuda_definitions).", "namespace adam_gpu {",
                      *constants, "}  // namespace adam_gpu", ""])  # fmt: skip
