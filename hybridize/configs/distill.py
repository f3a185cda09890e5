"""The options of `hybridize.distill` (`DistillConfig`, re-exported by `hybridize.distill`), of its teacher-written
data (`GenerateConfig`, re-exported by `hybridize.distill.generated`), and the choices and parsers they use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError
from ..validation import check_fields

if TYPE_CHECKING:
    import torch

STAGES = ("layerwise", "e2e")
PRECISIONS = ("auto", "no", "bf16")
KL_KINDS = ("forward_kl", "reverse_kl")  # `hybridize.distill.losses`
KL_REDUCTIONS = ("token", "batchmean")
HIDDEN_LOSSES = ("l2", "mse")
LAYER_LOSSES = (*HIDDEN_LOSSES, "mixer")  # `hybridize.distill.layerwise`
FREEZE_PRESETS = ("mixers", "all-but-mlp", "all")  # `hybridize.distill.e2e`
# Peak learning rates per stage when `lr` is not given. Layerwise trains freshly converted mixers on a smooth,
# per-layer target, so it takes a larger step; e2e also moves kept weights under presets other than `mixers`.
DEFAULT_LR = {"layerwise": 1e-3, "e2e": 3e-4}
# Runtime defaults (they never change the result): evaluation and checkpoint periods, in optimizer steps
EVAL_EVERY = 50
SAVE_EVERY = 50
# What an interrupted run advises (`hybridize distill`); a recipe replaces it with its own (`pipeline.run`)
RESUME_ADVICE = "run the same command with --resume to continue"
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
PREFIX = "generate:"  # data written by the teacher: generate:N[:PROMPTS]


def parse_tokens(value: int | str) -> int:
    """A token count: an int, or a string with an optional K/M/B suffix (`"500K"`, `"2M"`, `"1.5M"`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(value))
        if match is None:
            raise ConfigError(f"tokens={value!r} is not a token count; write e.g. 500000, 500K, 2M or 1.5B")
        count = round(float(match.group(1)) * _SUFFIXES[match.group(2).upper()])
    if count < 1:
        raise ConfigError(f"tokens={value!r} must be at least 1")
    return count


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """How the teacher writes training text for `DistillConfig(data="generate:N[:PROMPTS]")`
    (`hybridize.distill.generated`).

    Args:
        tokens (`int`): generated tokens wanted in all (prompts not counted).
        prompts (`str`, *optional*, defaults to `"wiki"`): where prompts come from; any data spec `--data` takes.
        prompt_tokens (`int`, *optional*, defaults to 32): tokens per prompt, cut from the start of each document.
        new_tokens (`int`, *optional*, defaults to 480): tokens the teacher adds per prompt (prompt + continuation is
            one 512-token block by default).
        batch_size (`int`, *optional*, defaults to 16): prompts continued together.
        temperature (`float`, *optional*, defaults to 1.0): sampling temperature (1: the teacher's distribution).
        top_k (`int`, *optional*, defaults to 0): sample from the k likeliest tokens only; 0 keeps them all.
        seed (`int`, *optional*, defaults to 0): seeds every batch (`(seed, batch)`).
    """

    tokens: int
    prompts: str = "wiki"
    prompt_tokens: int = 32
    new_tokens: int = 480
    batch_size: int = 16
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        for name in ("tokens", "prompt_tokens", "new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generate {name}={getattr(self, name)} must be at least 1")
        if not self.temperature > 0:
            raise ConfigError(f"generate temperature={self.temperature} must be positive")
        if self.top_k < 0:
            raise ConfigError(f"generate top_k={self.top_k} must not be negative (0 keeps every token)")

    @property
    def num_samples(self) -> int:
        return -(-self.tokens // self.new_tokens)

    def identity(self, teacher: torch.nn.Module) -> dict[str, Any]:
        """What a cached file must have been generated with to be reused (the token count may differ)."""
        from ..fingerprint import weights_fingerprint

        return {**{k: v for k, v in self.__dict__.items() if k != "tokens"}, "teacher": weights_fingerprint(teacher)}


def is_generate_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse_generate_spec(spec: str, **settings) -> GenerateConfig:
    """`generate:N[:PROMPTS]` (N with an optional K/M suffix) -> `GenerateConfig(tokens=N, prompts=PROMPTS, ...)`."""
    match = re.fullmatch(r"generate:([^:]+)(?::(.+))?", spec)
    if match is None:
        raise ConfigError(f"data {spec!r}: write generate:N or generate:N:PROMPTS, e.g. generate:200K:prompts.txt")
    try:
        tokens = parse_tokens(match.group(1))
    except ConfigError as error:
        raise ConfigError(f"data {spec!r}: {error} (after generate:)") from None
    return GenerateConfig(tokens=tokens, prompts=match.group(2) or "wiki", **settings)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """How to distill a hybrid student from its teacher. Everything here can change the result and is recorded in
    `hybridize.json`; a resumed run must use the same values.

    Args:
        stage (`str`, *optional*, defaults to `"e2e"`): `"layerwise"` (train each converted mixer on the teacher's
            per-layer hidden states) or `"e2e"` (logit distillation of the whole student).
        data (`str`, *optional*, defaults to `"wiki"`): the packaged Wikipedia corpus, a local `.txt`/`.jsonl`/
            `.parquet` file or folder, or a Hub dataset `name[:config]` (see `hybridize.io.text`); or
            `generate:N[:PROMPTS]`, N tokens written by the teacher continuing prompts from PROMPTS (default wiki),
            cached beside the output as `<output>.generated-<id>.jsonl` and resumable (`hybridize.distill.generated`).
        text_column (`str`, *optional*): the column holding the text; detected when omitted.
        heldout_ratio (`float`, *optional*, defaults to 0.05): fraction of documents held out of training (by a hash
            of their text); `wiki` has its own held-out split and ignores it.
        tokens (`int` or `str`, *optional*, defaults to 500K): the token budget, e.g. `500_000`, `"500K"`, `"2M"`;
            rounded up to whole optimizer steps. A budget larger than the data repeats it (one shuffle per epoch).
        seq_len (`int`, *optional*, defaults to 512): tokens per packed training block.
        batch_size (`int`, *optional*, defaults to 4): blocks per micro-batch and process.
        grad_accum (`int`, *optional*, defaults to 1): micro-batches per optimizer step. One step takes
            `batch_size * grad_accum * num_processes` blocks.
        lr (`float`, *optional*): peak learning rate; defaults to `DEFAULT_LR[stage]`.
        min_lr_ratio (`float`, *optional*, defaults to 0.1): the cosine decays to `lr * min_lr_ratio`.
        pretrained_lr_ratio (`float`, *optional*, defaults to 1.0): the learning rate of the weights the source
            already had (its MLPs, norms, embeddings and kept attention, under `freeze` `all-but-mlp` or `all`)
            as a fraction of `lr`; the new mixers (and LoRA adapters) train at `lr`. Fresh mixers want larger steps
            than pretrained weights, which a small step only adapts around them.
        warmup_ratio (`float`, *optional*, defaults to 0.05): fraction of steps of linear warmup.
        weight_decay (`float`, *optional*, defaults to 0.0): AdamW's decoupled weight decay.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.98)`): AdamW betas (MambaInLlama's).
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient clipping norm; 0 disables clipping.
        loss (`str`, *optional*, defaults to `"forward_kl"`): e2e logit loss, `"forward_kl"` KL(teacher || student)
            or `"reverse_kl"` KL(student || teacher).
        kl_reduction (`str`, *optional*, defaults to `"token"`): `"token"` averages the KL per position;
            `"batchmean"` reproduces MambaInLlama's per-sequence sum (see `hybridize.distill.losses`).
        ce_weight (`float`, *optional*, defaults to 0.0): weight of the next-token cross-entropy added to the KL.
        kl_weight (`float`, *optional*, defaults to 1.0): weight of the e2e KL. 0 with `ce_weight` > 0 is plain
            fine-tuning on the data (the teacher is then not run in training, only in evaluation).
        layer_loss (`str`, *optional*, defaults to `"l2"`): layerwise loss per token: on each converted block's output,
            `"l2"` (MaTVLM's unsquared L2 norm) or `"mse"`; or `"mixer"`, the MSE of each new mixer's output against the
            teacher attention's output on the same input (attention transfer: no norm or MLP runs, about twice as
            cheap).
        freeze (`str`, *optional*, defaults to `"mixers"`): e2e freezing preset, named after what trains: `"mixers"`
            (the converted mixers), `"all-but-mlp"` or `"all"`. The layerwise stage always trains the mixers only.
        lora_rank (`int`, *optional*, defaults to 0): with a rank > 0, the pretrained linear layers the preset trains
            learn a LoRA update (merged at the end) instead of a full one; needs `freeze` `all-but-mlp` or `all`.
        lora_alpha (`float`, *optional*, defaults to 16.0): LoRA scaling numerator (update scaled by alpha / rank).
        eval_tokens (`int`, *optional*, defaults to 16384): held-out tokens per evaluation (perplexity, KL and top-1
            agreement against the teacher); 0 disables evaluation.
        mixed_precision (`str`, *optional*, defaults to `"auto"`): `"bf16"` autocast, `"no"` (float32), or
            `"auto"`: bf16 on a GPU that supports it, float32 on CPU.
        seed (`int`, *optional*, defaults to 0): seeds the data order and everything random.

    Example:
        ```python
        >>> config = DistillConfig(stage="layerwise", tokens="500K")
        ```
    """

    stage: Literal["layerwise", "e2e"] = "e2e"
    data: str = "wiki"
    text_column: str | None = None
    heldout_ratio: float = 0.05
    tokens: int | str = 500_000
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    min_lr_ratio: float = 0.1
    pretrained_lr_ratio: float = 1.0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float = 1.0
    loss: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    kl_reduction: Literal["token", "batchmean"] = "token"
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    layer_loss: Literal["l2", "mse", "mixer"] = "l2"
    freeze: Literal["mixers", "all-but-mlp", "all"] = "mixers"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    eval_tokens: int = 16384
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    seed: int = 0

    def __post_init__(self):
        check_fields(self)

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")

        choice("stage", STAGES)
        choice("loss", KL_KINDS)
        choice("kl_reduction", KL_REDUCTIONS)
        choice("layer_loss", LAYER_LOSSES)
        choice("freeze", FREEZE_PRESETS)
        choice("mixed_precision", PRECISIONS)
        if is_generate_spec(self.data):
            parse_generate_spec(self.data)  # a bad count fails here, before any model is loaded
        object.__setattr__(self, "tokens", parse_tokens(self.tokens))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.stage])
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} is too short; a block needs at least 2 tokens")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        for name in ("min_lr_ratio", "pretrained_lr_ratio", "warmup_ratio", "heldout_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas={self.betas} must be two numbers in [0, 1)")
        for name in ("weight_decay", "max_grad_norm", "ce_weight", "kl_weight", "eval_tokens", "lora_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative")
        if self.stage == "e2e" and not (self.kl_weight or self.ce_weight):
            raise ConfigError("kl_weight and ce_weight are both 0: nothing to train on; give one of them a weight")
        if self.stage == "layerwise" and self.freeze != "mixers":
            raise ConfigError(
                f"freeze={self.freeze!r} does not apply to the layerwise stage, which trains only the converted "
                "mixers; use --stage e2e, or leave --freeze at mixers"
            )
        if self.lora_rank and (self.stage != "e2e" or self.freeze == "mixers"):
            raise ConfigError(
                f"lora_rank={self.lora_rank} needs stage e2e with freeze all-but-mlp or all: LoRA adapts the kept "
                "pretrained layers, and the new mixers always train in full"
            )
        if self.eval_tokens and self.eval_tokens < self.seq_len:
            raise ConfigError(
                f"eval_tokens={self.eval_tokens} is less than seq_len={self.seq_len}; raise it, or 0 disables evaluation"
            )


__all__ = [
    "DEFAULT_LR",
    "EVAL_EVERY",
    "FREEZE_PRESETS",
    "HIDDEN_LOSSES",
    "KL_KINDS",
    "KL_REDUCTIONS",
    "LAYER_LOSSES",
    "PRECISIONS",
    "PREFIX",
    "RESUME_ADVICE",
    "SAVE_EVERY",
    "STAGES",
    "DistillConfig",
    "GenerateConfig",
    "is_generate_spec",
    "parse_generate_spec",
    "parse_tokens",
]
