"""Fast to say no: `import hybridize`, `hybridize --help`, `--version`, every subcommand's `--help`, usage errors and
config errors (every command's, a recipe's) import none of the heavy libraries (checked in `sys.modules` of a fresh
process, not timed); the configs are one class under every import path and the CLI's option defaults are theirs; the
lazy package keeps its public names and registers the hybrid with transformers in any import order."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import typer.main
from tiny import tiny_hybrid, word_tokenizer

import hybridize
from hybridize import cli

HEAVY = ("torch", "transformers", "lm_eval", "ot", "matplotlib", "datasets")


def _python(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_importing_the_package_and_the_cli_imports_no_heavy_module():
    result = _python(
        f"""
        import sys
        import hybridize, hybridize.cli
        print(sorted(name for name in {HEAVY!r} if name in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_version_and_usage_errors_import_no_heavy_module(tmp_path):
    commands = sorted(typer.main.get_command(cli.app).commands)
    runs = [["--help"], ["--version"], ["convert", "llama", "--ratio", "half", "-o", tmp_path / "x"], ["convert"]]
    runs += [[command, "--help"] for command in commands]
    result = _python(
        f"""
        import contextlib, io, json, sys
        from hybridize.cli import main

        report = []
        for args in json.loads(sys.argv[1]):
            sys.argv = ["hybridize", *args]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main()
                except SystemExit as exit_:
                    code = exit_.code
            report.append([args, code, sorted(name for name in {HEAVY!r} if name in sys.modules)])
        print(json.dumps(report))
        """,
        json.dumps([[str(a) for a in args] for args in runs]),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [args for args, _, _ in report] == [[str(a) for a in args] for args in runs]
    assert {args[0]: code for args, code, _ in report[:2]} == {"--help": 0, "--version": 0}
    assert report[2][1] == 2 and report[3][1] == 2  # usage errors
    assert all(code == 0 for _, code, _ in report[4:])
    assert [(args, heavy) for args, _, heavy in report if heavy] == []


def test_version():
    result = subprocess.run([sys.executable, "-m", "hybridize", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"hybridize {hybridize.__version__}"


def _run_in_fresh_process(runs: list[list]) -> list:
    """Run `hybridize.cli.main` with each argument list in turn, in one fresh process; for each run: the arguments,
    the exit code, stderr and the heavy modules imported so far (in `sys.modules`, not timed)."""
    result = _python(
        f"""
        import contextlib, io, json, sys
        from hybridize.cli import main

        report = []
        for args in json.loads(sys.argv[1]):
            sys.argv = ["hybridize", *args]
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                try:
                    main()
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code
            report.append([args, code, err.getvalue(), sorted(name for name in {HEAVY!r} if name in sys.modules)])
        print(json.dumps(report))
        """,
        json.dumps([[str(a) for a in args] for args in runs]),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [args for args, *_ in report] == [[str(a) for a in args] for args in runs]
    return report


def test_config_errors_import_no_heavy_module(tmp_path):
    """Every command that builds a config refuses a bad value with `error: ...` and exit code 1 before importing
    torch and the rest: the configs live in `hybridize.configs`, and each command imports its API only after building
    its config. A recipe is validated the same way, with `--check` or without."""
    out, model_dir = tmp_path / "out", tmp_path / "model"
    model_dir.mkdir()
    recipe = tmp_path / "bad-seed.yaml"
    recipe.write_text(f"model: llama\noutput: {out}\nsteps:\n  - convert: {{ratio: 0.5, seed: abc}}\n")
    distill = ["distill", model_dir, "--teacher", "llama", "-o", out]
    runs = {
        "convert ratio": (["convert", "llama", "--ratio", "1.5", "-o", out], "ratio must be in [0, 1]"),
        "convert attn-layers": (["convert", "llama", "--attn-layers", "1,x", "-o", out], "--attn-layers takes"),
        "convert full-every": (["convert", "llama", "--full-every", "4", "--select", "lazy", "-o", out], "only one"),
        "distill lr": ([*distill, "--lr", "-1"], "lr=-1.0 must be positive"),
        "distill tokens": ([*distill, "--tokens", "12Q"], "not a token count"),
        "distill generate": ([*distill, "--data", "generate:0"], "must be at least 1"),
        "distill freeze": ([*distill, "--stage", "layerwise", "--freeze", "all"], "does not apply"),
        "eval seq-len": (["eval", "llama", "--seq-len", "0"], "seq_len=0 is too short"),
        "eval tasks": (["eval", "llama", "--tasks", "wiki_ppl,wiki_ppl"], "more than once"),
        "bench context": (["bench", "llama", "--context", "0"], "contexts must be positive"),
        "analyze ratio": (["analyze", "llama", "--ratio", "2"], "ratio must be in [0, 1]"),
        "analyze mixer": (["analyze", "llama", "--mixer", "rnn"], "mixer 'rnn' is not supported"),
        "prune nothing": (["prune", "llama", "-o", out], "nothing to prune"),
        "prune params": (["prune", "llama", "--params", "1.5", "-o", out], "params=1.5"),
        "factorize ratio": (["factorize", "llama", "--ratio", "2", "-o", out], "ratio must be in (0, 1]"),
        "factorize method": (["factorize", "llama", "--method", "qr", "-o", out], "method 'qr'"),
        "fuse width": (["fuse", "llama", "llama", "--width", "0", "-o", out], "width must be in (0, 1]"),
        "generate max-new-tokens": (["generate", "llama", "--prompt", "hi", "--max-new-tokens", "0"], "max_new"),
        "export to": (["export", "llama", "--to", "onnx", "-o", out], "export target 'onnx'"),
        "push repo id": (["push", model_dir, "not-a-repo"], "repo id 'not-a-repo' is not valid"),
        "run --check": (["run", recipe, "--check"], "line 4: step 'convert': seed='abc' must be an integer"),
        "run": (["run", recipe], "line 4: step 'convert': seed='abc' must be an integer"),
    }
    report = _run_in_fresh_process([args for args, _ in runs.values()])
    for (case, (_, message)), (_, code, stderr, _) in zip(runs.items(), report):
        assert code == 1 and stderr.startswith("error: ") and message in stderr, (case, code, stderr)
    assert [(args, heavy) for args, _, _, heavy in report if heavy] == []
    assert not out.exists()


def test_configs_are_one_class_wherever_imported():
    """The API modules re-export the configs of `hybridize.configs`: one class under every import path."""
    from hybridize import configs
    from hybridize.analyze import AnalyzeConfig
    from hybridize.compress import FactorizeConfig, FuseConfig, PruneConfig
    from hybridize.convert import INITIALIZERS, ConvertConfig
    from hybridize.distill import DistillConfig
    from hybridize.distill.generated import GenerateConfig as GeneratedDataConfig
    from hybridize.evaluate import BenchConfig, EvalConfig
    from hybridize.export import ExportConfig
    from hybridize.generate import GenerateConfig, PromptLookupDraft
    from hybridize.hub import PushConfig

    imported = [AnalyzeConfig, BenchConfig, ConvertConfig, DistillConfig, EvalConfig, ExportConfig, FactorizeConfig,
                FuseConfig, GenerateConfig, PromptLookupDraft, PruneConfig, PushConfig]  # fmt: skip
    assert imported == [getattr(configs, cls.__name__) for cls in imported]
    assert imported == [getattr(hybridize, cls.__name__) for cls in imported]
    assert GeneratedDataConfig is configs.distill.GenerateConfig
    assert set(INITIALIZERS) == set(configs.convert.CONVERT_MIXERS)


_CONFIG_OF_COMMAND = {
    "analyze": "AnalyzeConfig",
    "bench": "BenchConfig",
    "convert": "ConvertConfig",
    "distill": "DistillConfig",
    "eval": "EvalConfig",
    "export": "ExportConfig",
    "factorize": "FactorizeConfig",
    "fuse": "FuseConfig",
    "generate": "GenerateConfig",
    "prune": "PruneConfig",
    "push": "PushConfig",
}


@pytest.mark.parametrize("command", sorted(_CONFIG_OF_COMMAND))
def test_option_defaults_are_the_configs(command):
    """An option named like a field of its command's config defaults to that field's default (a list as the
    comma-separated text the option takes)."""
    from hybridize import configs

    fields = dataclasses.fields(getattr(configs, _CONFIG_OF_COMMAND[command]))
    options = {p.name: p.default for p in typer.main.get_command(cli.app).commands[command].params}
    shared = [f for f in fields if f.name in options and f.default is not dataclasses.MISSING]
    assert shared, command
    for field in shared:
        expected = field.default
        if expected == () and options[field.name] is None:  # eval --tasks: an empty list is the option left out
            continue
        if isinstance(expected, tuple):
            expected = ",".join(map(str, expected))
        elif isinstance(options[field.name], str) and not isinstance(expected, str):  # distill --tokens
            expected = str(expected)
        assert options[field.name] == expected, (command, field.name)


def test_public_names_resolve_and_functions_stay_functions():
    """`hybridize.convert` is the function even after `hybridize.convert` the subpackage is imported (by the user, or
    by another module), as it was when the package imported everything eagerly."""
    result = _python(
        """
        import hybridize
        import hybridize.evaluate.harness, hybridize.convert.selection, hybridize.io.text  # submodules first
        import hybridize.analyze, hybridize.export, hybridize.generate
        from hybridize import evaluate
        shadowed = ["analyze", "convert", "distill", "evaluate", "export", "generate"]
        assert all(callable(getattr(hybridize, name)) for name in shadowed), [getattr(hybridize, n) for n in shadowed]
        assert callable(evaluate) and hybridize.evaluate.__name__ == "evaluate"
        missing = [name for name in hybridize.__all__ if getattr(hybridize, name, None) is None]
        assert not missing, missing
        assert set(hybridize.__all__) <= set(dir(hybridize))
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        getattr(hybridize, "nonexistent")


@pytest.mark.parametrize(
    "load",
    [
        "import hybridize\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained(PATH)",
        "from transformers import AutoModelForCausalLM\nimport hybridize\nAutoModelForCausalLM.from_pretrained(PATH)",
        "from hybridize.sources import load\nload(PATH)",
    ],
    ids=["hybridize-first", "transformers-first", "sources-load"],
)
def test_saved_hybrid_loads_in_a_fresh_process(tmp_path, load):
    """Registration with transformers happens whenever transformers is imported, so every way in finds the hybrid
    without trust_remote_code (the saved modeling code is tampered with, so that running it would fail)."""
    tiny_hybrid(["mamba2", "attention"] * 2).save_pretrained(tmp_path / "h")
    word_tokenizer().save_pretrained(tmp_path / "h")
    for code in (tmp_path / "h").glob("*.py"):
        code.write_text("raise SystemExit('the checkpoint\\'s own code ran')\n")
    result = _python(load.replace("PATH", repr(str(tmp_path / "h"))) + "\nprint('ok')\n", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
