"""Training text (`hybridize.io.text`): sources, column detection, chat rendering, packing, the held-out split and
bad input."""

import json
import random

import pytest
import torch

from hybridize.errors import ConfigError
from hybridize.io.corpus import load_corpus, token_blocks
from hybridize.io.text import is_heldout, load_data, pack, text_column, tokenize


def test_packing_matches_evaluation_blocks(tokenizer, random_text):
    texts = [random_text(random.Random(i), 30 + i) for i in range(5)]
    blocks = pack(tokenize(tokenizer, texts, special_tokens=True), 16)
    torch.testing.assert_close(blocks, token_blocks(tokenizer, texts, seq_len=16))
    assert (blocks == tokenizer.eos_token_id).sum() >= 4  # documents are separated by EOS


def test_wiki_heldout_blocks_are_those_of_hybridize_eval(tokenizer):
    data = load_data("wiki", tokenizer, seq_len=64, max_train_tokens=640, heldout_tokens=256)
    assert data.train.shape == (10, 64)
    torch.testing.assert_close(
        data.heldout, token_blocks(tokenizer, load_corpus("heldout"), seq_len=64, max_tokens=256)
    )


def test_text_folder_split_by_document(tokenizer, text_file):
    data = load_data(str(text_file.parent), tokenizer, seq_len=16, heldout_ratio=0.2, heldout_tokens=64)
    assert data.num_documents + data.num_heldout_documents == 60
    assert 4 <= data.num_heldout_documents <= 20
    assert data.heldout.shape == (4, 16)
    again = load_data(str(text_file), tokenizer, seq_len=16, heldout_ratio=0.2, heldout_tokens=64)
    assert again.fingerprint == data.fingerprint  # a folder of one file is that file; the split is deterministic


def test_budget_stops_reading(tokenizer, text_file):
    data = load_data(str(text_file), tokenizer, seq_len=16, max_train_tokens=100)
    assert data.train.shape == (6, 16)


def test_jsonl_and_parquet_columns(tokenizer, tmp_path, random_text):
    rng = random.Random(1)
    rows = [{"id": i, "content": random_text(rng, 40)} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_data(str(tmp_path / "a.jsonl"), tokenizer, seq_len=16, heldout_tokens=0)
    assert data.heldout is None and data.num_documents == 10

    import datasets

    datasets.Dataset.from_list([{"n": i, "words": r["content"]} for i, r in enumerate(rows)]).to_parquet(
        tmp_path / "b.parquet"
    )
    data = load_data(str(tmp_path / "b.parquet"), tokenizer, seq_len=16, heldout_tokens=0)  # the only string column
    assert data.num_documents == 10


def test_column_detection_errors():
    assert text_column(["id", "text", "title"], ["text", "title"], None) == "text"
    assert text_column(["id", "messages"], [], None) == "messages"
    with pytest.raises(ConfigError, match="--text-column"):
        text_column(["title", "summary"], ["title", "summary"], None)
    with pytest.raises(ConfigError, match=r"'body' is not a column.*\['title', 'summary'\]"):
        text_column(["title", "summary"], ["title", "summary"], "body")


def test_chat_messages_use_the_chat_template(tmp_path, word_tokenizer):
    tokenizer = word_tokenizer()
    rows = [
        {"messages": [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": f"w7 w{8 + i}"}]}
        for i in range(4)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ConfigError, match="no chat template"):
        load_data(str(path), tokenizer, seq_len=4, heldout_tokens=0)
    tokenizer.chat_template = "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}"
    data = load_data(str(path), tokenizer, seq_len=7, heldout_tokens=0)
    # document i: w2 w5 w6 w3 w2 w7 w(8+i) w3, then <eos> (id 1)
    assert data.train[0].tolist() == [2, 5, 6, 3, 2, 7, 8]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty"), ("\n\n\n", "0 training documents"), ("w3 w4", "fewer than one block of seq_len=16")],
)
def test_empty_or_too_short_data(tokenizer, tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_data(str(path), tokenizer, seq_len=16, heldout_tokens=0)


def test_missing_or_unsupported_data(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(str(tmp_path / "nowhere.jsonl"), tokenizer, seq_len=16)
    (tmp_path / "notes.md").write_text("w3")
    with pytest.raises(ConfigError, match=r"\.md"):
        load_data(str(tmp_path / "notes.md"), tokenizer, seq_len=16)
    with pytest.raises(ConfigError, match="no .txt"):
        load_data(str(tmp_path), tokenizer, seq_len=16)


def test_hub_spec_is_name_and_config(tokenizer, monkeypatch, random_text):
    import datasets

    calls = []
    rows = [{"text": random_text(random.Random(i), 40)} for i in range(8)]

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_data("wikitext:wikitext-103-raw-v1", tokenizer, seq_len=16, heldout_tokens=0)
    assert calls == [("wikitext", "wikitext-103-raw-v1", "train")] and data.num_documents == 8
    load_data("owner/corpus", tokenizer, seq_len=16, heldout_tokens=0)
    assert calls[-1] == ("owner/corpus", None, "train")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"cannot load the Hub dataset 'owner/corpus': no network"):
        load_data("owner/corpus", tokenizer, seq_len=16)


def test_heldout_documents_are_the_hashed_ones(tokenizer, text_file):
    paragraphs = text_file.read_text().split("\n\n")
    expected = [p for p in paragraphs if is_heldout(p, 0.2)]
    data = load_data(str(text_file), tokenizer, seq_len=16, heldout_ratio=0.2, heldout_tokens=10**6)
    assert data.num_heldout_documents == len(expected) > 0
    heldout_tokens = sum(len(p.split()) + 1 for p in expected)  # a word per token, and EOS
    assert data.heldout.numel() == heldout_tokens // 16 * 16
