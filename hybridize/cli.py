"""The `hybridize` command line. Thin: parse options -> build the config -> call the API -> save -> print.

Fast to say no: this module imports only typer, the standard library and the configs (`hybridize.configs`, torch-free;
the options' defaults are the configs' own). Each command builds its config first, which checks every option, and
imports what it runs only after that, so that `--help`, `--version`, usage errors and config errors return before
torch, transformers, lm-eval, POT, matplotlib or datasets is imported (`tests/test_fast_cli.py`). The API is reached
through `hybridize.<name>`, which imports on first use.
"""

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

import hybridize
from hybridize.configs import (
    AnalyzeConfig,
    BenchConfig,
    ConvertConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    FactorizeConfig,
    FuseConfig,
    GenerateConfig,
    PruneConfig,
    PushConfig,
)
from hybridize.configs.distill import EVAL_EVERY, SAVE_EVERY
from hybridize.configs.llamacpp import RUNTIMES, LlamaCppBenchConfig, pick_runtime, refuse_options
from hybridize.errors import ConfigError, HybridizeError

app = typer.Typer(
    help="Turn a pretrained Llama-family model into a cheaper hybrid, then evaluate, benchmark and export it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: wraps at 80 columns without cutting option names
)


class _Command(TyperCommand):
    """Usage lines name required arguments bare, as click writes them (`MODEL`, not typer's `{MODEL}`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)]


ModelArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="Alias (llama, smollm2), model directory, .gguf file or Hub id.")
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Directory to create (written atomically).")]
Overwrite = Annotated[bool, typer.Option(help="Replace the output directory if it exists.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Run the model's own code from its directory or the Hub.")]


Runtime = Annotated[
    str,
    typer.Option(
        help=f"Which runtime runs the model: {', '.join(RUNTIMES)}. auto runs a .gguf file through llama.cpp "
        "(llama-cpp-python, the gguf extra) and anything else through PyTorch; torch dequantizes a .gguf file into "
        "PyTorch; llama.cpp also runs an alias's packaged GGUF."
    ),
]
Threads = Annotated[int | None, typer.Option(help="llama.cpp threads (default: llama-cpp-python's).")]
KVCache = Annotated[str, typer.Option(help="llama.cpp: attention KV cache type, f16 (llama.cpp's default) or f32.")]
FlashAttn = Annotated[
    bool, typer.Option(help="llama.cpp: flash attention, on as in llama.cpp's tools (off + --kv-cache f32: exact).")
]


class WeightsDType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


DType = Annotated[
    WeightsDType,
    typer.Option(help="Weights' dtype. bfloat16 halves the bytes but decodes slower on CPUs without fast bf16 GEMV."),
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hybridize {hybridize.__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None


def _settings(**options) -> dict:
    """Mixer settings given on the command line; the others keep the mixer's defaults."""
    return {name: value for name, value in options.items() if value is not None}


def _merged(options: dict, flags: dict) -> dict:
    """`--mixer-option` settings and the settings' own flags (`--window`) together; a setting given both ways must
    agree."""
    for key in options.keys() & flags.keys():
        if options[key] != flags[key]:
            raise ConfigError(
                f"--mixer-option {key}={options[key]!r} and --{key.replace('_', '-')} {flags[key]!r} disagree"
            )
    return {**options, **flags}


def _key_values(pairs: list[str] | None, option: str) -> dict:
    """`KEY=VALUE` options as a dict; a VALUE that reads as JSON (`64`, `0.5`, `true`, `null`) is that value, any
    other is the text itself."""
    result = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} takes KEY=VALUE, e.g. {option} chunk_size=32; got {pair!r}")
        try:
            result[key.strip()] = json.loads(text)
        except ValueError:
            result[key.strip()] = text
    return result


def _check_json(path: Path | None, inputs: list) -> None:
    """A `--json` path is checked like an output before anything loads (replacing an existing file is fine)."""
    if path is not None:
        hybridize.check_output(path, overwrite=True, inputs=inputs)


def _write_json(result: dict, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {path}")


@app.command(cls=_Command)
def convert(
    model: ModelArg,
    output: Output,
    ratio: Annotated[float, typer.Option(help="Fraction of layers converted, in [0, 1], spread evenly.")] = (
        ConvertConfig.ratio
    ),
    mixer: Annotated[
        str, typer.Option(help="Mixer replacing attention: mamba2, nha or streaming.")
    ] = ConvertConfig.mixer,
    attn_layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers that keep attention, e.g. 1,3,5 (overrides --ratio).")
    ] = None,
    conv_init: Annotated[
        str | None, typer.Option(help="Mamba2 conv initialisation: delta (default) or random.")
    ] = ConvertConfig.conv_init,
    mixer_init: Annotated[
        str | None,
        typer.Option(
            "--init",
            "--mixer-init",
            help="New mixer weights: calibrated (q/k/v/o reused, readout refit on calibration text; default for "
            "mamba2 and nha), attention (the published mapping; default for streaming), zero (readout zeroed) or "
            "random (Mamba2 ablation).",
        ),
    ] = ConvertConfig.mixer_init,
    init_option: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE option of the mixer's initialiser, e.g. conv_init=random (repeatable)."),
    ] = None,
    mixer_option: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE setting of the new mixer, e.g. chunk_size=32 (repeatable).")
    ] = None,
    chunk_size: Annotated[
        int | None, typer.Option(help="Mamba2 / NHA chunk length (speed only; default 64 / 32).")
    ] = None,
    select: Annotated[
        str, typer.Option(help="Which layers: uniform, lazy, sensitivity, random or dynamic (streaming).")
    ] = ConvertConfig.select,
    sinks: Annotated[int | None, typer.Option(help="Streaming: initial tokens kept (default 4).")] = None,
    window: Annotated[
        int | None, typer.Option(help="Streaming / NHA: recent tokens attended exactly (default 1020 / 64).")
    ] = None,
    slots: Annotated[int | None, typer.Option(help="NHA: slot memories per KV head (default 64).")] = None,
    full_every: Annotated[
        int | None, typer.Option(help="Keep attention in every N-th layer (N-1, 2N-1, ...); overrides --ratio.")
    ] = ConvertConfig.full_every,
    w_last: Annotated[int | None, typer.Option(help="Streaming: last queries a lazy ratio averages (default 64).")] = (
        None
    ),
    calibration: Annotated[
        str,
        typer.Option(help="Calibration text: wiki (the packaged train split), a local file or folder, a Hub name."),
    ] = ConvertConfig.calibration,
    calibration_docs: Annotated[
        int, typer.Option(help="--init calibrated, --select lazy/sensitivity: calibration blocks.")
    ] = ConvertConfig.calibration_docs,
    calibration_len: Annotated[
        int, typer.Option(help="--init calibrated, --select lazy/sensitivity: tokens per calibration block.")
    ] = ConvertConfig.calibration_len,
    seed: Annotated[int, typer.Option(help="Seed of the new parameters and of --select random.")] = ConvertConfig.seed,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Convert attention layers of a pretrained model into a hybrid: q/k/v/o reused (MambaInLlama), each new mixer's
    readout calibrated on the source attention's output, layers spread evenly or chosen by sensitivity."""
    config = ConvertConfig(
        mixer=mixer,
        ratio=ratio,
        attn_layers=_int_list(attn_layers, "--attn-layers"),
        full_every=full_every,
        conv_init=conv_init,
        mixer_init=mixer_init,
        init_options=_key_values(init_option, "--init-option"),
        select=select,
        mixer_settings=_merged(
            _key_values(mixer_option, "--mixer-option"),
            _settings(chunk_size=chunk_size, sinks=sinks, window=window, w_last=w_last, slots=slots),
        ),
        calibration=calibration,
        calibration_docs=calibration_docs,
        calibration_len=calibration_len,
        seed=seed,
    )
    hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    from hybridize.convert import check_convert
    from hybridize.sources import load_config

    if config.attn_layers is not None:  # the only check against the model; an uncached GGUF's config takes seconds
        check_convert(load_config(model, trust_remote_code=trust_remote_code), config)
    source, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    hybrid = hybridize.convert(source, config, tokenizer=tokenizer, progress=True)
    hybridize.save(hybrid, output, tokenizer=tokenizer, overwrite=overwrite, inputs=[model])
    layers = hybrid.config.mixer_types
    if attn_layers or full_every:
        kept = ", ".join(str(i) for i, t in enumerate(layers) if t == "attention") or "none"
        chosen = f"{'explicit' if attn_layers else f'--full-every {full_every}'}: attention kept in layers {kept}"
    else:
        chosen = select
    typer.echo(
        f"converted {sum(t != 'attention' for t in layers)}/{len(layers)} layers to {mixer} ({chosen}); wrote {output}"
    )


@app.command(cls=_Command)
def analyze(
    model: ModelArg,
    data: Annotated[str, typer.Option(help="Calibration text: wiki, a local file or folder, or a Hub name.")] = (
        AnalyzeConfig.data
    ),
    sinks: Annotated[int, typer.Option(help="Initial tokens a streaming layer keeps.")] = AnalyzeConfig.sinks,
    window: Annotated[int, typer.Option(help="Recent tokens a streaming layer keeps.")] = AnalyzeConfig.window,
    w_last: Annotated[int, typer.Option(help="Last queries of each document averaged over.")] = AnalyzeConfig.w_last,
    num_docs: Annotated[int, typer.Option(help="Calibration documents.")] = AnalyzeConfig.num_docs,
    seq_len: Annotated[int, typer.Option(help="Tokens per document (must exceed sinks + window).")] = (
        AnalyzeConfig.seq_len
    ),
    ratio: Annotated[float, typer.Option(help="Fraction of layers marked as selected (the laziest).")] = (
        AnalyzeConfig.ratio
    ),
    mixer: Annotated[
        str | None,
        typer.Option(
            help="Also score each layer by the KL of converting it alone to this mixer (mamba2, nha, streaming)."
        ),
    ] = AnalyzeConfig.mixer,
    init: Annotated[
        str | None, typer.Option(help="--mixer: the init scored (default: the mixer's, calibrated for mamba2/nha).")
    ] = AnalyzeConfig.mixer_init,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory for lazy_ratio.json and lazy_ratio.png.")
    ] = None,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Per-layer lazy ratio (LightTransfer): how much attention each layer puts on sinks + a recent window; with
    --mixer, also what converting each layer alone costs (the scores --select sensitivity uses)."""
    config = AnalyzeConfig(
        data=data,
        sinks=sinks,
        window=window,
        w_last=w_last,
        num_docs=num_docs,
        seq_len=seq_len,
        ratio=ratio,
        mixer=mixer,
        mixer_init=init,
    )
    if output is not None:
        hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    from hybridize.analyze import format_analysis, save_analysis

    loaded, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    result = hybridize.analyze(loaded, tokenizer, config, progress=True)
    typer.echo(format_analysis(result))
    if output is not None:
        save_analysis(result, output, overwrite=overwrite, inputs=[model])
        typer.echo(f"wrote {output}")


@app.command(cls=_Command)
def export(
    model: ModelArg,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Directory (native) or .gguf file (--to gguf) to create, atomically."),
    ],
    to: Annotated[
        str, typer.Option(help="granitemoehybrid (native transformers) or gguf (one file for llama.cpp).")
    ] = ExportConfig.to,
    outtype: Annotated[
        str,
        typer.Option(help="--to gguf: weight matrices as f32, f16, bf16, q8_0 or q4_1 (embedding and head at q8_0)."),
    ] = ExportConfig.outtype,
    overwrite: Overwrite = False,
):
    """Write a hybrid as a native transformers model (GraniteMoeHybrid) that loads with no custom code, or with
    --to gguf as one GGUF file for llama.cpp, Ollama and llama-cpp-python (granitehybrid; llama when every layer is
    attention)."""
    config = ExportConfig(to=to, outtype=outtype)
    hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    hybrid, tokenizer = hybridize.load(model)
    if config.to == "gguf":
        from hybridize.llamacpp import check_gguf_export, tokenizer_origin

        arch = check_gguf_export(hybrid)
        origin = tokenizer_origin(hybrid, model)
        hybridize.export_gguf(
            hybrid, output, config, tokenizer=tokenizer, tokenizer_gguf=origin, overwrite=overwrite, inputs=[model]
        )
        source = f"tokenizer from {origin.name}" if origin else "tokenizer from its files"
        typer.echo(f"wrote {output} (gguf {arch}, {outtype}, {output.stat().st_size / 2**20:.1f} MiB; {source})")
        return
    hybridize.save(hybridize.export(hybrid, config), output, tokenizer=tokenizer, overwrite=overwrite, inputs=[model])
    typer.echo(f"wrote {output} ({to})")


@app.command("eval", cls=_Command)
def evaluate(
    model: ModelArg,
    baseline: Annotated[
        str | None, typer.Option(help="Reference model: KL and top-1 agreement, or with --tasks the same tasks.")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated lm-eval tasks instead of the built-in perplexity: wiki_ppl, lambada_wiki, "
            "passkey_2k, passkey_4k, passkey_8k (offline) or any registry task whose data is cached."
        ),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="With --tasks: tokens of context per request (default: the model's, <= 8192).")
    ] = EvalConfig.max_length,
    limit: Annotated[int | None, typer.Option(help="With --tasks: only the first N items of each task.")] = (
        EvalConfig.limit
    ),
    data: Annotated[
        str | None,
        typer.Option(
            help="Text to measure instead of the built-in held-out split: a .txt/.jsonl/.parquet file or folder."
        ),
    ] = EvalConfig.data,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation block.")] = EvalConfig.seq_len,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens evaluated.")] = EvalConfig.max_tokens,
    prompt_len: Annotated[
        int,
        typer.Option(
            help="Prefill the first N tokens of each block through the cache and score only the rest, as generation "
            "would see it (what a dynamic or streaming cache decides at prefill shows only this way)."
        ),
    ] = EvalConfig.prompt_len,
    batch_size: Annotated[int, typer.Option(help="Blocks (or lm-eval requests) per forward pass.")] = (
        EvalConfig.batch_size
    ),
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    trust_remote_code: TrustRemoteCode = False,
    dtype: DType = WeightsDType.float32,
    runtime: Runtime = "auto",
    threads: Threads = None,
    kv_cache: KVCache = "f16",
    flash_attn: FlashAttn = True,
):
    """Held-out perplexity on the built-in Wikipedia corpus (with --baseline, KL, top-1 agreement and the logit
    distance too), or lm-eval tasks with --tasks. A .gguf file runs through llama.cpp (--runtime), the baseline by its
    own kind, both on the model's token ids. Results on a model directory are recorded in its hybridize.json."""
    config = EvalConfig(
        data=data,
        seq_len=seq_len,
        max_tokens=max_tokens,
        prompt_len=prompt_len,
        batch_size=batch_size,
        tasks=tuple(name.strip() for name in (tasks or "").split(",") if name.strip()),
        max_length=max_length,
        limit=limit,
    )
    runtimes = [pick_runtime(runtime, spec) for spec in ([model, baseline] if baseline else [model])]
    if "llama.cpp" in runtimes:
        refuse_options("llama.cpp", {"--tasks": bool(config.tasks), "--prompt-len": config.prompt_len > 0})
    if runtimes[0] == "llama.cpp":
        refuse_options(
            "llama.cpp", {"--dtype": dtype != WeightsDType.float32, "--trust-remote-code": trust_remote_code}
        )
    elif "llama.cpp" not in runtimes:
        refuse_options(
            "torch",
            {"--threads": threads is not None, "--kv-cache": kv_cache != "f16", "--no-flash-attn": not flash_attn},
        )
    _check_json(json_path, [model, baseline])
    from hybridize.evaluate.harness import format_results
    from hybridize.evaluate.perplexity import check_eval
    from hybridize.llamacpp.runtime import load_gguf_model
    from hybridize.provenance import MANIFEST_NAME, append_step
    from hybridize.sources import load_config, resolve

    if config.tasks:  # the only check against the model; an uncached GGUF's config takes seconds
        check_eval(load_config(model, trust_remote_code=trust_remote_code), config)
    gguf = {"n_ctx": config.seq_len, "threads": threads, "kv_cache": kv_cache, "flash_attn": flash_attn}
    if runtimes[0] == "llama.cpp":
        loaded, tokenizer = load_gguf_model(model, **gguf)
    else:
        loaded, tokenizer = hybridize.load(
            model, trust_remote_code=trust_remote_code, dtype=dtype.value, decode_layout=True
        )
    reference = None
    if baseline and runtimes[1] == "llama.cpp":
        reference = load_gguf_model(baseline, **gguf)[0]
    elif baseline:
        reference = hybridize.load(baseline, trust_remote_code=trust_remote_code)[0]
    result = hybridize.evaluate(loaded, tokenizer, config, baseline=reference, progress=True)
    if config.tasks:
        typer.echo(f"max_length {result['max_length']}" + (f", limit {config.limit}" if config.limit else ""))
        typer.echo(format_results(result["tasks"], result.get("baseline_tasks")))
    else:
        for key, value in result.items():
            typer.echo(f"{key:>20}  {value:.4f}" if isinstance(value, float) else f"{key:>20}  {value}")
    _write_json(result, json_path)
    if resolve(model).kind == "dir":
        try:
            append_step(Path(model), "eval", config, metrics=result, baseline=baseline)
            typer.echo(f"recorded in {Path(model) / MANIFEST_NAME}")
        except OSError as error:  # a read-only model directory: the results above still stand
            typer.echo(f"warning: not recorded in {Path(model) / MANIFEST_NAME}: {error.strerror}", err=True)


@app.command(cls=_Command)
def bench(
    model: ModelArg,
    baseline: Annotated[
        str | None, typer.Option(help="Model measured side by side, e.g. the source; any causal LM.")
    ] = None,
    context: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = ",".join(
        map(str, BenchConfig.contexts)
    ),
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded and timed after each prompt.")] = (
        BenchConfig.new_tokens
    ),
    warmup_tokens: Annotated[int, typer.Option(help="Tokens decoded before the timing starts.")] = (
        BenchConfig.warmup_tokens
    ),
    repeats: Annotated[int, typer.Option(help="Interleaved rounds; medians are reported.")] = BenchConfig.repeats,
    batch: Annotated[str, typer.Option("--batch", "--batch-size", help="Comma-separated batch sizes.")] = ",".join(
        map(str, BenchConfig.batch_sizes)
    ),
    baseline_static: Annotated[
        bool, typer.Option(help="Also run the baseline with transformers' static cache.")
    ] = BenchConfig.baseline_static,
    plot: Annotated[Path | None, typer.Option(help="Also draw the results to this PNG file.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    dtype: DType = WeightsDType.float32,
    decode_layout: Annotated[
        bool,
        typer.Option(help="Store MODEL's wide weights transposed for the CPU's GEMV (the baseline runs as loaded)."),
    ] = True,
    runtime: Runtime = "auto",
    threads: Annotated[
        str | None, typer.Option(help="llama.cpp: comma-separated thread counts, each measured (default: all cores).")
    ] = None,
    kv_cache: KVCache = LlamaCppBenchConfig.kv_cache,
    flash_attn: FlashAttn = LlamaCppBenchConfig.flash_attn,
):
    """Prefill tokens/s, decode ms/token against the memory floor, cache bytes and peak RSS per context length and
    batch size, side by side with a baseline run on transformers' default and static caches. A .gguf file runs
    through llama.cpp (--runtime): decode and prefill tokens/s, state bytes and peak RSS per context and --threads,
    side by side with a GGUF baseline (an alias: its packaged file)."""
    if pick_runtime(runtime, model) == "llama.cpp":
        refuse_options(
            "llama.cpp",
            {
                "--batch": batch != "1",
                "--plot": plot is not None,
                "--dtype": dtype != WeightsDType.float32,
                "--no-decode-layout": not decode_layout,
            },
        )
        gguf_config = LlamaCppBenchConfig(
            contexts=_int_list(context, "--context"),
            threads=_int_list(threads, "--threads"),
            new_tokens=new_tokens,
            warmup_tokens=warmup_tokens,
            repeats=repeats,
            kv_cache=kv_cache,
            flash_attn=flash_attn,
        )
        _check_json(json_path, [model, baseline])
        from hybridize.llamacpp.bench import bench_gguf, format_bench_gguf
        from hybridize.llamacpp.runtime import gguf_file

        reference = gguf_file(baseline) if baseline else None
        result = bench_gguf(gguf_file(model), gguf_config, baseline=reference, progress=True)
        typer.echo(format_bench_gguf(result))
        _write_json(result, json_path)
        return
    refuse_options(
        "torch", {"--threads": threads is not None, "--kv-cache": kv_cache != "f16", "--no-flash-attn": not flash_attn}
    )
    config = BenchConfig(
        contexts=_int_list(context, "--context"),
        new_tokens=new_tokens,
        warmup_tokens=warmup_tokens,
        repeats=repeats,
        batch_sizes=_int_list(batch, "--batch"),
        baseline_static=baseline_static,
    )
    _check_json(json_path, [model, baseline])
    from hybridize.evaluate.bench import check_bench, format_bench, load_causal_lm, plot_bench
    from hybridize.sources import load_config

    for spec in [model, baseline] if baseline else [model]:
        check_bench(load_config(spec), config)
    loaded, tokenizer = load_causal_lm(model, dtype=dtype.value, decode_layout=decode_layout)
    reference = load_causal_lm(baseline)[0] if baseline else None
    result = hybridize.bench(loaded, tokenizer, config, baseline=reference, progress=True)
    typer.echo(format_bench(result))
    _write_json(result, json_path)
    if plot is not None:
        typer.echo(f"wrote {plot_bench(result, plot)}")


@app.command(cls=_Command)
def push(
    model_dir: Annotated[
        Path, typer.Argument(metavar="MODEL_DIR", help="Saved model directory (config.json + safetensors).")
    ],
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="Hub repository 'owner/name'; created if missing.")
    ],
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


@app.command(cls=_Command)
def distill(
    student: Annotated[
        str,
        typer.Argument(metavar="STUDENT", help="The hybrid to train: a directory written by convert (or distill)."),
    ],
    teacher: Annotated[str, typer.Option(help="The reference model, usually the one the student came from.")],
    output: Output,
    stage: Annotated[str, typer.Option(help="layerwise (new mixers on per-layer targets) or e2e (logit KD).")] = (
        DistillConfig.stage
    ),
    data: Annotated[
        str,
        typer.Option(
            help="wiki, a .txt/.jsonl/.parquet file or folder, a Hub name[:config], or generate:N[:PROMPTS] (N tokens "
            "written by the teacher, cached beside OUTPUT as OUTPUT.generated-ID.jsonl)."
        ),
    ] = DistillConfig.data,
    text_column: Annotated[str | None, typer.Option(help="Column holding the text (detected if omitted).")] = (
        DistillConfig.text_column
    ),
    tokens: Annotated[str, typer.Option(help="Token budget, e.g. 500K or 2M.")] = str(DistillConfig.tokens),
    seq_len: Annotated[int, typer.Option(help="Tokens per packed training block.")] = DistillConfig.seq_len,
    batch_size: Annotated[int, typer.Option(help="Blocks per micro-batch and process.")] = DistillConfig.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = DistillConfig.grad_accum,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default per stage).")] = DistillConfig.lr,
    freeze: Annotated[str, typer.Option(help="e2e: what trains: mixers, all-but-mlp or all.")] = DistillConfig.freeze,
    pretrained_lr_ratio: Annotated[
        float, typer.Option(help="e2e: learning rate of the source's own weights as a fraction of --lr.")
    ] = DistillConfig.pretrained_lr_ratio,
    loss: Annotated[str, typer.Option(help="e2e: forward_kl or reverse_kl.")] = DistillConfig.loss,
    layer_loss: Annotated[
        str,
        typer.Option(help="layerwise: l2 or mse on each block's output, or mixer (MSE against the attention output)."),
    ] = DistillConfig.layer_loss,
    ce_weight: Annotated[float, typer.Option(help="e2e: weight of next-token cross-entropy.")] = (
        DistillConfig.ce_weight
    ),
    kl_weight: Annotated[
        float, typer.Option(help="e2e: weight of the KL; 0 with --ce-weight 1 is plain fine-tuning on --data.")
    ] = DistillConfig.kl_weight,
    lora_rank: Annotated[int, typer.Option(help="e2e: LoRA rank on kept layers (0: full training).")] = (
        DistillConfig.lora_rank
    ),
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens per evaluation (0: none).")] = (
        DistillConfig.eval_tokens
    ),
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = DistillConfig.seed,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations (0: start and end).")] = (
        EVAL_EVERY
    ),
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only on Ctrl-C).")] = SAVE_EVERY,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in OUTPUT.distill/.")] = False,
    overwrite: Overwrite = False,
):
    """Distill a hybrid towards its teacher (layerwise or end-to-end); Ctrl-C saves a checkpoint for --resume."""
    config = DistillConfig(
        stage=stage,
        data=data,
        text_column=text_column,
        tokens=tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        freeze=freeze,
        pretrained_lr_ratio=pretrained_lr_ratio,
        loss=loss,
        layer_loss=layer_loss,
        ce_weight=ce_weight,
        kl_weight=kl_weight,
        lora_rank=lora_rank,
        eval_tokens=eval_tokens,
        seed=seed,
    )
    hybridize.check_output(output, overwrite=overwrite, inputs=[student, teacher])
    from hybridize.distill import finish, run_dir_for

    model, tokenizer = hybridize.load(student)
    reference, reference_tokenizer = hybridize.load(teacher)
    result = hybridize.distill(
        model,
        config,
        teacher=reference,
        tokenizer=tokenizer,
        teacher_tokenizer=reference_tokenizer,
        work_dir=run_dir_for(output),
        resume=resume,
        overwrite=overwrite,
        eval_every=eval_every,
        save_every=save_every,
        progress=True,
    )
    if finish(result, output, tokenizer=tokenizer, overwrite=overwrite, inputs=[student, teacher]):
        metrics = result.hybridize_steps[-1]["metrics"]
        typer.echo(f"distilled {stage}: {metrics['tokens']} tokens at {metrics['tokens_per_s']} tokens/s")
        if "end" in metrics:
            typer.echo(
                f"held-out perplexity {metrics['start']['perplexity']:.2f} -> {metrics['end']['perplexity']:.2f} "
                f"(teacher {metrics['teacher_perplexity']:.2f}), KL {metrics['end']['kl']:.4f}"
            )
        typer.echo(f"wrote {output}")


@app.command(cls=_Command)
def prune(
    model: ModelArg,
    output: Output,
    params: Annotated[float | None, typer.Option(help="Fraction of parameters to keep; searches the axes.")] = (
        PruneConfig.params
    ),
    hidden: Annotated[int | None, typer.Option(help="New hidden size.")] = PruneConfig.hidden,
    ffn: Annotated[int | None, typer.Option(help="New MLP intermediate size.")] = PruneConfig.ffn,
    attn_heads: Annotated[int | None, typer.Option(help="Query heads per attention layer.")] = PruneConfig.attn_heads,
    ssm_heads: Annotated[int | None, typer.Option(help="Heads per Mamba2 layer (a multiple of its groups).")] = (
        PruneConfig.ssm_heads
    ),
    ssm_head_dim: Annotated[int | None, typer.Option(help="Channels per Mamba2 head.")] = PruneConfig.ssm_head_dim,
    drop_layers: Annotated[int | None, typer.Option(help="Whole layers to remove.")] = PruneConfig.drop_layers,
    ssm_grouping: Annotated[str, typer.Option(help="aware (same heads per group) or ignore (baseline).")] = (
        PruneConfig.ssm_grouping
    ),
    attn_grouping: Annotated[str, typer.Option(help="aware (heads ranked in their KV group) or ignore.")] = (
        PruneConfig.attn_grouping
    ),
    depth_metric: Annotated[str, typer.Option(help="block (1 - cosine) or ppl (loss with the layer skipped).")] = (
        PruneConfig.depth_metric
    ),
    data: Annotated[str, typer.Option(help="Calibration text: wiki, a local file or folder, or a Hub name.")] = (
        PruneConfig.data
    ),
    num_blocks: Annotated[int, typer.Option(help="Calibration blocks.")] = PruneConfig.num_blocks,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration block.")] = PruneConfig.seq_len,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Prune a hybrid or dense model (Minitron width/depth, group-aware Mamba2 heads) to given sizes or a budget."""
    config = PruneConfig(
        params=params,
        hidden=hidden,
        ffn=ffn,
        attn_heads=attn_heads,
        ssm_heads=ssm_heads,
        ssm_head_dim=ssm_head_dim,
        drop_layers=drop_layers,
        ssm_grouping=ssm_grouping,
        attn_grouping=attn_grouping,
        depth_metric=depth_metric,
        data=data,
        num_blocks=num_blocks,
        seq_len=seq_len,
    )
    hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    source, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    pruned = hybridize.prune(source, config, tokenizer=tokenizer, progress=True)
    hybridize.save(pruned, output, tokenizer=tokenizer, overwrite=overwrite, inputs=[model])
    from hybridize.compress.prune import format_prune

    typer.echo(format_prune(pruned.hybridize_steps[-1]["metrics"]))
    typer.echo(f"wrote {output}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers, got {text!r}") from None


@app.command(cls=_Command)
def factorize(
    model: ModelArg,
    output: Output,
    ratio: Annotated[float, typer.Option(help="Fraction of the targeted linear parameters kept, in (0, 1].")] = (
        FactorizeConfig.ratio
    ),
    method: Annotated[str, typer.Option(help="svd, asvd, fwsvd or svd-llm.")] = FactorizeConfig.method,
    targets: Annotated[str, typer.Option(help="Comma-separated linears to factorize: attn, mlp, mamba.")] = ",".join(
        FactorizeConfig.targets
    ),
    rank_alloc: Annotated[str, typer.Option(help="uniform, or sensitivity (measured per matrix).")] = (
        FactorizeConfig.rank_alloc
    ),
    alpha: Annotated[float, typer.Option(help="asvd: exponent of the activation scaling.")] = FactorizeConfig.alpha,
    damp: Annotated[float, typer.Option(help="svd-llm: ridge on the Gram matrix, relative to its mean diagonal.")] = (
        FactorizeConfig.damp
    ),
    calibration: Annotated[
        str, typer.Option(help="Calibration text: wiki, a local file or folder, or a Hub name.")
    ] = FactorizeConfig.calibration,
    calibration_docs: Annotated[int, typer.Option(help="Calibration blocks.")] = FactorizeConfig.calibration_docs,
    calibration_len: Annotated[int, typer.Option(help="Tokens per calibration block.")] = (
        FactorizeConfig.calibration_len
    ),
    sensitivity_tokens: Annotated[int, typer.Option(help="--rank-alloc sensitivity: tokens measured per matrix.")] = (
        FactorizeConfig.sensitivity_tokens
    ),
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Factorize linear layers into low-rank pairs (SVD-LLM, ASVD, FWSVD or plain SVD); a dense model is first
    converted to a hybrid that keeps every attention layer."""
    config = FactorizeConfig(
        ratio=ratio,
        method=method,
        targets=_names(targets),
        rank_alloc=rank_alloc,
        alpha=alpha,
        damp=damp,
        calibration=calibration,
        calibration_docs=calibration_docs,
        calibration_len=calibration_len,
        sensitivity_tokens=sensitivity_tokens,
    )
    hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    source, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    factorized = hybridize.factorize(source, config, tokenizer=tokenizer, progress=True)
    hybridize.save(factorized, output, tokenizer=tokenizer, overwrite=overwrite, inputs=[model])
    metrics = factorized.hybridize_steps[-1]["metrics"]
    typer.echo(
        f"factorized {metrics['factorized']} linears: {metrics['params_before']:,} -> {metrics['params_after']:,} "
        f"parameters ({metrics['params_ratio']:.1%}); wrote {output}"
    )


@app.command(cls=_Command)
def fuse(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODELS", help="Models to fuse (alias, directory, .gguf, Hub id); the first is the anchor."
        ),
    ],
    output: Output,
    align: Annotated[str, typer.Option(help="Ground cost: activations, weights, or none (plain averaging).")] = (
        FuseConfig.align
    ),
    solver: Annotated[str, typer.Option(help="emd (exact) or sinkhorn (soft).")] = FuseConfig.solver,
    reg: Annotated[float, typer.Option(help="sinkhorn: entropic regularisation.")] = FuseConfig.reg,
    weights: Annotated[str | None, typer.Option(help="Comma-separated averaging weights, one per model.")] = None,
    width: Annotated[float, typer.Option(help="Fused width as a fraction of the anchor's, in (0, 1].")] = (
        FuseConfig.width
    ),
    width_axes: Annotated[str, typer.Option(help="Comma-separated axes --width narrows: hidden, mlp, heads.")] = (
        ",".join(FuseConfig.width_axes)
    ),
    calibration: Annotated[
        str, typer.Option(help="Calibration text: wiki, a local file or folder, or a Hub name.")
    ] = FuseConfig.calibration,
    calibration_docs: Annotated[int, typer.Option(help="Calibration blocks.")] = FuseConfig.calibration_docs,
    calibration_len: Annotated[int, typer.Option(help="Tokens per calibration block.")] = FuseConfig.calibration_len,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Fuse models of one family by optimal-transport alignment onto the first, then averaging; --width < 1 fuses
    into a narrower copy of the anchor."""
    config = FuseConfig(
        align=align,
        solver=solver,
        reg=reg,
        weights=_floats(weights, "--weights"),
        width=width,
        width_axes=_names(width_axes),
        calibration=calibration,
        calibration_docs=calibration_docs,
        calibration_len=calibration_len,
    )
    hybridize.check_output(output, overwrite=overwrite, inputs=models)
    from hybridize.compress.fuse import check_fuse
    from hybridize.sources import load_config

    check_fuse([load_config(spec, trust_remote_code=trust_remote_code) for spec in models], config)
    loaded = [hybridize.load(spec, trust_remote_code=trust_remote_code) for spec in models]
    tokenizer = loaded[0][1]
    fused = hybridize.fuse(
        [m for m, _ in loaded], config, tokenizer=tokenizer, tokenizers=[t for _, t in loaded], progress=True
    )
    hybridize.save(fused, output, tokenizer=tokenizer, overwrite=overwrite, inputs=models)
    params = fused.hybridize_steps[-1]["metrics"]["params"]
    typer.echo(f"fused {len(models)} models into {params:,} parameters; wrote {output}")


@app.command(cls=_Command)
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="The prompt (with --chat: the user message).")],
    draft: Annotated[
        str | None, typer.Option(help="Draft model with the same tokenizer: alias, directory, .gguf or Hub id.")
    ] = None,
    draft_layers: Annotated[
        int | None,
        typer.Option(help="Draft with the first N layers of --draft (default: of MODEL itself), sharing its weights."),
    ] = None,
    prompt_lookup: Annotated[
        bool, typer.Option(help="Draft without a model: copy what followed the last n-gram earlier in the text.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated at most.")] = GenerateConfig.max_new_tokens,
    draft_tokens: Annotated[int, typer.Option(help="Tokens the draft proposes per round (K).")] = (
        GenerateConfig.draft_tokens
    ),
    adaptive: Annotated[bool, typer.Option(help="Grow K after full acceptance, shrink it after a rejection.")] = (
        GenerateConfig.adaptive
    ),
    max_draft_tokens: Annotated[int, typer.Option(help="Largest K adaptive rounds may reach.")] = (
        GenerateConfig.max_draft_tokens
    ),
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = GenerateConfig.do_sample,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = GenerateConfig.temperature,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 keeps every token).")] = GenerateConfig.top_p,
    seed: Annotated[int, typer.Option(help="Seed of sampling and of the acceptance tests.")] = GenerateConfig.seed,
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template to the prompt.")] = (
        GenerateConfig.chat
    ),
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeat the option for several).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Go on past end-of-sequence tokens (for timing).")] = (
        GenerateConfig.ignore_eos
    ),
    compare: Annotated[
        bool, typer.Option(help="Also decode without the draft, interleaved, and print both speeds and their ratio.")
    ] = False,
    repeats: Annotated[int, typer.Option(help="With --compare: interleaved runs; medians are reported.")] = 3,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    dtype: DType = WeightsDType.float32,
    runtime: Runtime = "auto",
    threads: Threads = None,
    kv_cache: KVCache = "f16",
    flash_attn: FlashAttn = True,
):
    """Generate text, speculatively with a draft model (Mamba2/NHA states rolled back by replay, MambaInLlama); a
    .gguf file generates through llama.cpp (--runtime), without a draft."""
    config = GenerateConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        draft_tokens=draft_tokens,
        adaptive=adaptive,
        max_draft_tokens=max_draft_tokens,
        seed=seed,
        stop=tuple(stop or ()),
        chat=chat,
        ignore_eos=ignore_eos,
    )
    _check_json(json_path, [model, draft])
    if pick_runtime(runtime, model) == "llama.cpp":
        refuse_options(
            "llama.cpp",
            {
                "--draft": draft is not None,
                "--draft-layers": draft_layers is not None,
                "--prompt-lookup": prompt_lookup,
                "--compare": compare,
                "--dtype": dtype != WeightsDType.float32,
            },
        )
        from hybridize.generate import format_generate
        from hybridize.llamacpp.generate import generate_gguf
        from hybridize.llamacpp.runtime import gguf_file

        output = generate_gguf(
            gguf_file(model),
            prompt,
            config,
            threads=threads,
            kv_cache=kv_cache,
            flash_attn=flash_attn,
            stream=lambda text: typer.echo(text, nl=False),
        )
        typer.echo()
        typer.echo(format_generate(output))
        _write_json(output.to_dict(), json_path)
        return
    refuse_options(
        "torch", {"--threads": threads is not None, "--kv-cache": kv_cache != "f16", "--no-flash-attn": not flash_attn}
    )
    from hybridize.generate import format_compare, format_generate, load_draft

    target, tokenizer = hybridize.load(model, dtype=dtype.value, decode_layout=True)
    draft_model, draft_tokenizer = load_draft(target, draft, layers=draft_layers, lookup=prompt_lookup)
    if compare:
        result = hybridize.compare_generate(
            target, tokenizer, prompt, config, draft=draft_model, draft_tokenizer=draft_tokenizer, repeats=repeats
        )
        typer.echo(result["speculative"]["first_run"]["text"])
        typer.echo(format_compare(result))
    else:
        output = hybridize.generate(
            target,
            tokenizer,
            prompt,
            config,
            draft=draft_model,
            draft_tokenizer=draft_tokenizer,
            stream=lambda text: typer.echo(text, nl=False),
        )
        typer.echo()
        typer.echo(format_generate(output))
        result = output.to_dict()
    _write_json(result, json_path)


@app.command("run", cls=_Command)
def run_recipe(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="Recipe YAML: model, output and a list of steps (see recipes/).")
    ],
    overwrite: Overwrite = False,
    check: Annotated[bool, typer.Option(help="Only validate the recipe; run nothing.")] = False,
):
    """Run a recipe of steps (convert, distill, eval, bench, export, push); re-running resumes after the last
    completed step."""
    if check:
        from hybridize.pipeline import load_recipe  # the configs only: the steps import their API when they run

        parsed = load_recipe(recipe)
        typer.echo(f"{recipe}: {len(parsed.steps)} valid steps: {', '.join(s.name for s in parsed.steps)}")
        return
    report = hybridize.run(recipe, overwrite=overwrite)
    for entry in report:
        typer.echo(f"step {entry['index']} {entry['step']}: {entry['status']}")


def _environment_error(error: Exception) -> str | None:
    """What to print for an error of the file system, a safetensors file or the network; `None` for any other
    exception, a bug, which keeps its traceback. The classes of a library that was never imported cannot have been
    raised, so they are looked up in `sys.modules` rather than imported here."""
    network = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx", ("TransportError",)),
        ("httpx2", ("TransportError",)),  # huggingface_hub's HTTP client
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        if (loaded := sys.modules.get(module)) is not None:
            network += [getattr(loaded, name) for name in names]
    if isinstance(error, tuple(network)):
        return (
            f"cannot reach the network ({type(error).__name__}: {error}); check the connection and HF_ENDPOINT, or "
            "set HF_HUB_OFFLINE=1 to use only what is cached"
        )
    if (safetensors := sys.modules.get("safetensors")) is not None and isinstance(error, safetensors.SafetensorError):
        return f"unreadable safetensors file: {error}"
    if isinstance(error, OSError):
        if error.strerror and error.filename is not None:
            where = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
            return f"{error.strerror}: {where}"
        return str(error) or type(error).__name__
    return None


def main() -> None:
    try:
        app(prog_name="hybridize")
    except HybridizeError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    except Exception as error:
        if (message := _environment_error(error)) is None:
            raise
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)


__all__ = ["app", "main"]
