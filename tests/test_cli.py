"""The command line end to end on tiny real checkpoints: outputs, exit codes and messages for bad input, and that
bad input writes nothing and leaves the input untouched."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny import run_cli, save_tiny, word_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hybridize
from hybridize.export import ExportConfig, export


@pytest.fixture
def llama_dir(tmp_path):
    return save_tiny(tmp_path / "llama")


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_convert_then_export(llama_dir, tmp_path):
    before = _digest(llama_dir)
    code, out = run_cli("convert", llama_dir, "--ratio", "0.5", "-o", tmp_path / "h")
    assert code == 0, out
    assert "converted 2/4 layers" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert model.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    assert (tmp_path / "h" / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    assert _digest(llama_dir) == before

    code, out = run_cli("export", tmp_path / "h", "-o", tmp_path / "native")
    assert code == 0, out
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(native(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    steps = json.loads((tmp_path / "native" / "hybridize.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["convert", "export"]


def test_explicit_attention_layers(llama_dir, tmp_path):
    code, out = run_cli("convert", llama_dir, "--attn-layers", "0,3", "-o", tmp_path / "h")
    assert code == 0, out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "h").config.mixer_types == [
        "attention",
        "mamba2",
        "mamba2",
        "attention",
    ]


@pytest.mark.parametrize("ratio", ["1.5", "-0.25"])
def test_bad_ratio(llama_dir, tmp_path, ratio):
    code, out = run_cli("convert", llama_dir, "--ratio", ratio, "-o", tmp_path / "h")
    assert code == 1 and "error: ratio must be in [0, 1]" in out
    assert not (tmp_path / "h").exists()


def test_unsupported_architecture(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    code, out = run_cli("convert", tmp_path / "gpt2", "-o", tmp_path / "h")
    assert code == 1 and "model_type 'gpt2' is not supported" in out and "llama" in out
    assert not (tmp_path / "h").exists()


def test_missing_path(tmp_path):
    code, out = run_cli("convert", tmp_path / "nowhere", "-o", tmp_path / "h")
    assert code == 1 and "nowhere" in out
    assert not (tmp_path / "h").exists()


def test_corrupt_safetensors(llama_dir, tmp_path):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _digest(llama_dir)
    code, out = run_cli("convert", llama_dir, "-o", tmp_path / "h")
    assert code == 1 and "model.safetensors" in out
    assert not (tmp_path / "h").exists() and _digest(llama_dir) == before


def test_existing_output(llama_dir, tmp_path):
    (tmp_path / "h").mkdir()
    code, out = run_cli("convert", llama_dir, "-o", tmp_path / "h")
    assert code == 1 and "already exists" in out and "--overwrite" in out
    assert list((tmp_path / "h").iterdir()) == []


def test_export_of_a_model_without_native_equivalent(llama_dir, tmp_path):
    assert run_cli("convert", llama_dir, "--ratio", "1", "-o", tmp_path / "h")[0] == 0
    code, out = run_cli("export", tmp_path / "h", "-o", tmp_path / "native")
    assert code == 1 and "no attention layer" in out and not (tmp_path / "native").exists()


def test_usage_error_exit_code(tmp_path):
    code, _ = run_cli("convert", "llama", "--ratio", "half", "-o", tmp_path / "h")
    assert code == 2


def test_streaming_conversion_with_lazy_selection(llama_dir, tmp_path):
    code, out = run_cli(
        "convert",
        llama_dir,
        "--mixer",
        "streaming",
        "--select",
        "lazy",
        "--sinks",
        "2",
        "--window",
        "16",
        "--calibration-docs",
        "2",
        "--calibration-len",
        "64",
        "-o",
        tmp_path / "lt",
    )
    assert code == 0, out
    assert "converted 2/4 layers to streaming (lazy)" in out
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "lt").config
    assert config.mixers["streaming"] == {"sinks": 2, "window": 16}
    steps = json.loads((tmp_path / "lt" / "hybridize.json").read_text())["steps"]
    assert steps[-1]["config"]["select"] == "lazy" and len(steps[-1]["metrics"]["lazy_ratio"]) == 4


def test_dynamic_needs_streaming(llama_dir, tmp_path):
    code, out = run_cli("convert", llama_dir, "--select", "dynamic", "-o", tmp_path / "d")
    assert code == 1 and "error: select='dynamic'" in out and not (tmp_path / "d").exists()


def test_analyze_prints_writes_and_warns(llama_dir, tmp_path):
    code, out = run_cli(
        "analyze",
        llama_dir,
        "--sinks",
        "2",
        "--window",
        "16",
        "--num-docs",
        "2",
        "--seq-len",
        "64",
        "-o",
        tmp_path / "a",
    )
    assert code == 0, out
    assert "lazy ratio" in out and "selected (2 laziest" in out and "warning" not in out
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"lazy_ratio.json", "lazy_ratio.png"}
    code, out = run_cli("analyze", llama_dir, "--window", "1020", "--num-docs", "1", "--seq-len", "256")
    assert code == 0 and "warning: the calibration documents have 256 tokens" in out


def test_eval_on_a_data_file_after_a_prompt(llama_dir, tmp_path):
    import hybridize
    from hybridize.evaluate import EvalConfig

    data = tmp_path / "docs.txt"
    data.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    code, out = run_cli(
        "eval", llama_dir, "--data", data, "--seq-len", "32", "--max-tokens", "64", "--prompt-len", "8",
        "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, out
    result = json.loads((tmp_path / "r.json").read_text())
    model, tokenizer = hybridize.load(str(llama_dir))
    config = EvalConfig(data=str(data), seq_len=32, max_tokens=64, prompt_len=8)
    assert result == {**hybridize.evaluate(model, config, tokenizer=tokenizer), "data": str(data)}
    assert result["prompt_len"] == 8 and result["num_blocks"] == 2


@pytest.fixture
def words_file(tmp_path):
    import random

    rng = random.Random(0)
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(2, 128)}" for _ in range(70)) for _ in range(40)))
    return path


def test_convert_init_and_sensitivity_options(llama_dir, tmp_path, words_file, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    calibration = ["--calibration", words_file, "--calibration-docs", "4", "--calibration-len", "64"]
    code, out = run_cli("convert", llama_dir, "--ratio", "0.5", *calibration, "-o", tmp_path / "cal")
    assert code == 0, out
    step = json.loads((tmp_path / "cal" / "hybridize.json").read_text())["steps"][-1]
    assert step["config"]["mixer_init"] == "calibrated" and sorted(step["metrics"]["readout"]) == ["0", "2"]

    code, out = run_cli("convert", llama_dir, "--init", "zero", "-o", tmp_path / "zero")
    assert code == 0, out
    zero = AutoModelForCausalLM.from_pretrained(tmp_path / "zero")
    assert (zero.model.layers[0].mixer.out_proj.weight == 0).all()

    code, out = run_cli(
        "convert", llama_dir, "--select", "sensitivity", "--ratio", "0.25", *calibration, "-o", tmp_path / "s"
    )
    assert code == 0, out
    step = json.loads((tmp_path / "s" / "hybridize.json").read_text())["steps"][-1]
    scores = step["metrics"]["sensitivity_kl"]
    assert step["metrics"]["converted_layers"] == [min(range(4), key=scores.__getitem__)]

    code, out = run_cli(
        "analyze",
        llama_dir,
        "--mixer",
        "mamba2",
        "--data",
        words_file,
        "--num-docs",
        "4",
        "--seq-len",
        "64",
        "--window",
        "8",
        "--sinks",
        "1",
        "--w-last",
        "4",
    )
    assert code == 0, out
    assert "KL alone (mamba2)" in out and "least sensitive to mamba2" in out

    code, out = run_cli("convert", llama_dir, "--mixer", "streaming", "--init", "calibrated", "-o", tmp_path / "bad")
    assert code == 1 and "use mixer_init='attention'" in out and not (tmp_path / "bad").exists()


def test_distill_layer_loss_and_generated_data_options(llama_dir, tmp_path, words_file):
    code, out = run_cli("convert", llama_dir, "--init", "attention", "-o", tmp_path / "h")
    assert code == 0, out
    budget = ["--tokens", "64", "--seq-len", "16", "--batch-size", "2", "--eval-tokens", "32"]
    code, out = run_cli(
        "distill",
        tmp_path / "h",
        "--teacher",
        llama_dir,
        "--stage",
        "layerwise",
        "--layer-loss",
        "mixer",
        "--data",
        f"generate:48:{words_file}",
        *budget,
        "-o",
        tmp_path / "d",
    )
    assert code == 0, out
    step = json.loads((tmp_path / "d" / "hybridize.json").read_text())["steps"][-1]
    assert step["config"]["layer_loss"] == "mixer" and step["config"]["data"].startswith("generate:48")
    assert len(list(tmp_path.glob("d.generated-*.jsonl"))) == 1
    code, out = run_cli(
        "distill", tmp_path / "h", "--teacher", llama_dir, "--data", "generate:lots", *budget, "-o", tmp_path / "bad"
    )
    assert code == 1 and "generate:" in out and not (tmp_path / "bad").exists()


def test_full_every_reports_the_layers_it_kept(llama_dir, tmp_path):
    code, out = run_cli("convert", llama_dir, "--full-every", "2", "--init", "attention", "-o", tmp_path / "h")
    assert code == 0, out
    assert "converted 2/4 layers to mamba2 (--full-every 2: attention kept in layers 1, 3)" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "h").config.mixer_types == ["mamba2", "attention"] * 2


def test_convert_init_and_mixer_options(llama_dir, tmp_path):
    """--init-option goes into init_options, --mixer-option into mixer_settings (next to their own flags, which
    must agree with them); both are recorded and used."""
    code, out = run_cli(
        "convert", llama_dir, "--init", "attention", "--init-option", "conv_init=random",
        "--mixer-option", "chunk_size=8", "--mixer-option", "state_size=16", "-o", tmp_path / "h",
    )  # fmt: skip
    assert code == 0, out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert model.config.mixers["mamba2"] == {"chunk_size": 8, "state_size": 16}
    assert (model.model.layers[0].mixer.conv1d.weight[:, 0, :-1] != 0).any()  # not the delta conv
    step = json.loads((tmp_path / "h" / "hybridize.json").read_text())["steps"][-1]
    assert step["config"]["init_options"] == {"conv_init": "random"} and step["config"]["conv_init"] == "random"
    for args, message in [
        (["--init-option", "conv_init"], "--init-option takes KEY=VALUE"),
        (["--init-option", "conv_init=random", "--conv-init", "delta"], "disagree"),
        (["--mixer", "nha", "--init-option", "conv_init=random"], "do not apply to the nha mixer"),
        (["--mixer-option", "chunk_size=8", "--chunk-size", "16"], "disagree"),
    ]:
        code, out = run_cli("convert", llama_dir, *args, "-o", tmp_path / "bad")
        assert code == 1 and message in out and not (tmp_path / "bad").exists(), (args, out)


def test_help_at_80_columns_names_every_option_and_the_mixers(monkeypatch):
    import typer.main

    from hybridize.cli import app
    from hybridize.modeling import MIXERS

    monkeypatch.setenv("COLUMNS", "80")
    for name, command in typer.main.get_command(app).commands.items():
        code, out = run_cli(name, "--help")
        assert code == 0, out
        usage = out.strip().splitlines()[0]
        assert usage.startswith(f"Usage: hybridize {name} [OPTIONS]") and "{" not in usage, usage
        assert "…" not in out and max(map(len, out.splitlines())) <= 80
        options = [opt for param in command.params for opt in param.opts if opt.startswith("-")]
        assert [opt for opt in options if opt not in out.replace(",", " ").split()] == [], name
    _, out = run_cli("convert", "--help")
    mixer_help = out.split("\n  --mixer ")[1].split("\n  --")[0]
    assert all(mixer in mixer_help for mixer in set(MIXERS) - {"attention"}), mixer_help


@pytest.mark.parametrize(
    "make_error, message",
    [
        (lambda: OSError(28, "No space left on device", "/full/model"), "error: No space left on device: /full/model"),
        (lambda: PermissionError(13, "Permission denied", "/ro/out"), "error: Permission denied: /ro/out"),
        (lambda: __import__("safetensors").SafetensorError("HeaderTooLarge"), "error: unreadable safetensors file"),
        (
            lambda: __import__("httpx2").ConnectError("[Errno 111] Connection refused"),
            "error: cannot reach the network",
        ),
        (lambda: __import__("requests").ConnectionError("Max retries exceeded"), "error: cannot reach the network"),
        (lambda: TimeoutError("timed out"), "error: cannot reach the network"),
    ],
    ids=["no-space", "permission", "safetensors", "httpx", "requests", "timeout"],
)
def test_environment_errors_are_one_error_line(llama_dir, monkeypatch, make_error, message):
    import hybridize

    def load(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(hybridize, "load", load)
    code, out = run_cli("eval", llama_dir)
    assert code == 1 and out.startswith(message) and out.count("\n") == 1, out
    assert "Traceback" not in out


def test_a_bug_keeps_its_traceback(llama_dir, monkeypatch):
    import hybridize

    def load(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(hybridize, "load", load)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli("eval", llama_dir)


def test_an_output_under_a_regular_file_is_an_error_line(llama_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    code, out = run_cli(
        "eval", llama_dir, "--seq-len", "16", "--max-tokens", "64", "--json", tmp_path / "file" / "r.json"
    )
    assert code == 1 and out.splitlines()[-1].startswith("error: ") and str(tmp_path / "file") in out, out
    assert (tmp_path / "file").read_text() == "not a directory"


def test_interrupted_recipe_says_how_to_resume_it(llama_dir, tmp_path, monkeypatch):
    from hybridize import pipeline

    real_distill = pipeline.distill

    def interrupted_distill(*args, **kwargs):
        def ctrl_c(record):
            raise KeyboardInterrupt  # what Ctrl-C turns into at a step boundary

        return real_distill(*args, **kwargs, on_step=ctrl_c)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {llama_dir}\noutput: {tmp_path / 'out'}\nsteps:\n"
        "  - convert: {ratio: 0.5, mixer_init: attention}\n"
        f"  - distill: {{teacher: {llama_dir}, stage: layerwise, tokens: 128, seq_len: 16, batch_size: 2, "
        "eval_tokens: 0}\n"
    )
    monkeypatch.setattr(pipeline, "distill", interrupted_distill)
    code, out = run_cli("run", recipe)
    assert code == 1 and "interrupted at step 1/" in out and "--resume" not in out, out
    assert f"run `hybridize run {recipe}` again to continue" in out
    monkeypatch.setattr(pipeline, "distill", real_distill)
    code, out = run_cli("run", recipe)  # what the message says to do
    assert code == 0 and "convert: skipped (done)" in out and "distill: ran" in out, out


def test_readme_test_command_is_what_ci_runs():
    root = Path(__file__).parent.parent
    lines = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    install = next(line for line in lines if line.startswith("pip install")).removesuffix(" || exit 1")
    pytest_line = next(line for line in lines if line.startswith("python -m pytest"))
    assert f"{install} && {pytest_line}" in (root / "README.md").read_text().splitlines()


# --- issue 14: outputs never overlap inputs, read-only models still evaluate --------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("convert", "{m}", "--ratio", "0.5", "--mixer-init", "attention", "-o", "{o}"),
        ("export", "{m}", "-o", "{o}"),
        ("prune", "{m}", "--ffn", "32", "-o", "{o}"),
        ("eval", "{m}", "--seq-len", "16", "--max-tokens", "64", "--json", "{o}/r.json"),
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("where", ["inside", "same"])
def test_no_command_writes_into_or_over_its_input(llama_dir, tmp_path, command, where):
    before = _digest(llama_dir)
    output = llama_dir / "sub" if where == "inside" else llama_dir
    args = [part.format(m=llama_dir, o=output) for part in command]
    code, out = run_cli(*args, *(["--overwrite"] if command[0] != "eval" else []))
    assert code == 1 and out.splitlines()[-1].startswith("error: output "), out
    assert "input" in out.splitlines()[-1]
    assert _digest(llama_dir) == before and not (llama_dir / "sub").exists()


def test_eval_of_a_read_only_model_prints_its_results_and_warns(llama_dir, tmp_path):
    import shutil
    import subprocess

    point = tmp_path / "ro"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(llama_dir, point / "m")
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        code, out = run_cli("eval", point / "m", "--seq-len", "16", "--max-tokens", "64")
        assert code == 0, out
        assert "perplexity" in out and "warning: not recorded in" in out and "Read-only file system" in out
    finally:
        subprocess.run(["umount", str(point)], check=False)


def test_bench_of_a_native_export_against_both_source_baselines(llama_dir, tmp_path):
    """Any causal LM benches: the native GraniteMoeHybrid export (which `convert` would refuse) as the model, and as
    the baseline; batch sizes 1 and 4; the table, the JSON and the PNG carry the floor and both baselines."""
    source, _ = hybridize.load(str(llama_dir))
    native = export(
        hybridize.convert(source, hybridize.ConvertConfig(mixer_init="attention", ratio=0.5)), ExportConfig()
    )
    hybridize.save(native, tmp_path / "native", tokenizer=word_tokenizer())
    short = ["--context", "16", "--new-tokens", "2", "--warmup-tokens", "1", "--repeats", "1"]
    code, out = run_cli(
        "bench", tmp_path / "native", "--baseline", llama_dir, *short, "--batch-size", "1,4",
        "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png",
    )  # fmt: skip
    assert code == 0, out
    assert "read bandwidth" in out and "vs static cache" in out and "x floor" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["machine"]["read_bandwidth_gb_per_s"] > 0
    assert result["models"]["model"]["class"] == "GraniteMoeHybridForCausalLM"
    assert result["config"]["warmup_tokens"] == 1 and result["config"]["baseline_static"] is True
    assert [row["batch_size"] for row in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert {"decode_speedup", "decode_speedup_static"} <= set(row["ratios"])
        assert all(row[name]["floor_ms_per_token"] > 0 for name in ("model", "baseline", "baseline_static"))
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"

    code, out = run_cli("bench", llama_dir, "--baseline", tmp_path / "native", *short, "--no-baseline-static")
    assert code == 0, out
    assert "baseline" in out and "vs static cache" not in out


def test_bench_dtype_and_decode_layout(llama_dir, tmp_path):
    """MODEL is loaded in --dtype with the decode layout for float32 weights (unless --no-decode-layout; bfloat16
    keeps the standard layout); the baseline as it is."""
    short = ["--context", "16", "--new-tokens", "2", "--warmup-tokens", "1", "--repeats", "1", "--no-baseline-static"]
    code, out = run_cli("bench", llama_dir, "--baseline", llama_dir, *short, "--json", tmp_path / "a.json")
    assert code == 0, out
    models = json.loads((tmp_path / "a.json").read_text())["models"]
    assert models["model"]["dtype"] == "float32" and models["model"]["decode_layout"] is True
    assert models["baseline"]["dtype"] == "float32" and models["baseline"]["decode_layout"] is False
    code, out = run_cli("bench", llama_dir, *short, "--dtype", "bfloat16", "--json", tmp_path / "b.json")
    assert code == 0, out
    model = json.loads((tmp_path / "b.json").read_text())["models"]["model"]
    assert model["dtype"] == "bfloat16" and model["decode_layout"] is False
    code, out = run_cli("bench", llama_dir, *short, "--no-decode-layout", "--json", tmp_path / "c.json")
    assert code == 0, out
    assert json.loads((tmp_path / "c.json").read_text())["models"]["model"]["decode_layout"] is False


# --- issue 17 E: the options are read from the configs ---------------------------------------------------------------


def _commands():
    import typer.main

    from hybridize.cli import app

    return typer.main.get_command(app).commands


def test_every_option_maps_to_a_config_field_a_mixer_setting_or_a_declared_extra():
    """Built from click's command objects: an option added by hand without declaring it fails here, and so does a
    config field that has no option."""
    import dataclasses

    from hybridize import cli

    checked = 0
    for name, command in _commands().items():
        function = command.callback.__wrapped__ if name != "run" else None
        while function is not None and not hasattr(function, "config_class"):
            function = getattr(function, "__wrapped__", None)
        if name == "run":  # the recipe command has no config of its own
            assert {p.name for p in command.params} == {"recipe", "overwrite", "check"}
            continue
        assert function is not None, name
        fields = {field.name for field in dataclasses.fields(function.config_class)}
        params = {p.name for p in command.params}
        unmapped = params - fields - set(function.settings) - set(function.extras)
        assert unmapped == set(), (name, unmapped)
        assert fields <= params, (name, fields - params)  # every field has its option
        assert set(function.settings) <= set(cli.MIXER_SETTING_FLAGS), name
        checked += 1
    assert checked == 11


def test_help_shows_each_commands_config_docstring():
    from hybridize.configs.options import field_help

    texts = {
        "convert": ("ConvertConfig", "calibration_docs"),
        "analyze": ("AnalyzeConfig", "w_last"),
        "export": ("ExportConfig", "to"),
        "eval": ("EvalConfig", "split"),
        "bench": ("BenchConfig", "warmup_tokens"),
        "push": ("PushConfig", "endpoint"),
        "distill": ("DistillConfig", "kl_reduction"),
        "prune": ("PruneConfig", "rescale_norms"),
        "factorize": ("FactorizeConfig", "sensitivity_tokens"),
        "fuse": ("FuseConfig", "reg"),
        "generate": ("GenerateConfig", "top_p"),
    }
    assert set(texts) == set(_commands()) - {"run"}
    for command, (config, field) in texts.items():
        help_text = field_help(getattr(hybridize.configs, config))[field]
        code, out = run_cli(command, "--help")
        assert code == 0 and len(help_text) > 10, (command, out)
        assert "".join(help_text.split()) in "".join(out.split()), (command, field, help_text)  # wrapped anyhow


def test_options_that_were_missing_reach_the_config(monkeypatch, tmp_path):
    """Fields that had no option before (distill's optimiser, prune's search, eval's split, push's endpoint) reach
    the config each command builds, in the types the config wants."""
    seen = {}

    def capture(name):
        def call(*args, **kwargs):
            seen[name] = next(a for a in (*args, *kwargs.values()) if type(a).__name__.endswith("Config"))
            raise hybridize.errors.HybridizeError("stop here")

        return call

    import hybridize.compress.prune
    import hybridize.distill
    import hybridize.evaluate.perplexity
    import hybridize.hub  # imported first: importing a submodule later would set its function back

    monkeypatch.setattr(hybridize, "load", lambda *a, **k: (None, None))
    for name in ("distill", "prune", "evaluate", "push"):
        monkeypatch.setattr(hybridize, name, capture(name))
    model = save_tiny(tmp_path / "m")
    code, out = run_cli(
        "distill", model, "--teacher", model, "-o", tmp_path / "d", "--betas", "0.8,0.9", "--weight-decay", "0.1",
        "--kl-reduction", "batchmean", "--mixed-precision", "no", "--heldout-ratio", "0.1", "--min-lr-ratio", "0",
        "--warmup-ratio", "0.2", "--max-grad-norm", "0.5", "--lora-alpha", "8", "--tokens", "2K",
    )  # fmt: skip
    assert code == 1 and "stop here" in out, out
    config = seen["distill"]
    assert config.betas == (0.8, 0.9) and config.weight_decay == 0.1 and config.kl_reduction == "batchmean"
    assert config.mixed_precision == "no" and config.heldout_ratio == 0.1 and config.min_lr_ratio == 0
    assert (
        config.warmup_ratio == 0.2 and config.max_grad_norm == 0.5 and config.lora_alpha == 8 and config.tokens == 2000
    )
    code, out = run_cli(
        "prune", model, "--params", "0.8", "--no-rescale-norms", "--score-blocks", "2", "--max-width-pruning", "0.3",
        "--max-depth-pruning", "0.1", "--num-candidates", "3", "-o", tmp_path / "p",
    )  # fmt: skip
    assert code == 1 and "stop here" in out, out
    config = seen["prune"]
    assert (config.rescale_norms, config.score_blocks, config.num_candidates) == (False, 2, 3)
    assert (config.max_width_pruning, config.max_depth_pruning) == (0.3, 0.1)
    code, out = run_cli("eval", model, "--split", "train", "--tasks", "wiki_ppl, lambada_wiki")
    assert code == 1 and seen["evaluate"].split == "train", out
    assert seen["evaluate"].tasks == ("wiki_ppl", "lambada_wiki")
    code, out = run_cli("push", model, "someone/m", "--endpoint", "http://localhost:1", "--message", "hi")
    assert code == 1 and seen["push"].endpoint == "http://localhost:1" and seen["push"].commit_message == "hi", out
    code, out = run_cli("push", model, "someone/m", "--endpoint", "ftp://x")
    assert code == 1 and "not an http(s) URL" in out
    code, out = run_cli("distill", model, "--teacher", model, "-o", tmp_path / "d", "--betas", "0.9,x")
    assert code == 1 and "--betas takes comma-separated numbers, got '0.9,x'" in out


def test_recipes_read_values_with_the_same_fields(tmp_path):
    """A recipe's YAML lists become the tuples the config wants; every field of a step's config is a known key."""
    from hybridize.configs import DistillConfig
    from hybridize.configs.options import coerce, config_fields
    from hybridize.pipeline import parse_recipe

    recipe = parse_recipe(
        "model: llama\noutput: out\nsteps:\n  - convert: {attn_layers: [3, 1], init_options: {conv_init: random}}\n"
        "  - distill: {teacher: llama, betas: [0.8, 0.9], kl_reduction: batchmean}\n"
        "  - bench: {contexts: [16, 32], batch_sizes: [1, 2]}\n"
    )
    convert, distill, bench = (step.config for step in recipe.steps)
    assert convert.attn_layers == (1, 3) and convert.conv_init == "random"
    assert distill.betas == (0.8, 0.9) and distill.kl_reduction == "batchmean"
    assert bench.contexts == (16, 32) and bench.batch_sizes == (1, 2)
    assert list(config_fields(DistillConfig)) == [f.name for f in __import__("dataclasses").fields(DistillConfig)]
    assert coerce(DistillConfig, {"betas": [0.8, 0.9], "data": "wiki"}) == {"betas": (0.8, 0.9), "data": "wiki"}


def test_every_config_field_is_documented_for_its_option():
    """The option help is the field's text in its class's `Args:` section: every field of every config a command
    or recipe reads has one, and the section names no field that does not exist."""
    import dataclasses

    from hybridize.configs.convert import Mamba2InitConfig
    from hybridize.configs.llamacpp import LlamaCppBenchConfig
    from hybridize.configs.options import field_help

    for cls in [*(getattr(hybridize.configs, name) for name in hybridize.configs.__all__), LlamaCppBenchConfig,
                Mamba2InitConfig]:  # fmt: skip
        helps = field_help(cls)
        assert set(helps) == {field.name for field in dataclasses.fields(cls)}, cls.__name__
        assert all(text and "`" not in text and not text.startswith(("(", ":")) for text in helps.values()), helps
    assert field_help(hybridize.configs.BenchConfig)["batch_sizes"].startswith("Sequences decoded together")
