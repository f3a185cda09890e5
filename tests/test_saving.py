"""Atomic output: nothing at the output path unless the save completed; existing outputs need overwrite (the manifest
it writes is in tests/test_provenance.py)."""

import os

import pytest
from tiny import make_tiny

import hybridize
from hybridize.errors import OutputExistsError
from hybridize.saving import atomic_output


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_text("partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    model = make_tiny("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        hybridize.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    hybridize.save(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left behind


# --- issue 14: nothing lost, whatever the input, the machine or another writer does ---------------------------------


@pytest.fixture
def mount(tmp_path):
    """A tmpfs the test mounts itself (root only; skipped where mounting is not allowed)."""
    import subprocess

    mounted = []

    def make(name, *options):
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(point)], capture_output=True
        )
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_an_output_overlapping_an_input_is_refused_even_with_overwrite(tmp_path, where):
    from hybridize.errors import OutputError

    model = make_tiny("llama")
    source = tmp_path / "src"
    hybridize.save(model, source)
    before = sorted((p.name, p.read_bytes()) for p in source.iterdir())
    output = {"same": source, "inside": source / "sub", "holds": tmp_path}[where]
    with pytest.raises(
        OutputError, match={"same": "is the input", "inside": "inside the input", "holds": "holds"}[where]
    ):
        hybridize.save(model, output, overwrite=True, inputs=[str(source), "llama"])
    assert sorted((p.name, p.read_bytes()) for p in source.iterdir()) == before


def test_a_second_writer_without_overwrite_fails_and_the_first_output_stays(tmp_path):
    model = make_tiny("llama")
    with pytest.raises(OutputExistsError, match="another process"):
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "mine.txt").write_text("late")
            hybridize.save(model, tmp_path / "out")  # the other writer finishes first
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_with_overwrite_wins_and_says_so(tmp_path, caplog):
    model = make_tiny("llama")
    with atomic_output(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "mine.txt").write_text("last")
        hybridize.save(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert "written by another process while this one ran" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_processes_writing_one_output(tmp_path):
    """Real processes, started together: exactly one succeeds without --overwrite, the other says it exists."""
    import subprocess
    import sys

    script = (
        "import sys, time; sys.path.insert(0, 'tests'); from tiny import make_tiny; import hybridize\n"
        "from hybridize.errors import OutputExistsError\n"
        "model = make_tiny('llama'); time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
        "try:\n    hybridize.save(model, sys.argv[1])\nexcept OutputExistsError as e:\n    print(e); sys.exit(3)\n"
    )
    import time

    start = str(time.time() + 8)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), start], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes == [0, 3]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwriting_a_file_leaves_no_old_copy(tmp_path):
    (tmp_path / "out").write_text("a file where the model goes")
    hybridize.save(make_tiny("llama"), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out").is_dir()


def test_stale_temporaries_of_a_dead_writer_are_removed_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.{dead_pid}.abcd1234.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / f".out.{dead_pid}.abcd1234.old").write_text("old file")
    live = tmp_path / f".out.{os.getppid()}.abcd1234.tmp"  # our parent is alive
    live.mkdir()
    other = tmp_path / f".out.5.{dead_pid}.abcd1234.tmp"  # another output's ("out.5") temporary: not ours to touch
    other.mkdir()
    hybridize.save(make_tiny("llama"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_a_parent_that_is_a_file_is_refused_before_any_work(tmp_path):
    from hybridize.errors import OutputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        hybridize.check_output(tmp_path / "file" / "sub" / "out")


def test_a_read_only_filesystem_is_refused_before_any_work(mount):
    from hybridize.errors import OutputError

    read_only = mount("ro", "ro", "size=1m")
    with pytest.raises(OutputError, match="not writable"):
        hybridize.check_output(read_only / "out")


def test_no_space_says_how_much_is_needed_and_leaves_nothing(mount, monkeypatch, tmp_path):
    from hybridize.errors import OutputError

    small = mount("small", "size=256k")
    model = make_tiny("llama")  # ~610 KiB of weights
    with pytest.raises(OutputError, match=r"needs about 1 MiB and .* has 0 MiB free"):
        hybridize.save(model, small / "out")
    assert list(small.iterdir()) == []

    def full(*args, **kwargs):  # the estimate fits but the device fills while writing
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(OutputError, match="no space left"):
        hybridize.save(model, tmp_path / "roomy" / "out")
    assert list((tmp_path / "roomy").iterdir()) == []


def test_extras_are_written_inside_the_save_and_a_failing_one_leaves_nothing(tmp_path):
    model = make_tiny("llama")
    hybridize.save(model, tmp_path / "m", extras={"notes.txt": lambda path: path.write_text("hello")})
    assert (tmp_path / "m" / "notes.txt").read_text() == "hello" and (tmp_path / "m" / "hybridize.json").is_file()

    def fail(path):
        raise RuntimeError("the plot failed")

    with pytest.raises(RuntimeError, match="the plot failed"):
        hybridize.save(model, tmp_path / "n", extras={"curve.png": fail})
    assert not (tmp_path / "n").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
