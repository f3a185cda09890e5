"""`distill` on an NHA hybrid, with no NHA-specific code in the engine: the layerwise stage trains the NHA mixers
(g_proj included), and e2e with the NHA paper's freezing (everything but the MLPs) trains the rest and saves a model
that reloads."""

import torch
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.distill import DistillConfig, distill

NHA = {"window": 4, "slots": 8, "chunk_size": 8}  # blocks of 16 tokens: the slots are on the path


def _student(teacher):
    return hybridize.convert(
        teacher, hybridize.ConvertConfig(mixer_init="attention", mixer="nha", ratio=0.5, mixer_settings=NHA)
    )


def _config(text_file, **overrides):
    settings = {"data": str(text_file), "tokens": 16 * 4 * 4, "seq_len": 16, "batch_size": 4, "eval_tokens": 32}
    return DistillConfig(**{**settings, **overrides})


def test_layerwise_trains_the_nha_mixers(teacher, tokenizer, text_file):
    student = _student(teacher)
    assert student.config.mixer_types == ["nha", "attention", "nha", "attention"]
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    result = distill(
        student, _config(text_file, stage="layerwise", eval_tokens=0), teacher=teacher, tokenizer=tokenizer
    )
    changed = {name for name, p in result.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.{i}.mixer.{p}_proj.weight" for i in (0, 2) for p in "qkvog"}


def test_e2e_all_but_mlp_trains_everything_but_the_mlps_and_saves(teacher, tokenizer, text_file, tmp_path):
    """The NHA paper's fine-tuning freezes only the FFNs. (The tiny student starts within a KL of ~1e-3 of its random
    teacher, so this checks what trains and what is saved, not a KL decrease over four steps.)"""
    student = _student(teacher)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    result = distill(student, _config(text_file, freeze="all-but-mlp"), teacher=teacher, tokenizer=tokenizer)
    changed = {name for name, p in result.named_parameters() if not torch.equal(p, before[name])}
    assert not any(".mlp." in name for name in changed)
    assert {"model.layers.0.mixer.g_proj.weight", "model.layers.1.mixer.q_proj.weight"} <= changed
    metrics = result.hybridize_steps[-1]["metrics"]
    assert all(torch.isfinite(torch.tensor(metrics[key]["kl"])) for key in ("start", "end"))
    hybridize.save(result, tmp_path / "out", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.mixers == {"nha": NHA}
    ids = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(loaded(ids).logits, result.eval()(ids).logits)
