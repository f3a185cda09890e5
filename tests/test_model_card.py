"""The model card (`hybridize.model_card`): metadata and text for a converted hybrid and a native export, base model
and licence from the recorded source, and eval results that round-trip through the Hub's model-index."""

import json

import pytest
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

import hybridize
from hybridize.model_card import eval_results, model_card

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _with_steps(directory, *steps, **top):
    manifest = json.loads((directory / "hybridize.json").read_text())
    manifest["steps"] = [*manifest["steps"], *steps]
    manifest.update(top)
    (directory / "hybridize.json").write_text(json.dumps(manifest))
    return directory


def _set_source(directory, source):
    manifest = json.loads((directory / "hybridize.json").read_text())
    manifest["steps"][0]["source"] = source
    (directory / "hybridize.json").write_text(json.dumps(manifest))


def test_card_of_a_converted_hybrid(hybrid_dir):
    card = model_card(hybrid_dir, repo_id="someone/tiny-mamba50")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["hybridize", "hybrid", "mamba2"]
    # an in-memory source: nothing to link, licence unknown
    assert "base_model" not in meta and "base_model_relation" not in meta and meta["license"] == "other"
    assert "model-index" not in meta
    text = card.text
    assert "| mamba2 | 0, 2 | 2 |" in text and "| attention | 1, 3 | 2 |" in text
    assert "### 1. `convert`" in text and "ratio: 0.5" in text and "converted_layers: [0, 2]" in text
    assert "No training step is recorded" in text
    assert "import hybridize" in text and 'from_pretrained("someone/tiny-mamba50")' in text
    assert 'from_pretrained("someone/tiny-mamba50", trust_remote_code=True)' in text
    assert "| transformers | " in text
    # the text written parses back to the same metadata
    assert ModelCard(str(card)).data.to_dict() == meta


@pytest.mark.parametrize(
    "source, base, license_",
    [
        ("llama", SMOLLM2, "apache-2.0"),
        ("/root/.cache/hybridize/SmolLM2-135M-Instruct.Q4_1-196d7a824673", SMOLLM2, "apache-2.0"),
        (SMOLLM2, SMOLLM2, "apache-2.0"),
        ("someone/other-llama", "someone/other-llama", "other"),
        ("LOCAL", None, "other"),
    ],
)
def test_base_model_and_licence(hybrid_dir, tmp_path, source, base, license_):
    if source == "LOCAL":
        source = str(tmp_path)
    _set_source(hybrid_dir, source)
    meta = model_card(hybrid_dir).data.to_dict()
    assert meta.get("base_model") == base and meta["license"] == license_
    assert meta.get("base_model_relation") == ("finetune" if base else None)


def test_licence_recorded_in_the_directory_wins(hybrid_dir):
    _set_source(hybrid_dir, "someone/other-llama")
    _with_steps(hybrid_dir, license="mit")
    assert model_card(hybrid_dir).data.license == "mit"


def test_eval_results_round_trip(hybrid_dir):
    _with_steps(
        hybrid_dir,
        {"step": "eval", "config": {}, "metrics": {"perplexity": 99.0}},  # superseded by the distill below
        {"step": "distill", "config": {"tokens": 2_000_000, "dataset": "wiki_train"}, "metrics": {"loss": 2.5}},
        {
            "step": "eval",
            "config": {"split": "test"},
            "metrics": {
                "perplexity": 21.5,
                "kl": 0.31,
                "baseline_perplexity": 18.0,
                "num_tokens": 4096,
                "split": "test",
            },
        },
        {
            "step": "eval",
            "config": {"tasks": ["wiki_ppl", "lambada_wiki"]},
            "metrics": {
                "wiki_ppl": {"word_perplexity": 30.25, "bits_per_byte": 0.9, "alias": "wiki_ppl"},
                "lambada_wiki": {"acc,none": 0.4, "acc_stderr,none": 0.01, "note": "n/a", "bad": float("nan")},
                "flag": True,
            },
        },
        {"step": "export", "config": {"to": "granitemoehybrid"}, "metrics": {}},
    )
    expected = [
        EvalResult(
            task_type="text-generation",
            dataset_type="wiki_heldout",
            dataset_split="test",
            dataset_name="Wikipedia held-out articles (hybridize corpus, CC BY-SA)",
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in (("perplexity", 21.5), ("kl", 0.31))
    ] + [
        EvalResult(
            task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric, metric_value=value
        )
        for task, metric, value in (
            ("wiki_ppl", "word_perplexity", 30.25),
            ("wiki_ppl", "bits_per_byte", 0.9),
            ("lambada_wiki", "acc", 0.4),
        )
    ]
    assert eval_results(json.loads((hybrid_dir / "hybridize.json").read_text())) == expected

    card = model_card(hybrid_dir, repo_id="someone/tiny-mamba50")
    readme = hybrid_dir.parent / "README.md"
    card.save(readme)
    name, parsed = model_index_to_eval_results(metadata_load(readme)["model-index"])
    assert name == "tiny-mamba50" and parsed == expected
    assert ModelCard(readme.read_text()).data.eval_results == expected
    # data and token counts from the steps are in the body, and the distilled model is not called untrained
    assert "| 3. distill | tokens | `2000000` |" in card.text and "wiki_train" in card.text
    assert "No training step is recorded" not in card.text


def test_card_of_a_native_export(saved_hybrid, tmp_path):
    hybrid, _ = hybridize.load(str(saved_hybrid))
    native = hybridize.export(hybrid, hybridize.ExportConfig())
    hybridize.save(native, tmp_path / "native")
    card = model_card(tmp_path / "native", repo_id="someone/native")
    assert "| mamba2 | 0, 2 | 2 |" in card.text and "| attention | 1, 3 | 2 |" in card.text
    assert "no custom code" in card.text and "trust_remote_code" not in card.text
    assert "import hybridize" not in card.text
    assert "### 1. `convert`" in card.text and "### 2. `export`" in card.text
