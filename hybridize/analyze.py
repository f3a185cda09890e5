"""`hybridize analyze`: how lazy each attention layer is (LightTransfer, arXiv 2410.13846 §3) and, with `--mixer`, how
much converting it alone costs (`convert/sensitivity.py`), as a table, a JSON file and a PNG plot.

A layer's lazy ratio on a document is the attention mass its last `w_last` queries put on the first `sinks` tokens
and the last `window` tokens, averaged over heads and queries (`hybridize.convert.lazy`); a layer near 1 loses
little when it streams. The analysis also says which layers `convert --mixer streaming --select lazy --ratio R`
would pick: those most often among a document's laziest. Documents no longer than sinks + window cannot show
anything (every ratio is exactly 1): the result then carries a warning, which the table prints.
"""

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from .compat import config_second
from .configs.analyze import AnalyzeConfig
from .convert.lazy import attention_modules, laziest_layers, lazy_frequency, measure_lazy_ratios
from .convert.selection import num_converted
from .errors import ConfigError
from .io.calibration import calibration_blocks
from .saving import atomic_output

RESULT_NAME = "lazy_ratio.json"
PLOT_NAME = "lazy_ratio.png"


@config_second(AnalyzeConfig)
def analyze(model: nn.Module, config: AnalyzeConfig, *, tokenizer: Any, progress: bool = False) -> dict[str, Any]:
    """Measure the lazy ratio of every attention layer of `model` on calibration documents; `model` is not modified.

    Args:
        model (`nn.Module`): a Llama-family causal LM or a hybrid (layers without attention are reported as such).
        config (`AnalyzeConfig`): the streaming shape, the documents and the selection ratio.
        tokenizer: its tokenizer.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `dict`: `config`; `num_docs` and `seq_len` (as measured); `layers`, one row per layer with `layer`,
        `mixer`, `lazy_ratio` (mean over documents), `min`, `max`, `lazy_frequency` (the share of documents in which
        the layer is among the `selected`-many laziest) and `selected`; `selected` (layer indices); `ratios` (per
        document, per layer; `None` without attention); `warnings`.

    Example:
        ```python
        >>> model, tokenizer = hybridize.load("llama")
        >>> result = analyze(model, AnalyzeConfig(window=508), tokenizer=tokenizer)
        ```
    """
    blocks = calibration_blocks(tokenizer, config.data, num_blocks=config.num_docs, seq_len=config.seq_len)
    ratios = measure_lazy_ratios(
        model, blocks, sinks=config.sinks, window=config.window, w_last=config.w_last, progress=progress
    )
    attention = attention_modules(model)
    k = min(num_converted(ratios.shape[1], config.ratio), len(attention))
    frequency, selected = lazy_frequency(ratios, k), laziest_layers(ratios, k)
    warnings = []
    if config.seq_len <= config.sinks + config.window:
        warnings.append(
            f"the calibration documents have {config.seq_len} tokens, not more than sinks + window = "
            f"{config.sinks + config.window}: every lazy ratio is 1 and ranks nothing; pass a --seq-len above "
            f"{config.sinks + config.window} or a smaller --window"
        )
    sensitivity, sensitive = None, []
    if config.mixer is not None:
        sensitivity, sensitive = _sensitivity(model, tokenizer, config, progress)
    mixer_types = getattr(model.config, "mixer_types", None) or ["attention"] * ratios.shape[1]
    layers = []
    for i in range(ratios.shape[1]):
        column = ratios[:, i]
        measured = i in attention
        layers.append(
            {
                "layer": i,
                "mixer": mixer_types[i],
                "lazy_ratio": column.mean().item() if measured else None,
                "min": column.min().item() if measured else None,
                "max": column.max().item() if measured else None,
                "lazy_frequency": frequency[i].item() if measured else None,
                "selected": i in selected,
                "sensitivity_kl": sensitivity[i] if sensitivity is not None else None,
                "sensitivity_selected": i in sensitive,
            }
        )
    return {
        "config": dataclasses.asdict(config),
        "num_docs": blocks.shape[0],
        "seq_len": blocks.shape[1],
        "layers": layers,
        "selected": selected,
        "sensitivity_selected": sensitive,
        "ratios": [[None if math.isnan(r) else r for r in row] for row in ratios.tolist()],
        "warnings": warnings,
    }


def _sensitivity(model: nn.Module, tokenizer: Any, config: AnalyzeConfig, progress: bool) -> tuple[list, list]:
    from .convert import ConvertConfig
    from .convert.sensitivity import layer_sensitivity, least_sensitive_layers

    if getattr(model.config, "mixer_types", None) is not None:
        raise ConfigError("--mixer measures what converting each attention layer costs: analyze the source model")
    convert_config = ConvertConfig(
        mixer=config.mixer,
        mixer_init=config.mixer_init,
        mixer_settings={"sinks": config.sinks, "window": config.window} if config.mixer == "streaming" else {},
        calibration=config.data,
        calibration_docs=config.num_docs,
        calibration_len=config.seq_len,
    )
    scores = layer_sensitivity(model, convert_config, tokenizer, progress=progress)
    return scores, least_sensitive_layers(scores, num_converted(len(scores), config.ratio))


def format_analysis(result: dict[str, Any]) -> str:
    """A plain-text table of `analyze`'s result, its warnings after it."""
    c = result["config"]
    lines = [
        (
            f"lazy ratio: attention on {c['sinks']} sinks + {c['window']} recent tokens, last {c['w_last']} queries, "
            f"{result['num_docs']} documents of {result['seq_len']} tokens ({c['data']})"
        ),
        f"{'layer':>5}  {'mixer':<10}  {'lazy ratio':>10}  {'min':>6}  {'max':>6}  {'lazy freq':>9}  selected"
        + (f"  {'KL alone (' + str(c['mixer']) + ')':>20}  least sensitive" if c.get("mixer") else ""),
    ]
    for row in result["layers"]:
        if row["lazy_ratio"] is None:
            lines.append(f"{row['layer']:>5}  {row['mixer']:<10}  {'-':>10}  (no attention)")
            continue
        lines.append(
            f"{row['layer']:>5}  {row['mixer']:<10}  {row['lazy_ratio']:>10.4f}  {row['min']:>6.3f}  {row['max']:>6.3f}"
            f"  {row['lazy_frequency']:>9.2f}  {'*' if row['selected'] else '':<8}"
            + (
                f"  {row['sensitivity_kl']:>20.4f}  {'*' if row['sensitivity_selected'] else ''}"
                if row.get("sensitivity_kl") is not None
                else ""
            )
        )
    lines.append(f"selected ({len(result['selected'])} laziest, ratio {c['ratio']}): {result['selected']}")
    if c.get("mixer"):
        lines.append(
            f"least sensitive to {c['mixer']} ({len(result['sensitivity_selected'])}, ratio {c['ratio']}; "
            f"convert --select sensitivity): {result['sensitivity_selected']}"
        )
    lines += [f"warning: {warning}" for warning in result["warnings"]]
    return "\n".join(lines)


def plot_analysis(result: dict[str, Any], path: Path) -> None:
    """Bar chart of the mean lazy ratio per layer (min-max over documents as error bars; selected layers in
    another colour), written to `path` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["layers"] if row["lazy_ratio"] is not None]
    x = [row["layer"] for row in rows]
    mean = [row["lazy_ratio"] for row in rows]
    error = [[m - row["min"] for m, row in zip(mean, rows)], [row["max"] - m for m, row in zip(mean, rows)]]
    colours = ["tab:orange" if row["selected"] else "tab:blue" for row in rows]
    c = result["config"]
    width = max(6.0, 0.3 * len(result["layers"]) + 2)
    with_kl = any(row.get("sensitivity_kl") is not None for row in result["layers"])
    fig, axes = plt.subplots(2 if with_kl else 1, 1, figsize=(width, 7 if with_kl else 4), squeeze=False)
    ax = axes[0, 0]
    ax.bar(x, mean, yerr=error, color=colours, capsize=2)
    low = min([row["min"] for row in rows], default=0.0)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("lazy ratio")
    ax.set_title(
        f"attention on {c['sinks']} sinks + {c['window']} recent tokens ({result['num_docs']} x {result['seq_len']} "
        f"tokens); orange: the {len(result['selected'])} laziest",
        fontsize=9,
    )
    if with_kl:
        kl_rows = [row for row in result["layers"] if row.get("sensitivity_kl") is not None]
        ax = axes[1, 0]
        ax.bar(
            [row["layer"] for row in kl_rows],
            [row["sensitivity_kl"] for row in kl_rows],
            color=["tab:orange" if row["sensitivity_selected"] else "tab:blue" for row in kl_rows],
        )
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("KL to the source (nats/token)")
        ax.set_title(
            f"only this layer converted to {c['mixer']}; orange: the {len(result['sensitivity_selected'])} least "
            "sensitive (convert --select sensitivity)",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_analysis(
    result: dict[str, Any], output: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> Path:
    """Write `lazy_ratio.json` and `lazy_ratio.png` into the directory `output`, atomically (never over `inputs`)."""
    output = Path(output)
    with atomic_output(output, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / RESULT_NAME).write_text(json.dumps(result, indent=2) + "\n")
        plot_analysis(result, tmp / PLOT_NAME)
    return output


__all__ = ["PLOT_NAME", "RESULT_NAME", "AnalyzeConfig", "analyze", "format_analysis", "plot_analysis", "save_analysis"]
