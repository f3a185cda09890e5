"""The held-out quality of a distillation over tokens seen, as a table and a PNG.

Every `distill` step records its evaluations in `hybridize.json` (`metrics.curve`: tokens, perplexity, KL, top-1
agreement against the teacher). A model distilled in several stages (layerwise, then e2e) carries one step per stage;
`distill_curve` joins them into one curve over the cumulative tokens, so the plot of the last output shows the whole
history. Several outputs on one plot compare runs at equal tokens (e.g. attention-initialised against randomly
initialised mixers, the MambaInLlama claim, arXiv 2408.15237).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..provenance import MANIFEST_NAME, read_manifest


def distill_curve(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluations of every `distill` step of a model's history, with `tokens` counted from the first one.

    Args:
        steps (`Sequence[dict]`): `hybridize.json`'s `steps` (or `model.hybridize_steps`).

    Returns:
        `list[dict]`: one point per evaluation: `tokens` (cumulative), `stage`, `perplexity`, `kl`,
        `top1_agreement`, `teacher_perplexity`. A stage's first point repeats the previous stage's last one, and is
        dropped when it does.
    """
    points: list[dict[str, Any]] = []
    offset = 0
    for step in steps:
        if step.get("step") != "distill":
            continue
        metrics = step.get("metrics", {})
        for index, point in enumerate(metrics.get("curve", [])):
            if index == 0 and points and point["tokens"] == 0:
                continue  # the same model as the previous stage's last point
            points.append(
                {
                    **point,
                    "tokens": offset + point["tokens"],
                    "stage": step["config"]["stage"],
                    "teacher_perplexity": metrics.get("teacher_perplexity"),
                }
            )
        offset += metrics.get("tokens", 0)
    return points


def _steps(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run)
    if not (path / MANIFEST_NAME).is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_NAME}; pass directories written by hybridize distill")
    return read_manifest(path)["steps"]


def curve_table(run: str | Path) -> str:
    """A Markdown table of `distill_curve` for the model saved in `run`."""
    rows = ["| tokens | stage | perplexity | KL | top-1 agreement |", "|---:|---|---:|---:|---:|"]
    for point in distill_curve(_steps(run)):
        rows.append(
            f"| {point['tokens']:,} | {point['stage']} | {point['perplexity']:.2f} | {point['kl']:.4f} | "
            f"{point['top1_agreement']:.3f} |"
        )
    return "\n".join(rows)


def plot_curves(runs: Sequence[str | Path], output: str | Path, *, labels: Sequence[str] | None = None) -> Path:
    """Plot held-out perplexity and KL over tokens seen for one or several distilled models into a PNG.

    Args:
        runs (`Sequence[str | Path]`): model directories written by `hybridize distill`.
        output (`str` or `Path`): the PNG file to write.
        labels (`Sequence[str]`, *optional*): one legend label per run; the directory names by default.

    Returns:
        `Path`: `output`.

    Example: `plot_curves(["out/s2", "out/s2-random-init"], "out/curve.png")`
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = list(labels) if labels is not None else [Path(run).name for run in runs]
    figure, (ppl_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    teacher = None
    for run, label in zip(runs, labels):
        points = distill_curve(_steps(run))
        tokens = [p["tokens"] for p in points]
        ppl_axis.plot(tokens, [p["perplexity"] for p in points], marker="o", label=label)
        kl_axis.plot(tokens, [p["kl"] for p in points], marker="o", label=label)
        teacher = teacher or next((p["teacher_perplexity"] for p in points if p["teacher_perplexity"]), None)
    if teacher:
        ppl_axis.axhline(teacher, color="black", linestyle="--", label=f"teacher {teacher:.2f}")
        ppl_axis.axhline(1.25 * teacher, color="gray", linestyle=":", label="1.25x teacher")
    ppl_axis.set(xlabel="tokens seen", ylabel="held-out perplexity", yscale="log", title="perplexity")
    kl_axis.set(xlabel="tokens seen", ylabel="KL(teacher || student), nats/token", yscale="log", title="KL")
    for axis in (ppl_axis, kl_axis):
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}K"))
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m hybridize.distill.plot OUT.png RUN [RUN ...]`: the plot, and each run's table on stdout."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m hybridize.distill.plot OUT.png RUN_DIR [RUN_DIR ...]")
    for run in args[1:]:
        print(f"{run}\n{curve_table(run)}\n")
    print(json.dumps({"wrote": str(plot_curves(args[1:], args[0]))}))


if __name__ == "__main__":
    main()


__all__ = ["curve_table", "distill_curve", "plot_curves"]
