"""The training loop shared by every distillation stage, on `accelerate`: one or several processes (CPU with gloo, or
GPUs), gradient accumulation, bf16 autocast where the hardware has it, AdamW with linear warmup and cosine decay,
gradient clipping, a token budget, periodic held-out evaluation, checkpoints and an exact resume, a progress bar and a
metrics JSONL log.

A stage hands the loop an *objective*: an `nn.Module` whose `forward(input_ids)` returns `(loss, logs)` and whose
trainable parameters are exactly those with `requires_grad`. The loop knows nothing else about the stage.

Data order is a pure function of the seed and the step: blocks are read from an endless stream made of one seeded
permutation per epoch, and optimizer step `s` of process `r` takes micro-batch `m` from positions
`s * G + (m * P + r) * B` onwards (B sequences per micro-batch, P processes, G = B * grad_accum * P per step).
A checkpoint therefore needs only the step count for the data position; with the trainable weights, the optimizer and
scheduler states and each process's RNG states, a resumed run computes exactly what an uninterrupted one computes.

Ctrl-C (SIGINT) and SIGTERM do not kill the run: the current optimizer step finishes, every process agrees to stop,
a checkpoint is written, and `DistillInterrupted` is raised. A second Ctrl-C stops at once without saving.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import pickle
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..configs.distill import RESUME_ADVICE, DistillConfig
from ..errors import CheckpointError, HybridizeError, OutputError
from ..io.text import DistillData

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
_STATE = "state.json"
_WEIGHTS = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"


class DistillInterrupted(HybridizeError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint; `--resume` continues it."""


@dataclass
class RunState:
    """Where a run is: optimizer steps done, tokens trained on, wall and CPU seconds spent training (evaluation
    excluded; CPU seconds of this process, all its threads, so that a shared machine's load does not count)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    evals: list[dict[str, Any]] = field(default_factory=list)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup over `warmup_steps`,
    then a cosine from 1 down to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BlockStream:
    """The endless, seeded sequence of block indices: epoch e is `randperm(num_blocks)` seeded by `seed + e`."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed = num_blocks, seed
        self._epochs: dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epochs = {epoch: torch.randperm(self.num_blocks, generator=generator)}  # keep one epoch in memory
        return self._epochs[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        """The block indices at stream positions `start .. start + count - 1`."""
        positions = range(start, start + count)
        return torch.stack([self._epoch(p // self.num_blocks)[p % self.num_blocks] for p in positions])


def rng_state() -> dict[str, Any]:
    """Every generator's state, in types `torch.load(weights_only=True)` reads back (tensors, ints, tuples): a
    checkpoint must not be able to run code when it is resumed."""
    version, internal, gauss = random.getstate()
    state = {"python": (version, torch.tensor(internal, dtype=torch.int64), gauss), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy

        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype(numpy.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _safe_load(path: Path) -> Any:
    """`torch.load` that cannot execute code: a planted or tampered pickle is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a checkpoint file this run wrote ({type(error).__name__}); it was not loaded. Pass "
            "--overwrite to start over"
        ) from None


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _space_for_checkpoint(work_dir: Path, objective: nn.Module) -> Iterator[None]:
    """A full disk while checkpointing becomes an `OutputError` saying how much a checkpoint needs; the partial
    temporary is removed and the previous checkpoint kept."""
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        shutil.rmtree(work_dir / f"{CHECKPOINT}.tmp", ignore_errors=True)
        needed = 3 * sum(p.numel() * p.element_size() for p in _trainable(objective).values())
        raise OutputError(
            f"no space left in {work_dir} for a checkpoint: it needs about {needed / 2**20:,.0f} MiB (the trained "
            "weights and the optimizer's two moments); the previous checkpoint, if any, is kept"
        ) from None


def save_checkpoint(
    accelerator: Accelerator,
    work_dir: Path,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: RunState,
    identity: dict[str, Any],
) -> Path:
    """Write `work_dir/checkpoint` atomically (a temporary sibling renamed into place); every process takes part."""
    with _space_for_checkpoint(work_dir, objective):
        target, tmp = work_dir / CHECKPOINT, work_dir / f"{CHECKPOINT}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            weights = {name: p.detach().cpu().contiguous() for name, p in _trainable(objective).items()}
            save_file(weights, tmp / _WEIGHTS)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / _OPTIMIZER)
            payload = {
                "step": state.step,
                "tokens": state.tokens,
                "train_seconds": state.train_seconds,
                "cpu_seconds": state.cpu_seconds,
                "evals": state.evals,
                "identity": identity,
            }
            (tmp / _STATE).write_text(json.dumps(payload, indent=2) + "\n")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            old = work_dir / f"{CHECKPOINT}.old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return target


def recover_checkpoint(work_dir: Path) -> None:
    """A crash between the two renames of `save_checkpoint` leaves the previous checkpoint only as `checkpoint.old`
    (complete: it was renamed whole): put it back."""
    target, old = work_dir / CHECKPOINT, work_dir / f"{CHECKPOINT}.old"
    if not target.exists() and (old / _STATE).is_file():
        old.rename(target)
        logger.warning("recovered the checkpoint in %s (a save was interrupted between two renames)", target)


def read_checkpoint_state(work_dir: Path) -> dict[str, Any]:
    """The `state.json` of the checkpoint in `work_dir`, or a `CheckpointError` saying why there is none."""
    recover_checkpoint(work_dir)
    path = work_dir / CHECKPOINT / _STATE
    if not path.is_file():
        raise CheckpointError(
            f"nothing to resume: no checkpoint in {work_dir / CHECKPOINT}; run the same command without --resume"
        )
    return json.loads(path.read_text())


def load_checkpoint(
    accelerator: Accelerator,
    work_dir: Path,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    identity: dict[str, Any],
) -> RunState:
    """Restore what `save_checkpoint` wrote, after checking that it belongs to this very run."""
    directory = work_dir / CHECKPOINT
    saved = read_checkpoint_state(work_dir)
    differences = sorted(
        key for key in set(saved["identity"]) | set(identity) if saved["identity"].get(key) != identity.get(key)
    )
    if differences:
        detail = ", ".join(f"{k}: {saved['identity'].get(k)!r} -> {identity.get(k)!r}" for k in differences)
        raise CheckpointError(
            f"the checkpoint in {directory} was made by a different run ({detail}); resume with the same student, "
            "teacher, data, settings and number of processes, or pass --overwrite to start over"
        )
    weights = load_file(directory / _WEIGHTS)
    params = _trainable(objective)
    if set(weights) != set(params):
        raise CheckpointError(f"the checkpoint in {directory} holds other parameters than this run trains")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(weights[name])
    states = _safe_load(directory / _OPTIMIZER)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng_path = directory / f"rng-{accelerator.process_index}.pt"
    set_rng_state(_safe_load(rng_path))
    return RunState(
        step=saved["step"],
        tokens=saved["tokens"],
        train_seconds=saved["train_seconds"],
        cpu_seconds=saved["cpu_seconds"],
        evals=saved["evals"],
    )


class MetricsLog:
    """Append-only JSONL, one record per optimizer step or evaluation; written by the main process only."""

    def __init__(self, path: Path | None, *, enabled: bool, keep_until_step: int | None = None):
        self.path = path if enabled else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.is_file() and keep_until_step is not None else []
        # a resumed run rewrites the log as of its checkpoint, so steps after it are not counted twice
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= keep_until_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked at step boundaries; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.warning("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _micro_batches(
    stream: BlockStream, blocks: torch.Tensor, *, step: int, config: DistillConfig, accelerator: Accelerator
) -> Iterator[torch.Tensor]:
    B, P = config.batch_size, accelerator.num_processes
    start = step * B * config.grad_accum * P
    for micro in range(config.grad_accum):
        indices = stream.take(start + (micro * P + accelerator.process_index) * B, B)
        yield blocks[indices].to(accelerator.device)


def train(
    objective: nn.Module,
    data: DistillData,
    config: DistillConfig,
    *,
    accelerator: Accelerator,
    evaluate: Callable[[], dict[str, float]] | None,
    identity: dict[str, Any],
    work_dir: Path | None = None,
    resume: bool = False,
    eval_every: int = 0,
    save_every: int = 0,
    progress: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    desc: str = "distill",
    pretrained: Collection[int] = (),
) -> RunState:
    """Optimise `objective`'s trainable parameters on `data.train` for `config.tokens` tokens.

    Args:
        objective (`nn.Module`): `forward(input_ids) -> (loss, logs)`; the parameters with `requires_grad` train.
        data (`DistillData`): the packed blocks.
        config (`DistillConfig`): batch sizes, token budget and optimiser settings.
        accelerator (`Accelerator`): the processes and precision.
        evaluate (`Callable`, *optional*): held-out metrics, run on the main process at step 0, every `eval_every`
            steps and at the end.
        identity (`dict`): what makes this run this run (config, data and student fingerprints, processes); a
            checkpoint only resumes a run with the same identity.
        work_dir (`Path`, *optional*): where `checkpoint/` and `metrics.jsonl` live; without it nothing is written.
        resume (`bool`, *optional*): continue from `work_dir/checkpoint`.
        eval_every (`int`, *optional*): steps between evaluations; 0 evaluates only at the start and the end.
        save_every (`int`, *optional*): steps between checkpoints; 0 saves only when interrupted.
        progress (`bool`, *optional*): a tqdm bar with loss, tokens/s and ETA.
        on_step (`Callable`, *optional*): called with each step's record; may raise `KeyboardInterrupt` to stop.
        desc (`str`, *optional*): the progress bar's label.
        pretrained (`Collection[int]`, *optional*): ids of the trained parameters the source already had; they
            train at `config.lr * config.pretrained_lr_ratio`, the others at `config.lr`.

    Returns:
        `RunState`: steps, tokens, training seconds and the evaluations.
    """
    P = accelerator.num_processes
    tokens_per_step = config.batch_size * config.grad_accum * P * config.seq_len
    total_steps = max(1, math.ceil(config.tokens / tokens_per_step))
    warmup_steps = round(config.warmup_ratio * total_steps)
    params = list(_trainable(objective).values())
    if not params:
        raise HybridizeError("nothing to train: no parameter requires grad")
    groups = [{"params": [p for p in params if id(p) not in pretrained], "lr": config.lr}]
    groups.append({"params": [p for p in params if id(p) in pretrained], "lr": config.lr * config.pretrained_lr_ratio})
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], betas=tuple(config.betas), weight_decay=config.weight_decay, eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=config.min_lr_ratio
        ),
    )
    model, optimizer = accelerator.prepare(objective, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    state = RunState()
    if resume:
        state = load_checkpoint(accelerator, work_dir, unwrapped, optimizer, scheduler, identity)
        logger.info("resumed at step %d (%d tokens)", state.step, state.tokens)
    log = MetricsLog(
        work_dir / METRICS if work_dir else None,
        enabled=accelerator.is_main_process,
        keep_until_step=state.step if resume else -1,
    )
    stream = BlockStream(data.train.shape[0], config.seed)

    def run_eval() -> None:
        if evaluate is None:
            return
        if accelerator.is_main_process:
            record = {"step": state.step, "tokens": state.tokens, **evaluate()}
            state.evals.append(record)
            log.write({"kind": "eval", **record})
            logger.info("eval at %d tokens: %s", state.tokens, record)
        accelerator.wait_for_everyone()

    def checkpoint() -> Path | None:
        if work_dir is None:
            return None
        return save_checkpoint(accelerator, work_dir, unwrapped, optimizer, scheduler, state, identity)

    if not resume:
        run_eval()
    bar = tqdm(
        total=total_steps * tokens_per_step,
        initial=state.tokens,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not (progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    session_tokens, session_seconds = 0, 0.0
    with StopRequest() as stop, bar:
        while state.step < total_steps:
            started, started_cpu = time.perf_counter(), time.process_time()
            model.train()
            loss_sum = torch.zeros((), device=accelerator.device)
            logs: dict[str, float] = {}
            for micro, input_ids in enumerate(
                _micro_batches(stream, data.train, step=state.step, config=config, accelerator=accelerator)
            ):
                last = micro == config.grad_accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss, micro_logs = model(input_ids)
                    accelerator.backward(loss / config.grad_accum)
                loss_sum += loss.detach().float() / config.grad_accum
                for key, value in micro_logs.items():
                    logs[key] = logs.get(key, 0.0) + value / config.grad_accum
            grad_norm = (
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
                if config.max_grad_norm > 0
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            state.step += 1
            state.tokens += tokens_per_step
            state.train_seconds += elapsed
            state.cpu_seconds += time.process_time() - started_cpu
            session_tokens += tokens_per_step
            session_seconds += elapsed

            record = {
                "kind": "train",
                "step": state.step,
                "tokens": state.tokens,
                "loss": loss_sum.item(),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": session_tokens / session_seconds,
                "cpu_seconds": state.cpu_seconds,
                **logs,
            }
            interrupted = False
            try:
                if on_step is not None:
                    on_step(record)
            except KeyboardInterrupt:
                interrupted = True
            # one collective per step: the mean loss over processes and whether any process must stop
            flags = torch.tensor([record["loss"], float(stop.requested or interrupted)], device=accelerator.device)
            if P > 1:
                flags = accelerator.reduce(flags, reduction="sum")
                record["loss"] = flags[0].item() / P
            log.write(record)
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.2e}", refresh=False)

            if flags[1].item() > 0:
                path = checkpoint()
                where = (
                    f"checkpoint saved in {path}; {RESUME_ADVICE}" if path else ("no checkpoint (no work directory)")
                )
                raise DistillInterrupted(
                    f"interrupted at step {state.step}/{total_steps} ({state.tokens} tokens); {where}"
                )
            if state.step < total_steps:
                if eval_every and state.step % eval_every == 0:
                    run_eval()
                if save_every and state.step % save_every == 0:
                    checkpoint()
    run_eval()
    return state


__all__ = [
    "CHECKPOINT",
    "METRICS",
    "BlockStream",
    "DistillInterrupted",
    "MetricsLog",
    "RunState",
    "StopRequest",
    "load_checkpoint",
    "lr_factor",
    "read_checkpoint_state",
    "save_checkpoint",
    "train",
]
