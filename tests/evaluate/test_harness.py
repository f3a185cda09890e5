"""The lm-eval bridge and the offline tasks: the packaged task data, `run_tasks` on a tiny saved hybrid against a
hand computation, `hybridize eval --tasks` recording in hybridize.json, the plain `lm_eval` command line from another
working directory, and (slow) the real SmolLM2."""

from __future__ import annotations

import collections
import gzip
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_tiny, run_cli
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hybridize
from hybridize.errors import ConfigError
from hybridize.evals_tasks.utils import passkey_found
from hybridize.evaluate import EvalConfig, load_corpus
from hybridize.evaluate.harness import OFFLINE_TASKS, TASK_LENGTHS, TASKS_DIR, _compact, format_results, run_tasks
from hybridize.provenance import read_manifest

DATA_DIR = Path(hybridize.__file__).parent / "data" / "tasks"
ITEMS = {"wiki_ppl": 25, "lambada_wiki": 300, "passkey_2k": 20, "passkey_4k": 20, "passkey_8k": 20}


def _docs(task: str) -> list[dict]:
    with gzip.open(DATA_DIR / f"{task}.jsonl.gz", "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """A 128-word WordLevel tokenizer over the most frequent held-out words, so that the text is not all unknown."""
    words = collections.Counter(re.findall(r"\w+|[^\w\s]+", " ".join(load_corpus("heldout"))))
    vocab = {"<unk>": 0, "</s>": 1, **{word: i + 2 for i, (word, _) in enumerate(words.most_common(126))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory) -> Path:
    """A tiny Llama converted to a 50% Mamba2 hybrid and saved with its tokenizer (vocab 128, context 512)."""
    path = tmp_path_factory.mktemp("harness") / "hybrid"
    hybrid = hybridize.convert(make_tiny("llama"), hybridize.ConvertConfig(mixer_init="attention", ratio=0.5))
    hybridize.save(hybrid, path, tokenizer=_word_tokenizer())
    return path


# The packaged task data


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_task_data_is_packaged_with_its_item_count(task):
    assert (TASKS_DIR / f"{task}.yaml").is_file()
    assert len(_docs(task)) == ITEMS[task]


def test_wiki_ppl_is_the_heldout_split():
    assert [doc["text"] for doc in _docs("wiki_ppl")] == load_corpus("heldout")


def test_lambada_targets_end_their_passages():
    docs = _docs("lambada_wiki")
    assert all(re.fullmatch(r"[A-Za-z][a-z]{2,}", doc["target"]) for doc in docs)
    assert sum(doc["repeated"] for doc in docs) >= len(docs) // 3
    texts = {line for text in load_corpus("heldout") for line in text.split("\n")}
    assert all(f"{doc['context']} {doc['target']}." in texts for doc in docs[:50])


@pytest.mark.parametrize("task", sorted(TASK_LENGTHS))
def test_passkeys_are_hidden_once_and_fit_their_length(task):
    docs = _docs(task)
    for doc in docs:
        assert re.fullmatch(r"\d{5}", doc["target"])
        assert doc["context"].count(f"The pass key is {doc['target']}. Remember it.") == 1
        assert doc["context"].endswith("What is the pass key? The pass key is")
        # generation keeps max_length - max_gen_toks (8) tokens of context: the whole item must fit in that
        assert TASK_LENGTHS[task] * 0.8 < doc["num_tokens"] <= TASK_LENGTHS[task] - 8
    depths = sorted(doc["depth"] for doc in docs)
    assert depths[0] < 0.1 and depths[-1] > 0.85  # spread over the whole text


@pytest.mark.parametrize(
    ("generated", "found"), [(" 47856", 1.0), ("47856. Remember it.", 1.0), (" 47855", 0.0), (" the key 47856", 0.0)]
)
def test_passkey_is_found_only_at_the_start_of_the_continuation(generated, found):
    assert passkey_found({"target": "47856"}, [generated]) == {"acc": found}


# Validation before any work


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["passkey_8k"], "max_length": 4096}, "passkey_8k need max_length >= 8192"),
        ({"tasks": ["wiki_ppl"], "limit": 0}, "limit=0"),
        ({"tasks": ["wiki_ppl"], "batch_size": 0}, "batch_size=0"),
        ({"tasks": []}, "name at least one"),
    ],
)
def test_bad_arguments_fail_before_lm_eval_runs(tiny_llama, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        run_tasks(tiny_llama, None, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"tasks": "wiki_ppl"}, "tuple of task names"), ({"max_length": 1}, "max_length=1")]
)
def test_eval_config_checks_task_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**kwargs)


@pytest.mark.slow  # indexes lm-eval's whole registry
def test_unknown_task_names_the_offline_tasks(tiny_llama):
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) 'wiki_pp'.*passkey_4k"):
        run_tasks(tiny_llama, None, ["wiki_ppl", "wiki_pp"], max_length=64)


# Results and manifest


def test_compact_table_and_format():
    output = {
        "results": {
            "passkey_4k": {"alias": "passkey_4k", "acc,none": 0.75, "acc_stderr,none": "N/A"},
            "gsm8k": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1},
        },
        "n-samples": {"passkey_4k": {"original": 20, "effective": 4}, "gsm8k": {"original": 9, "effective": 9}},
    }
    table = _compact(output)
    assert table["passkey_4k"] == {
        "acc": 0.75,
        "acc_stderr": pytest.approx(math.sqrt(0.75 * 0.25 / 3)),
        "num_items": 4,
    }
    assert table["gsm8k"] == {"exact_match,strict-match": 0.5, "num_items": 9}
    text = format_results(table, {"passkey_4k": {"acc": 1.0}})
    assert re.search(r"passkey_4k\s+acc\s+0\.7500\s+1\.0000", text) and re.search(r"num_items\s+4\s+-", text)


# lm-eval, in-process and on the command line


@torch.inference_mode()
def test_wiki_ppl_on_a_tiny_hybrid_matches_a_hand_computation(hybrid_dir):
    model, tokenizer = hybridize.load(str(hybrid_dir))
    text = _docs("wiki_ppl")[0]["text"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng_state = torch.get_rng_state()
    result = run_tasks(model.train(), tokenizer, ["wiki_ppl"], max_length=len(ids) + 1, limit=1)["wiki_ppl"]
    assert torch.equal(torch.get_rng_state(), rng_state)  # lm-eval's seeding does not leak out
    assert model.training  # nor its switch to eval mode
    model.eval()

    # One rolling window holds the whole article: the EOS (no BOS here) as prefix, then every token predicted.
    inputs = torch.tensor([[tokenizer.eos_token_id, *ids[:-1]]])
    log_probs = torch.log_softmax(model(inputs).logits[0].double(), dim=-1)
    loglikelihood = log_probs[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    assert result["num_items"] == 1
    assert result["word_perplexity"] == pytest.approx(math.exp(-loglikelihood / len(text.split())), rel=1e-4)
    assert result["byte_perplexity"] == pytest.approx(math.exp(-loglikelihood / len(text.encode())), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(math.log2(result["byte_perplexity"]), rel=1e-6)


def test_run_tasks_shows_no_lm_eval_warning_meant_for_its_own_command_line(
    hybrid_dir, tmp_path, monkeypatch, caplog, capfd
):
    monkeypatch.chdir(tmp_path)  # outside a git repository, where lm-eval's `git describe` printed "fatal: ..."
    model, tokenizer = hybridize.load(str(hybrid_dir))
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        result = run_tasks(model, tokenizer, ["wiki_ppl"], max_length=512, limit=1)
    assert result["wiki_ppl"]["num_items"] == 1
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith("lm_eval")]
    assert not [m for m in warnings if "`pretrained`" in m or "--metadata" in m], warnings
    assert "fatal" not in capfd.readouterr().err
    # lm-eval's other warnings still show after the run
    assert (
        not logging.getLogger("lm_eval.models.huggingface").filters
        and not logging.getLogger("lm_eval.api.task").filters
    )


def test_cli_eval_tasks_prints_writes_json_and_records(hybrid_dir, tmp_path):
    weights = (hybrid_dir / "model.safetensors").read_bytes()
    code, out = run_cli(
        "eval", hybrid_dir, "--tasks", "lambada_wiki,passkey_2k", "--max-length", "2048", "--limit", "2",
        "--json", tmp_path / "out.json",
    )  # fmt: skip
    assert code == 0, out
    assert re.search(r"lambada_wiki\s+perplexity\s+\d", out) and re.search(r"passkey_2k\s+acc\s+0\.", out)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["max_length"] == 2048 and result["limit"] == 2
    assert set(result["tasks"]) == {"lambada_wiki", "passkey_2k"}
    assert result["tasks"]["lambada_wiki"]["num_items"] == 2 and 0 <= result["tasks"]["passkey_2k"]["acc"] <= 1
    steps = read_manifest(hybrid_dir)["steps"]
    assert [step["step"] for step in steps] == ["convert", "eval"]
    assert steps[-1]["config"]["tasks"] == ["lambada_wiki", "passkey_2k"] and steps[-1]["metrics"] == result
    assert (hybrid_dir / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_plain_lm_eval_cli_on_a_saved_hybrid_from_another_directory(hybrid_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={hybrid_dir},trust_remote_code=True,max_length=512", "--device", "cpu",
        "--include_path", str(TASKS_DIR), "--tasks", "wiki_ppl", "--limit", "2", "--output_path", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results_*.json")
    plain = json.loads(results_file.read_text())["results"]["wiki_ppl"]

    model, tokenizer = hybridize.load(str(hybrid_dir))
    ours = run_tasks(model, tokenizer, ["wiki_ppl"], max_length=512, limit=2)["wiki_ppl"]
    assert plain["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-4)


@pytest.mark.slow
def test_registry_task_without_cached_data_fails_clearly(tiny_llama):
    with pytest.raises(ConfigError, match="lambada_openai cannot be read offline"):
        run_tasks(tiny_llama, _word_tokenizer(), ["lambada_openai"], limit=1)


@pytest.mark.slow
@torch.inference_mode()
def test_wiki_ppl_on_smollm2():
    model, tokenizer = hybridize.load("llama")
    text = _docs("wiki_ppl")[0]["text"]  # "A Modest Proposal", about 2,500 tokens: one rolling window of 4096
    result = run_tasks(model, tokenizer, ["wiki_ppl"], max_length=4096, limit=1)["wiki_ppl"]

    # lm-eval prefixes the window with the BOS token (<|im_start|> for SmolLM2) and predicts every token of the text.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([[tokenizer.bos_token_id, *ids[:-1]]])).logits[0].double()
    loglikelihood = torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    assert result["word_perplexity"] == pytest.approx(math.exp(-loglikelihood / len(text.split())), rel=1e-3)
    # Held-out token perplexity of SmolLM2 is about 29 at 512 tokens, 1.4 tokens per word, 4.5 bytes per token.
    assert 20 < result["word_perplexity"] < 400 and 0.7 < result["bits_per_byte"] < 1.4
