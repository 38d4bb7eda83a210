"""Real-training parity: FusedAdamW against torch.optim.AdamW in a complete training loop.

An MLP (64-64-10) learns scikit-learn's digits (1,797 8x8 images, shipped with the package: nothing is
downloaded) in shuffled minibatches of 64, with a OneCycleLR schedule (which also cycles beta1),
gradient clipping and, in the AMP variants, fp16 autocast with ``torch.amp.GradScaler``. The same seed
gives both optimizers the same initial weights and the same batch order, so their per-step loss curves
should agree to float rounding. Variants (``--variant``):

- ``fp32``: ``clip_grad_norm_`` before either optimizer's step.
- ``fp32-fused-clip``: FusedAdamW clips inside its step (``max_grad_norm=``); torch.optim.AdamW after
  ``clip_grad_norm_``.
- ``amp``: fp16 autocast, GradScaler on the host path (it unscales, checks for inf and skips the step
  itself), ``scaler.unscale_`` then ``clip_grad_norm_`` for both optimizers.
- ``amp-capturable``: FusedAdamW with ``capturable=True`` and ``max_grad_norm=``: GradScaler hands it the
  scale and found_inf, and the kernel unscales, clips and skips on the device.

The AMP variants start from a scale of 2**32, so the first backward passes overflow in fp16 and
GradScaler skips those steps while halving the scale; an inf is also written into one grad at
``INJECTED_INF_STEP``. Both optimizers must skip the same steps and keep the same scale.

Run ``python examples/train_parity.py --variant amp --backend torch`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from adam_gpu import FusedAdamW

BATCH = 64
HIDDEN = 64
MAX_LR = 1e-2  # OneCycleLR's peak; the run starts and ends 25x and 1e4x below it (torch's defaults)
WEIGHT_DECAY = 0.01
# clip_grad_norm_'s bound: the digits MLP's gradient norm stays between 0.2 and 1.0 in a 100-step run
# (median 0.45), so about 40 % of the steps clip (TrainingRun.clipped_steps counts them).
MAX_GRAD_NORM = 0.5
INIT_SCALE = 2.0**24  # logit grads (~1/BATCH) times 2**24 overflow fp16 (max 65504): the first steps skip
INJECTED_INF_STEP = 20  # AMP variants: one grad element set to inf after this step's backward


@dataclass(frozen=True)
class Variant:
    """How a run trains: AMP or fp32, and how FusedAdamW clips and meets GradScaler."""

    amp: bool
    fused_clip: bool  # FusedAdamW clips with max_grad_norm= instead of clip_grad_norm_
    capturable: bool


VARIANTS = {
    "fp32": Variant(amp=False, fused_clip=False, capturable=False),
    "fp32-fused-clip": Variant(amp=False, fused_clip=True, capturable=False),
    "amp": Variant(amp=True, fused_clip=False, capturable=False),
    "amp-capturable": Variant(amp=True, fused_clip=True, capturable=True),
}


@dataclass
class TrainingRun:
    """One optimizer's run: the minibatch loss before each step, GradScaler's scale after each step
    (1.0 without AMP), the steps GradScaler skipped and the steps clip_grad_norm_ clipped."""

    losses: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    clipped_steps: list[int] = field(default_factory=list)


def digits(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: inputs scaled to [0, 1] (float32, [1797, 64]) and labels (int64, [1797])."""
    from sklearn.datasets import load_digits  # the test extra; imported late so --help works without it

    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32, device=device), torch.tensor(labels, device=device)


def minibatches(count: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Index tensors of ``steps`` minibatches of ``batch`` out of ``count`` examples: a fresh seeded
    permutation each epoch, the incomplete last batch of an epoch dropped (every step sees ``batch``)."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = count // batch
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(count, generator=generator)
        yield order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]


def mlp(inputs: int, outputs: int, seed: int, hidden: int = HIDDEN) -> torch.nn.Sequential:
    """A one-hidden-layer ReLU MLP with torch's default initialization drawn from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs))


OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def train(make_optimizer: OptimizerFactory, variant: Variant, steps: int, seed: int, clip: bool) -> TrainingRun:
    """Train the digits MLP for ``steps`` minibatch steps; ``clip``: call clip_grad_norm_ before each step."""
    inputs, labels = digits()
    model = mlp(inputs.shape[1], 10, seed)
    optimizer = make_optimizer(list(model.parameters()))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=MAX_LR, total_steps=steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=variant.amp)
    run = TrainingRun()
    for step, batch in enumerate(minibatches(len(labels), BATCH, steps, seed)):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=variant.amp):
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        run.losses.append(loss.item())
        scaler.scale(loss).backward()
        if variant.amp and step == INJECTED_INF_STEP:
            model[0].weight.grad[0, 0] = float("inf")
        if clip:
            scaler.unscale_(optimizer)  # (a no-op without AMP)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            if float(norm) > MAX_GRAD_NORM:
                run.clipped_steps.append(step)
        scale = scaler.get_scale()  # (1.0 when GradScaler is disabled)
        scaler.step(optimizer)
        scaler.update()
        run.scales.append(scaler.get_scale())
        if run.scales[-1] < scale:  # GradScaler lowers the scale exactly when it skipped the step
            run.skipped_steps.append(step)
        with warnings.catch_warnings():
            # After a skipped first step torch warns that the scheduler stepped before the optimizer:
            # expected with GradScaler (torch's AMP recipe steps the schedule regardless).
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            scheduler.step()
    return run


def torch_adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """torch.optim.AdamW's for-loop implementation: the reference."""
    return torch.optim.AdamW(params, lr=MAX_LR, weight_decay=WEIGHT_DECAY, foreach=False)


def fused_adamw(backend: str, variant: Variant) -> OptimizerFactory:
    """FusedAdamW as ``variant`` configures it (capturable: lr as a tensor the scheduler fills in place)."""

    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return FusedAdamW(
            params,
            lr=torch.tensor(MAX_LR) if variant.capturable else MAX_LR,
            weight_decay=WEIGHT_DECAY,
            capturable=variant.capturable,
            max_grad_norm=MAX_GRAD_NORM if variant.fused_clip else None,
            backend=backend,
        )

    return make


@dataclass
class Parity:
    """Both runs and how far apart their loss curves are (max over steps of |ours - torch| / |torch|)."""

    variant: str
    backend: str
    reference: TrainingRun  # torch.optim.AdamW's
    fused: TrainingRun
    max_relative_difference: float


def max_relative_difference(ours: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(ours, reference, strict=True))


def compare(variant_name: str, backend: str = "auto", steps: int = 100, seed: int = 0) -> Parity:
    """Train with torch.optim.AdamW and with FusedAdamW on ``backend`` (same seed, same batches)."""
    variant = VARIANTS[variant_name]
    reference = train(torch_adamw, variant, steps, seed, clip=True)
    fused = train(fused_adamw(backend, variant), variant, steps, seed, clip=not variant.fused_clip)
    return Parity(variant_name, backend, reference, fused, max_relative_difference(fused.losses, reference.losses))


def main(argv: list[str] | None = None) -> list[Parity]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--backend", default="auto", help="FusedAdamW's backend (default: auto)")
    parser.add_argument("--steps", type=int, default=100, help="minibatch steps (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch order (default: 0)")
    parser.add_argument("--json", action="store_true", help="print every curve as JSON instead of a summary")
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.variant == "all" else [args.variant]
    results = [compare(name, args.backend, args.steps, args.seed) for name in names]
    if args.json:
        print(json.dumps([asdict(result) for result in results], indent=1))
    for result in results if not args.json else []:
        losses = result.reference.losses
        print(
            f"{result.variant:16} loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
            f"max relative difference {result.max_relative_difference:.2e}  "
            f"skipped {result.fused.skipped_steps} (torch {result.reference.skipped_steps})  "
            f"clipped {len(result.reference.clipped_steps)}/{len(losses)}"
        )
    return results


if __name__ == "__main__":
    main()
