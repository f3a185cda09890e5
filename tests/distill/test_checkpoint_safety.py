"""A distillation checkpoint can't run code when resumed, survives a crash between its two renames, and a full
disk is reported with the size needed (issue 14, items 6, 7 and 9)."""

import errno
import os

import pytest
import torch

from hybridize.distill import DistillConfig, DistillInterrupted, distill
from hybridize.errors import CheckpointError, OutputError, OutputExistsError


def _config(text_file):
    return DistillConfig(data=str(text_file), tokens=16 * 2 * 6, seq_len=16, batch_size=2, eval_tokens=0)


def _interrupted_run(make_student, teacher, tokenizer, config, work_dir):
    def stop_at_2(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(DistillInterrupted):
        distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=work_dir, on_step=stop_at_2)
    return work_dir / "checkpoint"


class _Planted:
    """Unpickling this runs `os.system`: what a planted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng-0.pt"])
def test_a_planted_pickle_is_refused_not_run(make_student, teacher, tokenizer, text_file, tmp_path, planted):
    config = _config(text_file)
    checkpoint = _interrupted_run(make_student, teacher, tokenizer, config, tmp_path / "run")
    assert (checkpoint / planted).is_file()
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Planted(marker)}, checkpoint / planted)
    torch.save(_Planted(tmp_path / "control"), tmp_path / "control.pt")  # the payload runs when loaded unsafely
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control").exists()

    with pytest.raises(CheckpointError, match="not a checkpoint file this run wrote"):
        distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=tmp_path / "run", resume=True)
    assert not marker.exists()


def test_resume_after_a_crash_between_the_renames(make_student, teacher, tokenizer, text_file, tmp_path):
    config = _config(text_file)
    reference = distill(make_student(), config, teacher=teacher, tokenizer=tokenizer)
    checkpoint = _interrupted_run(make_student, teacher, tokenizer, config, tmp_path / "run")
    checkpoint.rename(checkpoint.with_name("checkpoint.old"))  # what a kill between the two renames leaves

    with pytest.raises(OutputExistsError, match="--resume"):  # still seen as an unfinished run
        distill(make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=tmp_path / "run")
    resumed = distill(
        make_student(), config, teacher=teacher, tokenizer=tokenizer, work_dir=tmp_path / "run", resume=True
    )
    for expected, actual in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(expected, actual)


def test_no_space_for_a_checkpoint_says_how_much(make_student, teacher, tokenizer, text_file, tmp_path, monkeypatch):
    from hybridize.distill import engine

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "save_file", full)
    with pytest.raises(OutputError, match=r"no space left in .* needs about [\d.,]+ MiB"):
        _interrupted_run(make_student, teacher, tokenizer, _config(text_file), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
