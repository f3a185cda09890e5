"""The `hybridize` command line. Thin: parse options -> build the config -> call the API -> save -> print."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

import hybridize
from hybridize.convert import ConvertConfig
from hybridize.errors import ConfigError, HybridizeError
from hybridize.evaluate import BenchConfig, EvalConfig
from hybridize.evaluate.bench import format_bench
from hybridize.export import ExportConfig
from hybridize.hub import PushConfig

app = typer.Typer(
    help="Turn a pretrained Llama-family model into a cheaper hybrid, then evaluate, benchmark and export it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[str, typer.Argument(help="Alias (llama, smollm2), model directory, .gguf file or Hub id.")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Directory to create (written atomically).")]
Overwrite = Annotated[bool, typer.Option(help="Replace the output directory if it exists.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Run the model's own code from its directory or the Hub.")]


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None


def _write_json(result: dict, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {path}")


@app.command()
def convert(
    model: ModelArg,
    output: Output,
    ratio: Annotated[float, typer.Option(help="Fraction of layers converted, in [0, 1], spread evenly.")] = (
        ConvertConfig.ratio
    ),
    mixer: Annotated[str, typer.Option(help="Mixer replacing attention.")] = ConvertConfig.mixer,
    attn_layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers that keep attention, e.g. 1,3,5 (overrides --ratio).")
    ] = None,
    conv_init: Annotated[str, typer.Option(help="Mamba2 conv initialisation: delta or random.")] = (
        ConvertConfig.conv_init
    ),
    chunk_size: Annotated[int, typer.Option(help="Mamba2 SSD chunk length (speed only).")] = ConvertConfig.chunk_size,
    seed: Annotated[int, typer.Option(help="Seed of the new parameters.")] = ConvertConfig.seed,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Convert attention layers of a pretrained model into a hybrid (MambaInLlama initialisation)."""
    config = ConvertConfig(
        mixer=mixer,
        ratio=ratio,
        attn_layers=_int_list(attn_layers, "--attn-layers"),
        conv_init=conv_init,
        chunk_size=chunk_size,
        seed=seed,
    )
    hybridize.check_output(output, overwrite=overwrite)
    source, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    hybrid = hybridize.convert(source, config, progress=True)
    hybridize.save(hybrid, output, tokenizer=tokenizer, overwrite=overwrite)
    layers = hybrid.config.mixer_types
    typer.echo(f"converted {sum(t != 'attention' for t in layers)}/{len(layers)} layers to {mixer}; wrote {output}")


@app.command()
def export(
    model: ModelArg,
    output: Output,
    to: Annotated[str, typer.Option(help="Native transformers model type to write.")] = ExportConfig.to,
    overwrite: Overwrite = False,
):
    """Write a hybrid as a native transformers model (GraniteMoeHybrid) that loads with no custom code."""
    config = ExportConfig(to=to)
    hybridize.check_output(output, overwrite=overwrite)
    hybrid, tokenizer = hybridize.load(model)
    hybridize.save(hybridize.export(hybrid, config), output, tokenizer=tokenizer, overwrite=overwrite)
    typer.echo(f"wrote {output} ({to})")


@app.command("eval")
def evaluate(
    model: ModelArg,
    baseline: Annotated[str | None, typer.Option(help="Reference model for KL and top-1 agreement.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation block.")] = EvalConfig.seq_len,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens evaluated.")] = EvalConfig.max_tokens,
    batch_size: Annotated[int, typer.Option(help="Blocks per forward pass.")] = EvalConfig.batch_size,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Held-out perplexity on the built-in Wikipedia corpus; with --baseline, KL and top-1 agreement too."""
    config = EvalConfig(seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    loaded, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    reference = hybridize.load(baseline, trust_remote_code=trust_remote_code)[0] if baseline else None
    result = hybridize.evaluate(loaded, tokenizer, config, baseline=reference, progress=True)
    for key, value in result.items():
        typer.echo(f"{key:>20}  {value:.4f}" if isinstance(value, float) else f"{key:>20}  {value}")
    _write_json(result, json_path)


@app.command()
def bench(
    model: ModelArg,
    baseline: Annotated[str | None, typer.Option(help="Model measured side by side, e.g. the source.")] = None,
    context: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = ",".join(
        map(str, BenchConfig.contexts)
    ),
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded after each prompt.")] = BenchConfig.new_tokens,
    repeats: Annotated[int, typer.Option(help="Interleaved rounds; medians are reported.")] = BenchConfig.repeats,
    batch: Annotated[int, typer.Option(help="Sequences per batch.")] = BenchConfig.batch_size,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
):
    """Prefill tokens/s, decode ms/token and cache bytes per context length, side by side with a baseline."""
    config = BenchConfig(
        contexts=_int_list(context, "--context"), new_tokens=new_tokens, repeats=repeats, batch_size=batch
    )
    loaded, tokenizer = hybridize.load(model)
    reference = hybridize.load(baseline)[0] if baseline else None
    result = hybridize.bench(loaded, tokenizer, config, baseline=reference, progress=True)
    typer.echo(format_bench(result))
    _write_json(result, json_path)


@app.command()
def push(
    model_dir: Annotated[Path, typer.Argument(help="Saved model directory (config.json + safetensors).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository 'owner/name'; created if missing.")],
    private: Annotated[
        bool, typer.Option(help="Create the repository as private (an existing one keeps its visibility).")
    ] = PushConfig.private,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to, created if missing (default main).")] = (
        PushConfig.revision
    ),
    message: Annotated[str | None, typer.Option(help="Commit message.")] = PushConfig.commit_message,
):
    """Upload a saved model to the Hugging Face Hub with a model card written from its hybridize.json.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.
    """
    config = PushConfig(repo_id=repo_id, private=private, revision=revision, commit_message=message)
    typer.echo(hybridize.push(model_dir, config))


def main() -> None:
    try:
        app()
    except HybridizeError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)


__all__ = ["app", "main"]
