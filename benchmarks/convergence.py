"""Does Adam converge faster? SGD, SGD with momentum, RMSprop and adam-gpu's Adam on two real tasks.

Kingma & Ba (2015, figures 1 and 2) compare optimizers on logistic regression and MLPs trained on MNIST.
This runs the same two kinds of model on data that scikit-learn ships (nothing is downloaded):

- ``digits-mlp``: a 64-64-10 ReLU MLP, cross-entropy, on the 1,797 8x8 digits (pixels scaled to [0, 1]),
  minibatches of 64;
- ``breast-cancer-logistic``: logistic regression on the 569 breast-cancer cases (30 features, each
  standardized to mean 0 and variance 1), minibatches of 32.

Every optimizer trains every task from the same initial weights and batch order per seed, with torch's
default settings apart from the learning rate (momentum 0.9; RMSprop alpha 0.99; Adam betas 0.9, 0.999,
eps 1e-8; no weight decay), at each learning rate of a half-decade grid. The loss plotted and tabled is
the loss on the whole training set (what the optimizer minimizes), every ``EVAL_EVERY`` steps.

Fairness: each optimizer gets its own best learning rate, the one with the lowest mean training loss
over the whole run (the area under the curve, averaged over seeds), so neither early speed nor the final
value alone picks it; a learning rate at which any seed diverged (a non-finite loss) is not eligible.
Two targets per task, each for "steps to reach it": the common target, the highest final loss among the
optimizers at their best rates (every mean curve reaches it: the steps rank how fast), and the near-best
target, 1.5x the lowest final loss of any optimizer.

Writes ``convergence.json`` (every curve), ``convergence.md`` (tables) and ``convergence.png``,
``lr_sweep.png`` (plots), all drawn from the JSON (``--report convergence.json`` redraws them).
Full run: about a minute on one CPU core (53 s here); ``--quick``: seconds. Each run writes a new folder under
bench-results/ unless told ``--out``; ``--refresh`` rewrites the committed results that
docs/optimizer-comparison.md shows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adam_gpu import FusedAdam
from adam_gpu.bench.command import output_folder

# Half-decades from 1e-4 to 10: wide enough that every optimizer's best rate lies inside (checked: the
# Markdown marks a best rate at either end of the grid).
LR_GRID = [round(10.0**exponent * mantissa, 10) for exponent in range(-4, 1) for mantissa in (1, 3)] + [10.0]
SEEDS = [0, 1, 2]
STEPS = 300  # digits: 10.7 epochs of 28 batches; breast cancer: 17 epochs of 17 batches
EVAL_EVERY = 5  # steps between evaluations of the full training loss: the resolution of "steps to target"
EARLY_FRACTION = 0.1  # "early" loss: after 10 % of the steps
TARGET_FACTOR = 1.5  # the near-best target: 1.5x the lowest final loss of any optimizer at its best rate
QUICK = dict(seeds=[0], lrs=[1e-3, 1e-2, 1e-1], steps=40)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "convergence"
STEM = "convergence"
ADAM = "Adam (adam-gpu)"


# --- tasks ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A data set, a model and a loss: ``load`` gives (inputs, targets); ``model()`` a fresh model, its
    initial weights drawn from torch's global generator (``train`` seeds it)."""

    name: str
    description: str
    batch: int
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    model: Callable[[], torch.nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)


def _breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    inputs = torch.tensor(features, dtype=torch.float32)
    # Raw features span 1e-3 to 4e3: unscaled, plain SGD would need a different rate per feature.
    inputs = (inputs - inputs.mean(0)) / inputs.std(0)
    return inputs, torch.tensor(labels, dtype=torch.float32).unsqueeze(1)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


TASKS = {
    task.name: task
    for task in (
        Task("digits-mlp", "digits, 64-64-10 MLP", 64, _digits, _mlp, torch.nn.functional.cross_entropy),
        Task(
            "breast-cancer-logistic",
            "breast cancer, logistic regression",
            32,
            _breast_cancer,
            lambda: torch.nn.Linear(30, 1),
            torch.nn.functional.binary_cross_entropy_with_logits,
        ),
    )
}

# --- optimizers ----------------------------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer]] = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "SGD + momentum 0.9": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "RMSprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    ADAM: lambda params, lr: FusedAdam(params, lr=lr, backend="auto"),
}

# --- training ------------------------------------------------------------------------------------------------


def batch_order(count: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch] example indices: a seeded permutation per epoch, each epoch's incomplete batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = count // batch
    epochs = -(-steps // per_epoch)
    orders = [torch.randperm(count, generator=generator)[: per_epoch * batch] for _ in range(epochs)]
    return torch.cat(orders).view(-1, batch)[:steps]


def train(
    task: Task, data: tuple[torch.Tensor, torch.Tensor], optimizer: str, lr: float, seed: int, steps: int
) -> tuple[list[float], str | None]:
    """The full training loss at steps 0, EVAL_EVERY, 2 EVAL_EVERY, ... ``steps``; the list stops at the first
    non-finite loss (a diverged run). Returns (losses, the backend FusedAdam ran, or None)."""
    inputs, targets = data
    torch.manual_seed(seed)
    model = task.model()
    opt = OPTIMIZERS[optimizer](list(model.parameters()), lr)

    def full_loss() -> float:
        with torch.no_grad():
            return task.loss(model(inputs), targets).item()

    losses = [full_loss()]
    for step, batch in enumerate(batch_order(len(targets), task.batch, steps, seed), start=1):
        opt.zero_grad(set_to_none=True)
        task.loss(model(inputs[batch]), targets[batch]).backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            losses.append(full_loss())
            if not math.isfinite(losses[-1]):
                break
    return losses, (getattr(opt, "selected_backends", None) or [None])[0]


def run(seeds: list[int], lrs: list[float], steps: int) -> dict[str, Any]:
    """Every task x optimizer x learning rate x seed: the JSON document (``meta`` and ``runs``)."""
    runs, backends = [], set()
    for task in TASKS.values():
        data = task.load()
        for optimizer in OPTIMIZERS:
            for lr in lrs:
                for seed in seeds:
                    losses, backend = train(task, data, optimizer, lr, seed, steps)
                    if backend is not None:
                        backends.add(backend)
                    diverged = not math.isfinite(losses[-1])
                    if diverged:  # JSON has no inf or NaN: the curve ends at its last finite loss
                        losses = losses[:-1]
                    # 5 significant digits: the seeds differ in the second; keeps the JSON near 170 kB.
                    losses = [float(f"{loss:.5g}") for loss in losses]
                    record = dict(task=task.name, optimizer=optimizer, lr=lr, seed=seed, losses=losses)
                    runs.append(record | dict(diverged=diverged))
    meta = dict(
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        adam_gpu_backend=sorted(backends),
        steps=steps,
        eval_every=EVAL_EVERY,
        seeds=seeds,
        lrs=lrs,
        tasks={task.name: task.description for task in TASKS.values()},
        optimizers=list(OPTIMIZERS),
        early_fraction=EARLY_FRACTION,
        target_factor=TARGET_FACTOR,
    )
    return dict(meta=meta, runs=runs)


# --- summary (from the JSON only) ----------------------------------------------------------------------------


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*curves, strict=True)]


def sweep(document: dict[str, Any]) -> dict[tuple[str, str, float], dict[str, Any]]:
    """(task, optimizer, lr) -> the seeds' curves, their mean curve, mean final and mean (area) loss;
    the means are None where a seed diverged."""
    grouped: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for record in document["runs"]:
        grouped.setdefault((record["task"], record["optimizer"], record["lr"]), []).append(record)
    result = {}
    for key, records in grouped.items():
        curves = [record["losses"] for record in records]
        diverged = any(record["diverged"] for record in records)
        mean = None if diverged else _mean_curve(curves)
        result[key] = dict(
            curves=curves,
            mean_curve=mean,
            final=None if diverged else mean[-1],
            area=None if diverged else statistics.fmean(mean),
        )
    return result


def steps_to(curve: list[float], target: float, eval_every: int) -> int | None:
    """The first evaluated step at which ``curve`` is at or below ``target``; None if never."""
    return next((index * eval_every for index, loss in enumerate(curve) if loss <= target), None)


def early_step(meta: dict[str, Any]) -> int:
    """The evaluated step nearest to ``early_fraction`` of the run."""
    return round(meta["early_fraction"] * meta["steps"] / meta["eval_every"]) * meta["eval_every"]


def summarize(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: the targets (by name) and, per optimizer at its best learning rate, the numbers of the table."""
    meta, swept = document["meta"], sweep(document)
    early_index = early_step(meta) // meta["eval_every"]
    summary = {}
    for task in meta["tasks"]:
        best = {}
        for optimizer in meta["optimizers"]:
            eligible = [lr for lr in meta["lrs"] if swept[task, optimizer, lr]["area"] is not None]
            lr = min(eligible, key=lambda lr: swept[task, optimizer, lr]["area"]) if eligible else None
            best[optimizer] = (lr, swept[task, optimizer, lr] if lr is not None else None)
        finals = [entry["final"] for _, entry in best.values() if entry is not None]
        targets = {
            "common": max(finals, default=math.inf),
            "near-best": meta["target_factor"] * min(finals, default=math.inf),
        }
        rows = {}
        for optimizer, (lr, entry) in best.items():
            if entry is None:
                rows[optimizer] = dict(lr=None)
                continue
            seed_steps = {
                name: [steps_to(curve, target, meta["eval_every"]) for curve in entry["curves"]]
                for name, target in targets.items()
            }
            rows[optimizer] = dict(
                lr=lr,
                lr_at_grid_edge=lr in (meta["lrs"][0], meta["lrs"][-1]),
                early=[curve[early_index] for curve in entry["curves"]],
                final=[curve[-1] for curve in entry["curves"]],
                steps_to_target=seed_steps,
                mean_curve=entry["mean_curve"],
                curves=entry["curves"],
            )
        summary[task] = dict(targets=targets, rows=rows)
    return summary


# --- report --------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    """Mean ± standard deviation over seeds, 3 significant digits (just the mean for one seed)."""
    mean = f"{statistics.fmean(values):#.3g}".rstrip(".")  # "#" keeps the zeros of "2.00"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.2g}"


def _steps_cell(steps: list[int | None]) -> str:
    """Mean (range) over seeds; "(k/n seeds)" when only k seeds reached the target; "not reached" if none."""
    reached = [value for value in steps if value is not None]
    if not reached:
        return "not reached"
    mean = f"{statistics.fmean(reached):.0f}"
    if len(reached) < len(steps):
        return f"{mean} ({len(reached)}/{len(steps)} seeds)"
    return mean if len(set(reached)) == 1 else f"{mean} ({min(reached)}–{max(reached)})"


def summary_table(document: dict[str, Any]) -> str:
    """The Markdown table: per task and optimizer, best lr, early loss, steps to each target, final loss."""
    meta = document["meta"]
    lines = [
        f"| task | optimizer | best lr | loss at step {early_step(meta)} "
        f"| steps to common target | steps to near-best target | final loss (step {meta['steps']}) |",
        "| :--- | :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task, entry in summarize(document).items():
        for optimizer, row in entry["rows"].items():
            if row["lr"] is None:
                lines.append(f"| {task} | {optimizer} | every rate diverged | | | | |")
                continue
            lr = f"{row['lr']:g}" + (" (grid edge)" if row["lr_at_grid_edge"] else "")
            cells = [task, optimizer, lr, _spread(row["early"])]
            cells += [_steps_cell(steps) for steps in row["steps_to_target"].values()]
            lines.append("| " + " | ".join([*cells, _spread(row["final"])]) + " |")
    return "\n".join(lines)


def targets_line(document: dict[str, Any]) -> str:
    """Each task's targets, e.g. "digits-mlp: common 0.05, near-best 0.019"."""
    return "; ".join(
        f"{task}: " + ", ".join(f"{name} {value:.3g}" for name, value in entry["targets"].items())
        for task, entry in summarize(document).items()
    )


def sweep_table(document: dict[str, Any]) -> str:
    """Final loss (mean over seeds) at every learning rate, per task and optimizer; "diverged" where a seed did."""
    meta, swept = document["meta"], sweep(document)
    header = "| task | lr | " + " | ".join(meta["optimizers"]) + " |"
    lines = [header, "| :--- | ---: |" + " ---: |" * len(meta["optimizers"])]
    for task in meta["tasks"]:
        for lr in meta["lrs"]:
            finals = [swept[task, optimizer, lr]["final"] for optimizer in meta["optimizers"]]
            cells = ["diverged" if final is None else f"{final:.3g}" for final in finals]
            lines.append(f"| {task} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    seeds = len(meta["seeds"])
    return "\n".join(
        [
            "# Optimizer comparison on two real tasks",
            "",
            f"{meta['date']}, torch {meta['torch']}, adam-gpu backend {', '.join(meta['adam_gpu_backend'])}; "
            f"{meta['steps']} minibatch steps, {seeds} seed(s), loss on the whole training set every "
            f"{meta['eval_every']} steps. Mean ± standard deviation over seeds. Best lr: lowest mean training "
            "loss over the run (area under the curve) among the rates where no seed diverged. Targets: "
            "common, the highest final loss among the optimizers at their best rates (every mean curve reaches it); "
            f"near-best, {meta['target_factor']}x the lowest final loss of any optimizer ({targets_line(document)}). "
            "Steps to a target: mean (range) over seeds, at the resolution of the evaluations.",
            "",
            summary_table(document),
            "",
            "## Final loss at every learning rate",
            "",
            sweep_table(document),
            "",
            f"![loss vs step]({STEM}.png)",
            "",
            "![learning-rate sweep](lr_sweep.png)",
            "",
        ]
    )


def plot(document: dict[str, Any], directory: Path) -> list[Path]:
    """convergence.png (mean loss vs step at each optimizer's best lr, seed range shaded, targets dashed)
    and lr_sweep.png (final loss vs lr). matplotlib is imported here only."""
    from matplotlib.figure import Figure

    meta, summary, swept = document["meta"], summarize(document), sweep(document)
    curves, lr_sweep = Figure(figsize=(11, 4.2)), Figure(figsize=(11, 4.2))
    for index, (task, entry) in enumerate(summary.items()):
        axes = curves.add_subplot(1, len(summary), index + 1)
        for optimizer, row in entry["rows"].items():
            if row["lr"] is None:
                continue
            steps = [i * meta["eval_every"] for i in range(len(row["mean_curve"]))]
            (line,) = axes.plot(steps, row["mean_curve"], label=f"{optimizer}, lr {row['lr']:g}")
            low, high = (list(map(bound, zip(*row["curves"], strict=True))) for bound in (min, max))
            axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        for (name, target), style in zip(entry["targets"].items(), ("--", ":"), strict=True):
            axes.axhline(target, color="grey", linestyle=style, linewidth=0.8, label=f"{name} target")
        axes.set(yscale="log", xlabel="step", ylabel="training loss", title=meta["tasks"][task])
        axes.legend(fontsize=8)
        axes = lr_sweep.add_subplot(1, len(summary), index + 1)
        for optimizer in meta["optimizers"]:
            points = [(lr, swept[task, optimizer, lr]["final"]) for lr in meta["lrs"]]
            points = [(lr, final) for lr, final in points if final is not None]
            width = 2.5 if optimizer == ADAM else 1.2
            axes.plot(*zip(*points, strict=True), marker="o", linewidth=width, label=optimizer)
        axes.set(xscale="log", yscale="log", xlabel="learning rate", ylabel=f"final loss (step {meta['steps']})")
        axes.set_title(f"{meta['tasks'][task]} (diverged rates left out)")
        axes.legend(fontsize=8)
    paths = [directory / f"{STEM}.png", directory / "lr_sweep.png"]
    for figure, path in zip((curves, lr_sweep), paths, strict=True):
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    return paths


def write_reports(document: dict[str, Any], directory: Path) -> list[Path]:
    """The Markdown and both plots next to each other in ``directory``."""
    (directory / f"{STEM}.md").write_text(markdown(document))
    return [directory / f"{STEM}.md", *plot(document, directory)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default: a new bench-results/convergence-<date>[-N])")
    parser.add_argument(
        "--refresh",
        action="store_true",
        help=f"rewrite the committed results docs/optimizer-comparison.md shows ({DEFAULT_OUT})",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 learning rates, 40 steps: seconds")
    parser.add_argument("--report", type=Path, help="redraw the table and plots from this JSON, train nothing")
    args = parser.parse_args(argv)
    if args.report:
        document = json.loads(args.report.read_text())
        args.out = args.report.parent
    elif args.refresh:
        args.out = DEFAULT_OUT
    elif args.out is None:
        args.out = output_folder(None, False, f"convergence-{datetime.date.today()}")
    else:
        settings = QUICK if args.quick else dict(seeds=SEEDS, lrs=LR_GRID, steps=STEPS)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # models this small only lose time to a second thread (and vary with it)
        try:
            document = run(**settings)
        finally:
            torch.set_num_threads(threads)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{STEM}.json").write_text(json.dumps(document, indent=0))
    write_reports(document, args.out)
    print(summary_table(document))
    return document


if __name__ == "__main__":
    main()
