"""`distill` on tiny models: what each stage trains, exact resume after Ctrl-C, LoRA merged on save, what is recorded,
and clear errors for bad input."""

import json

import pytest
import torch
from tiny import make_tiny
from transformers import AutoModelForCausalLM

import hybridize
from hybridize.distill import DistillConfig, DistillInterrupted, distill, finish, run_dir_for
from hybridize.distill.plot import curve_table, distill_curve
from hybridize.errors import CheckpointError, ConfigError, OutputExistsError, UnsupportedModelError

MIXER_LAYERS = (0, 2)  # ratio 0.5 on 4 layers


def _config(text_file, **overrides):
    settings = {"data": str(text_file), "tokens": 16 * 4 * 4, "seq_len": 16, "batch_size": 4, "eval_tokens": 32}
    return DistillConfig(**{**settings, **overrides})


def _changed(before, model):
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _is_mixer(name):
    return any(name.startswith(f"model.layers.{i}.mixer.") for i in MIXER_LAYERS)


@pytest.mark.parametrize("layer_loss", ["l2", "mixer"])
def test_layerwise_trains_only_the_new_mixers_without_a_student_forward(
    teacher, make_student, tokenizer, text_file, layer_loss
):
    student = make_student()
    before = _snapshot(student)
    student.forward = None  # the layerwise stage must never run the whole student
    if layer_loss == "mixer":  # nor, with the attention-output loss, any MLP or norm of the student
        for layer in student.model.layers:
            layer.mlp.forward = layer.input_layernorm.forward = layer.post_attention_layernorm.forward = None
    config = _config(text_file, stage="layerwise", eval_tokens=0, layer_loss=layer_loss)
    result = distill(student, config, teacher=teacher, tokenizer=tokenizer)
    changed = _changed(before, result)
    assert changed and all(_is_mixer(name) for name in changed)
    assert {name.split(".")[2] for name in changed} == {"0", "2"}
    step = result.hybridize_steps[-1]
    assert step["step"] == "distill" and step["config"]["stage"] == "layerwise"
    assert step["metrics"]["tokens"] == 256 and step["metrics"]["steps"] == 4


def test_mixer_layer_loss_is_the_mse_against_the_teacher_attention(teacher, make_student):
    from hybridize.distill.layerwise import LayerwiseObjective

    student = make_student()
    input_ids = torch.randint(2, 128, (2, 12))
    loss, logs = LayerwiseObjective(student, teacher, MIXER_LAYERS, loss="mixer")(input_ids)
    # by hand: the teacher's stream, its attention input and output at each converted layer, the student's mixer
    hidden = teacher.model.embed_tokens(input_ids)
    pe = teacher.model.rotary_emb(hidden, position_ids=torch.arange(12)[None])
    expected = []
    with torch.no_grad():
        for i, layer in enumerate(teacher.model.layers):
            if i in MIXER_LAYERS:
                x = layer.input_layernorm(hidden)
                attention = layer.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
                predicted = student.model.layers[i].mixer(x, position_embeddings=pe)
                expected.append(((predicted - attention) ** 2).mean())
            hidden = layer(hidden, position_embeddings=pe, attention_mask=None)
    torch.testing.assert_close(loss.detach(), torch.stack(expected).sum())
    assert set(logs) == {f"layer_{i}" for i in MIXER_LAYERS}


def test_e2e_mixers_preset_trains_only_the_new_mixers(teacher, make_student, tokenizer, text_file):
    student = make_student()
    before = _snapshot(student)
    records = []
    result = distill(student, _config(text_file), teacher=teacher, tokenizer=tokenizer, on_step=records.append)
    changed = _changed(before, result)
    assert changed and all(_is_mixer(name) for name in changed)
    assert all(p.requires_grad for p in result.parameters())  # the flags are given back
    metrics = result.hybridize_steps[-1]["metrics"]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert [point["tokens"] for point in metrics["curve"]] == [0, 256]
    assert metrics["end"]["kl"] < metrics["start"]["kl"]
    assert metrics["teacher_perplexity"] > 1 and metrics["tokens_per_s"] > 0


def test_e2e_all_but_mlp(teacher, make_student, tokenizer, text_file):
    student = make_student()
    before = _snapshot(student)
    result = distill(
        student, _config(text_file, freeze="all-but-mlp", eval_tokens=0), teacher=teacher, tokenizer=tokenizer
    )
    changed = _changed(before, result)
    assert not any(".mlp." in name for name in changed)
    assert "model.layers.1.mixer.q_proj.weight" in changed and "model.embed_tokens.weight" in changed


def test_pretrained_lr_ratio_scales_only_the_source_weights(teacher, make_student, tokenizer, text_file):
    """freeze all with pretrained_lr_ratio 0: the new mixers train at lr, the source's own weights at lr * 0."""
    student = make_student()
    before = _snapshot(student)
    config = _config(text_file, freeze="all", pretrained_lr_ratio=0.0, eval_tokens=0)
    changed = _changed(before, distill(student, config, teacher=teacher, tokenizer=tokenizer))
    assert changed and all(_is_mixer(name) for name in changed)
    assert {name.split(".")[2] for name in changed} == {"0", "2"}
    config = _config(text_file, freeze="all", pretrained_lr_ratio=0.5, eval_tokens=0)
    student = make_student()
    changed = _changed(before, distill(student, config, teacher=teacher, tokenizer=tokenizer))
    assert "model.layers.1.mlp.up_proj.weight" in changed and "model.layers.0.mixer.out_proj.weight" in changed


def test_lora_is_merged_and_saved_as_a_plain_hybrid(teacher, make_student, tokenizer, text_file, tmp_path):
    student = make_student()
    before = _snapshot(student)
    config = _config(text_file, freeze="all", lora_rank=4, lr=1e-2, eval_tokens=0)
    result = distill(student, config, teacher=teacher, tokenizer=tokenizer)
    assert type(result).__name__ == "HybridForCausalLM"
    assert not any("lora" in name for name, _ in result.named_parameters())
    changed = _changed(before, result)
    assert "model.layers.1.mixer.q_proj.weight" in changed and "model.layers.3.mlp.up_proj.weight" in changed
    assert "model.layers.0.mixer.in_proj.weight" in changed  # new mixers train in full
    assert "model.embed_tokens.weight" not in changed and "model.norm.weight" not in changed
    hybridize.save(result, tmp_path / "out", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, result(ids).logits)


@pytest.mark.parametrize("stage", ["layerwise", "e2e"])
def test_interrupted_then_resumed_equals_uninterrupted(teacher, make_student, tokenizer, text_file, tmp_path, stage):
    config = _config(text_file, stage=stage, tokens=16 * 2 * 2 * 6, batch_size=2, grad_accum=2, eval_tokens=0)
    reference = distill(make_student(), config, teacher=teacher, tokenizer=tokenizer)

    work_dir = tmp_path / "run"

    def stop_at_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C turns into at a step boundary

    with pytest.raises(DistillInterrupted, match=r"step 3/6.*--resume"):
        distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=work_dir, on_step=stop_at_3)
    assert (work_dir / "checkpoint" / "state.json").is_file()
    with pytest.raises(OutputExistsError, match="--resume"):
        distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=work_dir)

    resumed = distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=work_dir, resume=True)
    for (name, expected), actual in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(expected, actual), name  # bit for bit: same data position, optimizer, schedule, RNG
    steps = [json.loads(line)["step"] for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert resumed.hybridize_steps[-1]["metrics"]["steps"] == 6


def test_resume_checks(teacher, make_student, tokenizer, text_file, tmp_path):
    config = _config(text_file, eval_tokens=0)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=tmp_path / "run", resume=True)

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(DistillInterrupted):
        distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=tmp_path / "run", on_step=stop)
    other = _config(text_file, eval_tokens=0, lr=1e-3)
    with pytest.raises(CheckpointError, match=r"different run.*lr"):
        distill(make_student(), other, teacher=teacher, tokenizer=tokenizer, work_dir=tmp_path / "run", resume=True)
    # --overwrite starts over
    distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=tmp_path / "run", overwrite=True)


def test_finish_saves_atomically_and_cleans_up(teacher, make_student, tokenizer, text_file, tmp_path):
    output = tmp_path / "out"
    result = distill(
        make_student(), _config(text_file), teacher=teacher, tokenizer=tokenizer, work_dir=run_dir_for(output)
    )
    assert run_dir_for(output) == tmp_path / "out.distill" and (tmp_path / "out.distill" / "metrics.jsonl").is_file()
    assert finish(result, output, tokenizer=tokenizer) == output
    assert not run_dir_for(output).exists()
    kinds = [json.loads(line)["kind"] for line in (output / "distill_metrics.jsonl").read_text().splitlines()]
    assert kinds == ["eval", "train", "train", "train", "train", "eval"]
    steps = json.loads((output / "hybridize.json").read_text())["steps"]
    assert [step["step"] for step in steps] == ["convert", "distill"]
    assert steps[1]["metrics"]["data"]["train_tokens"] > 0
    assert AutoModelForCausalLM.from_pretrained(output).config.mixer_types[0] == "mamba2"
    assert (output / "distill_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert curve_table(output).count("| e2e |") == 2


def test_curve_joins_stages():
    def step(stage, tokens, ppls):
        curve = [{"tokens": t, "perplexity": p, "kl": 0.1, "top1_agreement": 0.5} for t, p in ppls]
        return {"step": "distill", "config": {"stage": stage}, "metrics": {"tokens": tokens, "curve": curve}}

    steps = [
        {"step": "convert"},
        step("layerwise", 100, [(0, 900.0), (100, 90.0)]),
        step("e2e", 50, [(0, 90.0), (50, 40.0)]),
    ]
    points = distill_curve(steps)
    assert [(p["tokens"], p["stage"], p["perplexity"]) for p in points] == [
        (0, "layerwise", 900.0), (100, "layerwise", 90.0), (150, "e2e", 40.0)
    ]  # fmt: skip


def test_student_must_be_a_hybrid(teacher, tokenizer, text_file):
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM, not a hybrid.*hybridize convert"):
        distill(make_tiny("llama"), _config(text_file), teacher=teacher, tokenizer=tokenizer)


def test_nothing_to_train(teacher, tokenizer, text_file):
    all_attention = hybridize.convert(teacher, hybridize.ConvertConfig(mixer_init="attention", ratio=0.0))
    with pytest.raises(ConfigError, match="no converted layer"):
        distill(all_attention, _config(text_file, stage="layerwise"), teacher=teacher, tokenizer=tokenizer)


def test_plain_fine_tuning_of_an_all_attention_model(teacher, tokenizer, text_file):
    """kl_weight 0, ce_weight 1, freeze all: ordinary next-token fine-tuning (the fusion experiment's parents)."""
    model = hybridize.convert(teacher, hybridize.ConvertConfig(mixer_init="attention", ratio=0.0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = _config(text_file, freeze="all", kl_weight=0.0, ce_weight=1.0, lr=1e-2)
    distill(model, config, teacher=teacher, tokenizer=tokenizer)
    assert _changed(before, model) == set(before)


def test_sequence_longer_than_the_context(teacher, make_student, tokenizer, text_file):
    with pytest.raises(ConfigError, match=r"seq_len=1024 is longer than the models' context \(512"):
        distill(make_student(), _config(text_file, seq_len=1024, eval_tokens=0), teacher=teacher, tokenizer=tokenizer)


def test_tokenizer_mismatch(teacher, make_student, tokenizer, word_tokenizer, text_file):
    with pytest.raises(ConfigError, match="tokenizers differ"):
        distill(
            make_student(),
            _config(text_file),
            teacher=teacher,
            tokenizer=tokenizer,
            teacher_tokenizer=word_tokenizer(5),
        )
    bigger = make_tiny("llama", vocab_size=130)
    with pytest.raises(ConfigError, match="128 entries and the teacher's 130"):
        distill(make_student(), _config(text_file), teacher=bigger, tokenizer=tokenizer)


def test_layerwise_needs_matching_layers(make_student, tokenizer, text_file):
    shallow = make_tiny("llama", num_hidden_layers=2)
    with pytest.raises(ConfigError, match="4 layers of width 64 and the teacher 2"):
        distill(make_student(), _config(text_file, stage="layerwise"), teacher=shallow, tokenizer=tokenizer)


def test_empty_data(teacher, make_student, tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        distill(make_student(), _config(tmp_path / "empty.jsonl"), teacher=teacher, tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokens": "lots"}, "not a token count"),
        ({"stage": "both"}, "stage='both' is not one of layerwise, e2e"),
        ({"stage": "layerwise", "freeze": "all"}, "does not apply to the layerwise stage"),
        ({"lora_rank": 8}, "needs stage e2e with freeze all-but-mlp or all"),
        ({"freeze": "mlp"}, "freeze='mlp' is not one of"),
        ({"pretrained_lr_ratio": 1.5}, r"pretrained_lr_ratio=1.5 must be in \[0, 1\]"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"kl_weight": 0.0}, "nothing to train on"),
        ({"kl_weight": -1.0}, "kl_weight=-1.0 must not be negative"),
        ({"eval_tokens": 8, "seq_len": 16}, "eval_tokens=8 is less than seq_len=16"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**overrides)


def test_token_budgets():
    assert DistillConfig(tokens="500K").tokens == 500_000
    assert DistillConfig(tokens="2M").tokens == 2_000_000
    assert DistillConfig(tokens="1.5m").tokens == 1_500_000
    assert DistillConfig(tokens=1234).tokens == 1234
    assert DistillConfig(stage="layerwise").lr == 1e-3 and DistillConfig(stage="e2e", lr=0.5).lr == 0.5
