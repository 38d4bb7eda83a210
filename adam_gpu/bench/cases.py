"""What the benchmark steps: flat tensors, real models' parameter lists (from their published shapes;
nothing is downloaded), many small tensors; and the precision policies they are stored in."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from adam_gpu.storage_formats import master_option, moment_format

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Policy:
    """How params and moments are stored: ``state_dtype`` None keeps moments in the param dtype;
    ``master_weights`` as FusedAdamW takes it (True: an fp32 copy; "lean": a 16-bit remainder)."""

    name: str
    param_dtype: torch.dtype
    state_dtype: torch.dtype | str | None  # "8bit": block-wise quantized moments
    master_weights: bool | str = False

    @property
    def moment_dtype(self) -> torch.dtype:
        return moment_format(self.state_dtype).dtype or self.param_dtype

    @property
    def moment_bytes(self) -> float:
        """Stored bytes per moment per parameter: 8-bit codes carry an fp32 absmax per 256 elements."""
        scale = moment_format(self.state_dtype).scale
        return self.moment_dtype.itemsize + (scale.dtype.itemsize / scale.block if scale else 0)

    @property
    def master_bytes(self) -> int:
        """Stored bytes of a parameter's master (0: none)."""
        mode = master_option(self.master_weights)
        return mode.dtype.itemsize if mode.holds(self.param_dtype) else 0

    def bytes_per_param(self, amsgrad: bool = False) -> float:
        """Bytes one Adam step must move per parameter: the param (or its master) read and written, the
        grad read, each moment read and written. fp32: 28; bf16 with bf16 moments: 14; bf16 with fp32
        moments: 22; fp32 with bf16 moments: 20; bf16 with fp32 moments and an fp32 master (read and
        written; the param only written): 28; with the lean master instead (param and 2-byte remainder
        read and written): 26; bf16 with 8-bit moments: about 10."""
        param, master = self.param_dtype.itemsize, self.master_bytes
        moments = 2 * self.moment_bytes * (3 if amsgrad else 2)
        if master and not master_option(self.master_weights).splits_param:
            param_traffic = 2 * master + param  # (the master is the value: the param is only written)
        else:
            param_traffic = 2 * param + 2 * master
        return param_traffic + param + moments

    def resident_bytes_per_param(self) -> float:
        """Bytes per parameter held in memory while stepping (not moved): param, grad, both moments and any
        master. fp32: 16; bf16 with fp32 moments: 12; with an fp32 master too: 16."""
        return 2 * self.param_dtype.itemsize + 2 * self.moment_bytes + self.master_bytes


POLICIES = {
    policy.name: policy
    for policy in (
        Policy("fp32", torch.float32, None),
        Policy("bf16", torch.bfloat16, None),
        Policy("bf16+fp32-moments", torch.bfloat16, torch.float32),
        Policy("fp32+bf16-moments", torch.float32, torch.bfloat16),
        Policy("bf16+8bit-moments", torch.bfloat16, "8bit"),
        Policy("bf16+fp32-moments+fp32-master", torch.bfloat16, torch.float32, True),
        Policy("bf16+fp32-moments+lean-master", torch.bfloat16, torch.float32, "lean"),
    )
}


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[Shape, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


def flat(log2_numel: int) -> Case:
    return Case(f"flat 2^{log2_numel}", ((2**log2_numel,),))


def many_small(count: int = 1000, numel: int = 4096) -> Case:
    return Case(f"{count}x{numel}", ((numel,),) * count)


def gpt2_124m() -> Case:
    """GPT-2 small as in the published checkpoint: 148 tensors, 124,439,808 parameters (tied head)."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return Case("gpt2-124m", ((vocab, d), (context, d), *block * layers, (d,), (d,)))


def llama_3_2_1b() -> Case:
    """Llama-3.2-1B's published configuration (hidden 2048, 16 layers, 32 query and 8 key/value heads of
    64, MLP 8192, vocabulary 128256, tied embeddings): 146 tensors, 1,235,814,400 parameters."""
    d, kv, mlp, vocab, layers = 2048, 8 * 64, 8192, 128256, 16
    block = [(d, d), (kv, d), (kv, d), (d, d), (mlp, d), (mlp, d), (d, mlp), (d,), (d,)]
    return Case("llama-3.2-1b", ((vocab, d), *block * layers, (d,)))


def resnet_50() -> Case:
    """torchvision's ResNet-50 (bottleneck blocks 3, 4, 6, 3): 161 tensors, 25,557,032 parameters."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(4 * width, channels, 1, 1), (4 * width,), (4 * width,)]
            channels = 4 * width
    shapes += [(1000, 2048), (1000,)]
    return Case("resnet-50", tuple(shapes))


def model_cases() -> list[Case]:
    return [gpt2_124m(), llama_3_2_1b(), resnet_50(), many_small()]


# A CPU run's default plan, about 3 minutes on 2 cores (benchmarks/README.md, "Running on a CPU"): the model
# lists a CPU steps in well under a second, and flat tensors up to 2^24 elements (a 2^24 fp32 step moves 470 MB).
CPU_MODELS = ("resnet-50", "1000x4096")
CPU_FLAT_LOG2 = (24, 20, 16, 12)


def plan(
    quick: bool,
    device_type: str,
    only: Collection[str] | None = None,
    policies: Collection[str] | None = None,
    full: bool = True,
) -> list[tuple[Case, Policy]]:
    """The (case, policy) pairs of a run. Flat tensors in fp32 and bf16, 2^12 to 2^30 elements (the
    runner drops what does not fit in memory); every model list in every policy (the master-weight
    policies, which only adam-gpu offers, for the model lists). ``quick`` keeps a
    few small cases, for a check that the whole pipeline works (seconds on a CPU). On the CPU, ``full`` False
    (what `adam-gpu bench` runs there by default) keeps CPU_MODELS and CPU_FLAT_LOG2, unless ``only`` names
    cases; the full CPU plan leaves Llama out.

    Ordered by what the targets are read from, so that a run stopped by its time limit keeps them: fp32 on
    every case first (model lists, then flat tensors from the largest down), then bf16, then the other
    policies on the model lists, the 8-bit one first. ``only``: these case names alone (of the full plan);
    ``policies``: these policy names alone (a rerun of some pairs)."""
    if quick:
        flats = [flat(n) for n in (12, 16, 20)]
        models = [many_small(100, 4096)]
    elif device_type == "cpu" and not full and only is None:
        flats = [flat(n) for n in CPU_FLAT_LOG2]
        models = [case for case in model_cases() if case.name in CPU_MODELS]
    else:
        flats = [flat(n) for n in range(30, 11, -2)]
        models = model_cases()
        if device_type == "cpu":  # a CPU step of Llama's 1.2B parameters takes seconds: leave it out
            models = [case for case in models if case.name != "llama-3.2-1b"]
    pairs = [(case, POLICIES[name]) for name in ("fp32", "bf16") for case in (*models, *flats)]
    others = sorted(set(POLICIES) - {"fp32", "bf16"}, key=lambda name: (name != "bf16+8bit-moments", name))
    pairs += [(case, POLICIES[name]) for name in others for case in models]
    for kind, names, name_of in (
        ("case", only, lambda pair: pair[0].name),
        ("policy", policies, lambda pair: pair[1].name),
    ):
        if names is None:
            continue
        known = list(dict.fromkeys(map(name_of, pairs)))
        unknown = set(names) - set(known)
        if unknown:
            raise ValueError(
                f"unknown {kind} {', '.join(sorted(unknown))}: the {kind} names of this plan are {', '.join(known)}"
            )
        pairs = [pair for pair in pairs if name_of(pair) in names]
    return pairs
