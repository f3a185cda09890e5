"""Bring a converted (or compressed) hybrid back towards its teacher: `distill(student, DistillConfig(...), teacher=...)`.

Two stages, run one per call:

- `layerwise` (MaTVLM, arXiv 2503.13440; MambaInLlama stage 1, arXiv 2408.15237): each converted mixer learns to map
  the teacher's hidden state at its layer's input to the teacher's output of that layer; only the new mixers train.
  Cheap: only the converted blocks run in training mode (`layerwise.py`).
- `e2e`: the student's next-token distributions against the teacher's, with a per-token, mask-aware forward or reverse
  KL (MambaInLlama, Minitron arXiv 2407.14679), optionally plus cross-entropy, a freezing preset and optional LoRA
  (`e2e.py`).

Both run on the same engine (`engine.py`, accelerate) over the same data (`hybridize.io.text`). The usual recipe is
layerwise, then e2e on the result:

```
hybridize distill out/smol-mamba50 --teacher llama --data wiki --tokens 500K --stage layerwise -o out/s1
hybridize distill out/s1 --teacher llama --data wiki --tokens 2M --stage e2e -o out/s2
accelerate launch --num_processes 2 -m hybridize distill ...      # the same job on two GPUs
accelerate launch --multi_gpu --num_processes 2 -m hybridize distill ...   # two CPU processes (gloo)
```

On a machine without GPUs, `accelerate launch --num_processes 2` alone starts a single process: accelerate reaches
torchrun only with `--multi_gpu`, and `distill` then asks accelerate for CPU processes with gloo
(`torchrun --nproc_per_node 2 -m hybridize distill ...` does the same). The global batch is
`batch_size * grad_accum * num_processes` blocks; a run resumes only with the number of processes it started with.

Checkpoints and the metrics log live in a work directory beside the output, `<output>.distill/` (`run_dir_for`):
`checkpoint/` (the latest, replaced atomically) and `metrics.jsonl`. `--resume` continues from it. When the run
completes, `finish` saves the model atomically with `hybridize.save`, copies the metrics log into it as
`distill_metrics.jsonl`, plots the held-out curve as `distill_curve.png` and removes the work directory.
`python -m hybridize.distill.plot OUT.png RUN [RUN ...]` plots several runs together (`plot.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs.distill import DEFAULT_LR, EVAL_EVERY, SAVE_EVERY, STAGES, DistillConfig, parse_tokens
from ..errors import ConfigError, OutputExistsError, UnsupportedModelError
from ..evaluate.perplexity import compare_logits
from ..io.text import DistillData, load_data
from ..provenance import record_step
from ..saving import save
from .e2e import LogitsObjective, add_lora, converted_layers, freeze, merge_lora, pretrained_parameters
from .engine import CHECKPOINT, METRICS, DistillInterrupted, read_checkpoint_state, recover_checkpoint, train
from .generated import generated_data, is_generate_spec
from .layerwise import LayerwiseObjective

logger = logging.getLogger(__name__)


def check_distill(
    student: nn.Module,
    config: DistillConfig,
    *,
    teacher: nn.Module,
    tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> list[int]:
    """Check a student, its teacher and their tokenizers against `config` before any work; return the converted
    layers. Raises `UnsupportedModelError` for a student that is not a hybrid, `ConfigError` otherwise."""
    from ..modeling import HybridForCausalLM

    if not isinstance(student, HybridForCausalLM):
        raise UnsupportedModelError(
            f"the student is a {type(student).__name__}, not a hybrid; convert it first "
            "(hybridize convert MODEL -o OUT), then distill OUT"
        )
    converted = converted_layers(student)
    if not converted and (config.stage == "layerwise" or config.freeze == "mixers"):
        raise ConfigError(
            "the student has no converted layer (every mixer is attention), so there are no new mixers to train; "
            "convert some layers first, or use --stage e2e with --freeze all-but-mlp or all"
        )
    s_config, t_config = student.config, teacher.config
    if s_config.vocab_size != t_config.vocab_size:
        raise ConfigError(
            f"the student's vocabulary has {s_config.vocab_size} entries and the teacher's {t_config.vocab_size}; "
            "distill from the teacher the student was converted from (same tokenizer)"
        )
    if tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()))[:3]
            raise ConfigError(
                f"the student's and the teacher's tokenizers differ ({len(student_vocab)} vs {len(teacher_vocab)} "
                f"tokens; e.g. {differing}); distill from the teacher the student was converted from"
            )
        for name in ("eos_token_id", "bos_token_id"):
            if getattr(tokenizer, name, None) != getattr(teacher_tokenizer, name, None):
                raise ConfigError(
                    f"the tokenizers' {name} differ ({getattr(tokenizer, name)} vs "
                    f"{getattr(teacher_tokenizer, name)}); use the teacher's tokenizer for the student"
                )
    context = min(s_config.max_position_embeddings, t_config.max_position_embeddings)
    if config.seq_len > context:
        raise ConfigError(
            f"seq_len={config.seq_len} is longer than the models' context ({context} tokens: student "
            f"{s_config.max_position_embeddings}, teacher {t_config.max_position_embeddings}); pass --seq-len {context} "
            "or less"
        )
    if config.stage == "layerwise":
        t_layers = getattr(t_config, "num_hidden_layers", None)
        if t_layers != s_config.num_hidden_layers or t_config.hidden_size != s_config.hidden_size:
            raise ConfigError(
                f"the layerwise stage pairs layer i of the student with layer i of the teacher, but the student has "
                f"{s_config.num_hidden_layers} layers of width {s_config.hidden_size} and the teacher {t_layers} of "
                f"width {t_config.hidden_size}; use the teacher the student was converted from, or --stage e2e"
            )
    return converted


def run_dir_for(output: str | Path) -> Path:
    """The work directory of a distillation into `output`: `<output>.distill/` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".distill")


def _prepare_work_dir(work_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    if is_main:
        recover_checkpoint(work_dir)
    if resume:
        read_checkpoint_state(work_dir)  # CheckpointError if there is nothing to resume
        return
    if (work_dir / CHECKPOINT).exists() and not overwrite:
        raise OutputExistsError(
            f"{work_dir} holds a checkpoint of an unfinished run; pass --resume to continue it, or --overwrite "
            "to start over"
        )
    if is_main and overwrite:
        shutil.rmtree(work_dir, ignore_errors=True)


def _fingerprint(parameters: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(parameters):
        digest.update(name.encode())
        digest.update(parameters[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def distill(
    student: nn.Module,
    config: DistillConfig,
    *,
    teacher: nn.Module,
    tokenizer: Any,
    teacher_tokenizer: Any = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    eval_every: int = EVAL_EVERY,
    save_every: int = SAVE_EVERY,
    progress: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> nn.Module:
    """Distill `student` towards `teacher` with one stage of `config`.

    Trains `student` in place and returns it (for LoRA, the model with the adapters merged), with the step recorded
    for `hybridize.json`: config, data counts, tokens, tokens/s and the held-out evaluations (teacher perplexity,
    student perplexity, KL and top-1 agreement) over tokens seen. Runs on every process `accelerate launch` starts.

    Args:
        student (`HybridForCausalLM`): the hybrid to train.
        config (`DistillConfig`): stage, data, budget and optimisation settings.
        teacher (`PreTrainedModel`): the reference model, usually the one the student was converted from. Not
            modified.
        tokenizer: the student's tokenizer; it tokenizes the data.
        teacher_tokenizer (*optional*): the teacher's, checked identical to the student's.
        work_dir (`str` or `Path`, *optional*): checkpoints and `metrics.jsonl` go there (`run_dir_for(output)`);
            without it nothing is written and the run cannot be resumed.
        resume (`bool`, *optional*, defaults to `False`): continue from the checkpoint in `work_dir`.
        overwrite (`bool`, *optional*, defaults to `False`): discard an unfinished run's checkpoint in `work_dir`.
        eval_every (`int`, *optional*, defaults to `EVAL_EVERY`): optimizer steps between held-out evaluations; 0
            evaluates at the start and the end only.
        save_every (`int`, *optional*, defaults to `SAVE_EVERY`): optimizer steps between checkpoints; 0 saves
            only on Ctrl-C.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.
        on_step (`Callable`, *optional*): called with each optimizer step's metrics.

    Returns:
        `HybridForCausalLM`: the trained student.

    Raises:
        `UnsupportedModelError`, `ConfigError`: see `check_distill`; `ConfigError` also for unreadable or empty data.
        `CheckpointError`: `resume` without a matching checkpoint. `OutputExistsError`: an unfinished run's
        checkpoint in `work_dir` without `resume` or `overwrite`.
        `DistillInterrupted`: Ctrl-C or SIGTERM; a checkpoint was saved first (when `work_dir` is given).

    Example:
        ```python
        >>> student, tokenizer = hybridize.load("out/smol-mamba50")
        >>> teacher, _ = hybridize.load("llama")
        >>> student = distill(student, DistillConfig(stage="layerwise", tokens="500K"), teacher=teacher,
        ...                   tokenizer=tokenizer)
        ```
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    converted = check_distill(
        student, config, teacher=teacher, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer
    )
    if resume and work_dir is None:
        raise ConfigError("resume needs the work directory of the run (work_dir)")
    # accelerate reaches several CPU processes (gloo) only when told to use the CPU; torchrun (`accelerate launch
    # --multi_gpu`) does not say so on a machine without GPUs
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=_resolve_precision(config.mixed_precision), cpu=cpu)
    work_dir = Path(work_dir) if work_dir is not None else None
    if work_dir is not None:
        _prepare_work_dir(work_dir, resume=resume, overwrite=overwrite, is_main=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    set_seed(config.seed)

    with accelerator.main_process_first():  # datasets' cache (and the teacher's text) is written once
        if is_generate_spec(config.data):
            teacher.to(accelerator.device)
            data = generated_data(
                teacher,
                tokenizer,
                config.data,
                None if work_dir is None else work_dir.with_name(work_dir.name.removesuffix(".distill")),
                seq_len=config.seq_len,
                seed=config.seed,
                heldout_ratio=config.heldout_ratio,
                heldout_tokens=config.eval_tokens,
                text_column_name=config.text_column,
                write=accelerator.is_main_process,
                progress=progress and accelerator.is_main_process,
            )
        else:
            data = load_data(
                config.data,
                tokenizer,
                seq_len=config.seq_len,
                max_train_tokens=config.tokens,
                heldout_ratio=config.heldout_ratio,
                heldout_tokens=config.eval_tokens,
                text_column_name=config.text_column,
            )
    device = accelerator.device
    student.to(device)
    teacher.to(device).eval()
    was_trainable = {name: p.requires_grad for name, p in student.named_parameters()}
    teacher_was_trainable = {name: p.requires_grad for name, p in teacher.named_parameters()}
    teacher.requires_grad_(False)

    trained_model: nn.Module = student
    if config.stage == "layerwise":
        freeze(student, "mixers")
        objective: nn.Module = LayerwiseObjective(student, teacher, converted, loss=config.layer_loss)
    else:
        freeze(student, config.freeze)
        if config.lora_rank:
            trained_model = add_lora(student, config.freeze, rank=config.lora_rank, alpha=config.lora_alpha)
        objective = LogitsObjective(
            trained_model,
            teacher,
            kind=config.loss,
            reduction=config.kl_reduction,
            ce_weight=config.ce_weight,
            kl_weight=config.kl_weight,
        )

    trained_parameters = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    evaluate = None
    if data.heldout is not None and config.eval_tokens:

        def evaluate() -> dict[str, float]:
            return compare_logits(trained_model, teacher, data.heldout, batch_size=config.batch_size)

    # what a checkpoint must match to be resumed (JSON-normalised, as it is stored)
    identity = json.loads(
        json.dumps(
            {
                **dataclasses.asdict(config),
                "data_fingerprint": data.fingerprint,
                "student_fingerprint": _fingerprint(
                    {n: p for n, p in objective.named_parameters() if p.requires_grad}
                ),
                "num_processes": accelerator.num_processes,
            }
        )
    )
    try:
        state = train(
            objective,
            data,
            config,
            accelerator=accelerator,
            evaluate=evaluate,
            identity=identity,
            work_dir=work_dir,
            resume=resume,
            eval_every=eval_every,
            save_every=save_every,
            progress=progress,
            on_step=on_step,
            desc=f"distill {config.stage}",
            pretrained=pretrained_parameters(student),
        )
    finally:
        for name, parameter in teacher.named_parameters():
            parameter.requires_grad_(teacher_was_trainable[name])
    model = merge_lora(trained_model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(was_trainable.get(name, True))
    model.eval()

    metrics: dict[str, Any] = {
        "tokens": state.tokens,
        "steps": state.step,
        "train_seconds": round(state.train_seconds, 2),
        "tokens_per_s": round(state.tokens / state.train_seconds, 1) if state.train_seconds else None,
        # per CPU-second of this process: comparable across runs on a shared machine (per process with several)
        "tokens_per_cpu_s": round(state.tokens / accelerator.num_processes / state.cpu_seconds, 1)
        if state.cpu_seconds
        else None,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "trained_parameters": trained_parameters,
        "converted_layers": converted,
        "data": data.describe(),
    }
    if state.evals:
        metrics["teacher_perplexity"] = state.evals[0]["baseline_perplexity"]
        metrics["start"] = {k: state.evals[0][k] for k in ("perplexity", "kl", "top1_agreement")}
        metrics["end"] = {k: state.evals[-1][k] for k in ("perplexity", "kl", "top1_agreement")}
        metrics["curve"] = [
            {k: record[k] for k in ("tokens", "perplexity", "kl", "top1_agreement")} for record in state.evals
        ]
    record_step(model, "distill", config, metrics=metrics, teacher=getattr(teacher, "name_or_path", None) or None)
    return model


def finish(
    model: nn.Module, output: str | Path, *, tokenizer: Any = None, overwrite: bool = False, inputs: Iterable = ()
) -> Path | None:
    """Save a distilled model to `output` (atomically, on the main process only) with the run's metrics log as
    `distill_metrics.jsonl` and its held-out curve over tokens (every distill stage so far) as `distill_curve.png`,
    written inside the save's temporary directory so that they appear with the model, then remove the run's work
    directory (`run_dir_for(output)`).

    Returns:
        `Path` or `None`: `output` on the main process, `None` on the others.
    """
    from accelerate import PartialState

    state = PartialState()
    result = None
    if state.is_main_process:
        from .plot import distill_curve, plot_curves  # not at import: `python -m hybridize.distill.plot` runs it

        work_dir = run_dir_for(output)
        extras = {}
        if (work_dir / METRICS).is_file():
            extras["distill_metrics.jsonl"] = lambda path: shutil.copyfile(work_dir / METRICS, path)
        if distill_curve(getattr(model, "hybridize_steps", [])):  # read from the hybridize.json beside it
            extras["distill_curve.png"] = lambda path: plot_curves([path.parent], path, labels=[Path(output).name])
        save(model, output, tokenizer=tokenizer, overwrite=overwrite, inputs=inputs, extras=extras)
        shutil.rmtree(work_dir, ignore_errors=True)
        result = Path(output)
    state.wait_for_everyone()
    return result


__all__ = [
    "DEFAULT_LR",
    "EVAL_EVERY",
    "SAVE_EVERY",
    "STAGES",
    "DistillConfig",
    "DistillData",
    "DistillInterrupted",
    "check_distill",
    "distill",
    "finish",
    "load_data",
    "parse_tokens",
    "run_dir_for",
]
