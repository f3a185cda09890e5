"""Two processes under `accelerate launch` (CPU, gloo): they train one model together and save it once. With the
same global batch, two processes of batch 2 see exactly the blocks one process of batch 4 sees, and DDP's averaged
gradients equal the one-process gradient up to float rounding, so the weights agree closely."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.distill import DistillConfig, distill


@pytest.mark.slow
def test_two_processes_train_and_save(teacher, make_student, tokenizer, text_file, tmp_path):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    hybridize.save(make_student(), tmp_path / "student", tokenizer=tokenizer)
    settings = {"stage": "layerwise", "tokens": 16 * 4 * 5, "seq_len": 16, "eval_tokens": 32}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "hybridize", "distill", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
        "--data", str(text_file), "--stage", "layerwise", "--tokens", str(settings["tokens"]), "--seq-len", "16",
        "--batch-size", "2", "--eval-tokens", "32", "--save-every", "2", "-o", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # only the main process saves and prints

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "hybridize.json").read_text())["steps"][-1]["metrics"]
    assert metrics["num_processes"] == 2 and metrics["steps"] == 5 and metrics["tokens"] == 320
    assert not (tmp_path / "out.distill").exists()

    single = distill(make_student(), DistillConfig(data=str(text_file), batch_size=4, **settings), teacher=teacher,
                     tokenizer=tokenizer)  # fmt: skip
    for (name, expected), actual in zip(single.named_parameters(), trained.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)
