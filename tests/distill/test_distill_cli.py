"""`hybridize distill` through the command line's `main`: output, messages, exit codes, and nothing left behind on
bad input."""

import pytest
from tiny import run_cli
from transformers import AutoModelForCausalLM

import hybridize


@pytest.fixture
def model_dirs(teacher, make_student, tokenizer, tmp_path):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    hybridize.save(make_student(), tmp_path / "student", tokenizer=tokenizer)
    return tmp_path / "student", tmp_path / "teacher"


def test_distill_command(model_dirs, text_file, tmp_path):
    student, teacher = model_dirs
    out = tmp_path / "out"
    code, text = run_cli(
        "distill", student, "--teacher", teacher, "--data", text_file, "--stage", "layerwise", "--tokens", "0.25K",
        "--seq-len", "16", "--eval-tokens", "32", "-o", out,
    )  # fmt: skip
    assert code == 0, text
    assert "distilled layerwise: 256 tokens" in text and "held-out perplexity" in text and f"wrote {out}" in text
    assert AutoModelForCausalLM.from_pretrained(out).config.mixer_types == ["mamba2", "attention"] * 2
    assert (out / "distill_metrics.jsonl").is_file() and not (tmp_path / "out.distill").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--seq-len", "4096"), "error: seq_len=4096 is longer than the models' context"),
        (("--resume",), "error: nothing to resume"),
        (("--stage", "layerwise", "--freeze", "all"), "error: freeze='all' does not apply"),
        (("--tokens", "many"), "error: tokens='many' is not a token count"),
    ],
)
def test_distill_errors_leave_nothing(model_dirs, text_file, tmp_path, args, message):
    student, teacher = model_dirs
    code, text = run_cli("distill", student, "--teacher", teacher, "--data", text_file, *args, "-o", tmp_path / "out")
    assert code == 1 and message in text, text
    assert not (tmp_path / "out").exists()


def test_student_that_is_not_a_hybrid(model_dirs, text_file, tmp_path):
    _, teacher = model_dirs
    code, text = run_cli("distill", teacher, "--teacher", teacher, "--data", text_file, "-o", tmp_path / "out")
    assert code == 1 and "not a hybrid" in text and not (tmp_path / "out").exists()
