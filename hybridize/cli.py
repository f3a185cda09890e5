"""The `hybridize` command line. Thin: parse options -> build the config -> call the API -> save -> print.

A command's options are its config's fields (`hybridize.configs.options.config_command`: name, default and help from
the field), plus the extras it declares (the model, `--output`, runtime options) and, for `convert`, the mixer
settings' own flags (`MIXER_SETTING_FLAGS`). Fast to say no: this module imports only typer, the standard library and
the configs (`hybridize.configs`, torch-free). Each command builds its config first, which checks every option, and
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
from hybridize.configs.options import comma_list, config_command
from hybridize.errors import HybridizeError

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


def _check_json(path: Path | None, inputs: list) -> None:
    """A `--json` path is checked like an output before anything loads (replacing an existing file is fine)."""
    if path is not None:
        hybridize.check_output(path, overwrite=True, inputs=inputs)


def _write_json(result: dict, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {path}")


# Mixer settings with a flag of their own (the others: --mixer-option KEY=VALUE). The settings classes live in
# `hybridize.modeling`, which imports torch, so these are declared here rather than read from them.
MIXER_SETTING_FLAGS = {
    "chunk_size": ("Mamba2 / NHA chunk length (speed only; default 64 / 32).", int),
    "sinks": ("Streaming: initial tokens kept (default 4).", int),
    "window": ("Streaming / NHA: recent tokens attended exactly (default 1020 / 64).", int),
    "slots": ("NHA: slot memories per KV head (default 64).", int),
    "w_last": ("Streaming: last queries a lazy ratio averages (default 64).", int),
}
MIXER_INIT_NAMES = ("--init", "--mixer-init")


@app.command(cls=_Command)
@config_command(
    ConvertConfig,
    extras=("model", "output", "overwrite", "trust_remote_code"),
    names={"mixer_init": MIXER_INIT_NAMES, "mixer_settings": ("--mixer-option",), "init_options": ("--init-option",)},
    settings=MIXER_SETTING_FLAGS,
)
def convert(
    model: ModelArg,
    output: Output,
    config: ConvertConfig,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Convert attention layers of a pretrained model into a hybrid: q/k/v/o reused (MambaInLlama), each new mixer's
    readout calibrated on the source attention's output, layers spread evenly or chosen by sensitivity."""
    hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    from hybridize.convert import check_convert
    from hybridize.sources import load_config

    if config.attn_layers is not None:  # the only check against the model; an uncached GGUF's config takes seconds
        check_convert(load_config(model, trust_remote_code=trust_remote_code), config)

    # layer by layer from the source's shards: one source layer and one hybrid layer in memory at a time
    hybridize.convert_to_disk(
        model, output, config, overwrite=overwrite, trust_remote_code=trust_remote_code, progress=True
    )

    layers = load_config(str(output)).mixer_types
    if config.attn_layers is not None or config.full_every:
        kept = ", ".join(str(i) for i, t in enumerate(layers) if t == "attention") or "none"
        how = "explicit" if config.attn_layers is not None else f"--full-every {config.full_every}"
        chosen = f"{how}: attention kept in layers {kept}"
    else:
        chosen = config.select
    typer.echo(
        f"converted {sum(t != 'attention' for t in layers)}/{len(layers)} layers to {config.mixer} ({chosen}); "
        f"wrote {output}"
    )


@app.command(cls=_Command)
@config_command(
    AnalyzeConfig, extras=("model", "output", "overwrite", "trust_remote_code"), names={"mixer_init": MIXER_INIT_NAMES}
)
def analyze(
    model: ModelArg,
    config: AnalyzeConfig,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory for lazy_ratio.json and lazy_ratio.png.")
    ] = None,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Per-layer lazy ratio (LightTransfer): how much attention each layer puts on sinks + a recent window; with
    --mixer, also what converting each layer alone costs (the scores --select sensitivity uses)."""
    if output is not None:
        hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    from hybridize.analyze import format_analysis, save_analysis

    loaded, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    result = hybridize.analyze(loaded, config, tokenizer=tokenizer, progress=True)
    typer.echo(format_analysis(result))
    if output is not None:
        save_analysis(result, output, overwrite=overwrite, inputs=[model])
        typer.echo(f"wrote {output}")


@app.command(cls=_Command)
@config_command(ExportConfig, extras=("model", "output", "overwrite"))
def export(
    model: ModelArg,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Directory (native) or .gguf file (--to gguf) to create, atomically."),
    ],
    config: ExportConfig,
    overwrite: Overwrite = False,
):
    """Write a hybrid as a native transformers model (GraniteMoeHybrid) that loads with no custom code, or with
    --to gguf as one GGUF file for llama.cpp, Ollama and llama-cpp-python (granitehybrid; llama when every layer is
    attention)."""
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
        size = output.stat().st_size / 2**20
        typer.echo(f"wrote {output} (gguf {arch}, {config.outtype}, {size:.1f} MiB; {source})")
        return
    hybridize.save(hybridize.export(hybrid, config), output, tokenizer=tokenizer, overwrite=overwrite, inputs=[model])
    typer.echo(f"wrote {output} ({config.to})")


@app.command("eval", cls=_Command)
@config_command(
    EvalConfig,
    extras=(
        "model",
        "baseline",
        "json_path",
        "trust_remote_code",
        "dtype",
        "runtime",
        "threads",
        "kv_cache",
        "flash_attn",
    ),
)
def evaluate(
    model: ModelArg,
    config: EvalConfig,
    baseline: Annotated[
        str | None, typer.Option(help="Reference model: KL and top-1 agreement, or with --tasks the same tasks.")
    ] = None,
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
    from hybridize.provenance import MANIFEST_NAME, record_eval
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
    result = hybridize.evaluate(loaded, config, tokenizer=tokenizer, baseline=reference, progress=True)
    if config.tasks:
        typer.echo(f"max_length {result['max_length']}" + (f", limit {config.limit}" if config.limit else ""))
        typer.echo(format_results(result["tasks"], result.get("baseline_tasks")))
    else:
        for key, value in result.items():
            typer.echo(f"{key:>20}  {value:.4f}" if isinstance(value, float) else f"{key:>20}  {value}")
    _write_json(result, json_path)
    if resolve(model).kind == "dir":
        try:
            typer.echo(f"recorded in {record_eval(Path(model), config, result, baseline=baseline)}")
        except OSError as error:  # a read-only model directory: the results above still stand
            typer.echo(f"warning: not recorded in {Path(model) / MANIFEST_NAME}: {error.strerror}", err=True)


@app.command(cls=_Command)
@config_command(
    BenchConfig,
    extras=(
        "model",
        "baseline",
        "plot",
        "json_path",
        "dtype",
        "decode_layout",
        "runtime",
        "threads",
        "kv_cache",
        "flash_attn",
    ),  # fmt: skip
    names={"contexts": ("--context",), "batch_sizes": ("--batch", "--batch-size")},
)
def bench(
    model: ModelArg,
    config: BenchConfig,
    baseline: Annotated[
        str | None, typer.Option(help="Model measured side by side, e.g. the source; any causal LM.")
    ] = None,
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
                "--batch": config.batch_sizes != (1,),
                "--plot": plot is not None,
                "--dtype": dtype != WeightsDType.float32,
                "--no-decode-layout": not decode_layout,
            },
        )
        gguf_config = LlamaCppBenchConfig(
            contexts=config.contexts,
            threads=None if threads is None else comma_list(threads, "--threads", int),
            new_tokens=config.new_tokens,
            warmup_tokens=config.warmup_tokens,
            repeats=config.repeats,
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
    _check_json(json_path, [model, baseline])
    from hybridize.evaluate.bench import check_bench, format_bench, load_causal_lm, plot_bench
    from hybridize.sources import load_config

    for spec in [model, baseline] if baseline else [model]:
        check_bench(load_config(spec), config)
    loaded, tokenizer = load_causal_lm(model, dtype=dtype.value, decode_layout=decode_layout)
    reference = load_causal_lm(baseline)[0] if baseline else None
    result = hybridize.bench(loaded, config, tokenizer=tokenizer, baseline=reference, progress=True)
    typer.echo(format_bench(result))
    _write_json(result, json_path)
    if plot is not None:
        typer.echo(f"wrote {plot_bench(result, plot)}")


@app.command(cls=_Command)
@config_command(
    PushConfig,
    extras=("model_dir",),
    arguments=("repo_id",),
    names={"commit_message": ("--message", "--commit-message")},
)
def push(
    model_dir: Annotated[
        Path, typer.Argument(metavar="MODEL_DIR", help="Saved model directory (config.json + safetensors).")
    ],
    config: PushConfig,
):
    """Upload a saved model to the Hugging Face Hub with a model card written from its hybridize.json.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.
    """
    typer.echo(hybridize.push(model_dir, config))


@app.command(cls=_Command)
@config_command(
    DistillConfig, extras=("student", "teacher", "output", "eval_every", "save_every", "resume", "overwrite")
)
def distill(
    student: Annotated[
        str,
        typer.Argument(metavar="STUDENT", help="The hybrid to train: a directory written by convert (or distill)."),
    ],
    teacher: Annotated[str, typer.Option(help="The reference model, usually the one the student came from.")],
    output: Output,
    config: DistillConfig,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations (0: start and end).")] = (
        EVAL_EVERY
    ),
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only on Ctrl-C).")] = SAVE_EVERY,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in OUTPUT.distill/.")] = False,
    overwrite: Overwrite = False,
):
    """Distill a hybrid towards its teacher (layerwise or end-to-end); Ctrl-C saves a checkpoint for --resume."""
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
        typer.echo(f"distilled {config.stage}: {metrics['tokens']} tokens at {metrics['tokens_per_s']} tokens/s")
        if "end" in metrics:
            typer.echo(
                f"held-out perplexity {metrics['start']['perplexity']:.2f} -> {metrics['end']['perplexity']:.2f} "
                f"(teacher {metrics['teacher_perplexity']:.2f}), KL {metrics['end']['kl']:.4f}"
            )
        typer.echo(f"wrote {output}")


@app.command(cls=_Command)
@config_command(PruneConfig, extras=("model", "output", "overwrite", "trust_remote_code"))
def prune(
    model: ModelArg,
    output: Output,
    config: PruneConfig,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Prune a hybrid or dense model (Minitron width/depth, group-aware Mamba2 heads) to given sizes or a budget."""
    hybridize.check_output(output, overwrite=overwrite, inputs=[model])
    source, tokenizer = hybridize.load(model, trust_remote_code=trust_remote_code)
    pruned = hybridize.prune(source, config, tokenizer=tokenizer, progress=True)
    hybridize.save(pruned, output, tokenizer=tokenizer, overwrite=overwrite, inputs=[model])
    from hybridize.compress.prune import format_prune

    typer.echo(format_prune(pruned.hybridize_steps[-1]["metrics"]))
    typer.echo(f"wrote {output}")


@app.command(cls=_Command)
@config_command(FactorizeConfig, extras=("model", "output", "overwrite", "trust_remote_code"))
def factorize(
    model: ModelArg,
    output: Output,
    config: FactorizeConfig,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Factorize linear layers into low-rank pairs (SVD-LLM, ASVD, FWSVD or plain SVD); a dense model is first
    converted to a hybrid that keeps every attention layer."""
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
@config_command(FuseConfig, extras=("models", "output", "overwrite", "trust_remote_code"))
def fuse(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODELS", help="Models to fuse (alias, directory, .gguf, Hub id); the first is the anchor."
        ),
    ],
    output: Output,
    config: FuseConfig,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Fuse models of one family by optimal-transport alignment onto the first, then averaging; --width < 1 fuses
    into a narrower copy of the anchor."""
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
@config_command(
    GenerateConfig,
    extras=(
        "model",
        "prompt",
        "draft",
        "draft_layers",
        "prompt_lookup",
        "compare",
        "repeats",
        "json_path",
        "dtype",
        "runtime",
        "threads",
        "kv_cache",
        "flash_attn",
    ),  # fmt: skip
    names={"do_sample": ("--sample/--no-sample",)},
    repeat=("stop",),
)
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="The prompt (with --chat: the user message).")],
    config: GenerateConfig,
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
            target,
            config,
            tokenizer=tokenizer,
            prompt=prompt,
            draft=draft_model,
            draft_tokenizer=draft_tokenizer,
            repeats=repeats,
        )
        typer.echo(result["speculative"]["first_run"]["text"])
        typer.echo(format_compare(result))
    else:
        output = hybridize.generate(
            target,
            config,
            tokenizer=tokenizer,
            prompt=prompt,
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
