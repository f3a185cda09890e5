"""No code that came with a checkpoint runs without --trust-remote-code, and no pickle is ever read (issue 14, item 8):
each case plants a file that would write a marker when executed, and checks that the marker never appears."""

import json
import subprocess
import sys

import pytest
import torch
from tiny import make_tiny, run_cli, save_tiny, word_tokenizer
from transformers import AutoConfig, AutoTokenizer

import hybridize
from hybridize.errors import HybridizeError


def _payload(marker):
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"


def _load_quietly(path):
    """Load with hybridize; a clear refusal is as good as a load, so long as nothing planted ran."""
    try:
        return hybridize.load(str(path))
    except HybridizeError:
        return None


def test_auto_map_in_the_config_does_not_run(tmp_path):
    path = save_tiny(tmp_path / "m")
    (path / "evil.py").write_text(
        _payload(tmp_path / "marker") + "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig): pass\n"
    )
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (path / "config.json").write_text(json.dumps(config))
    loaded = _load_quietly(path)
    assert not (tmp_path / "marker").exists()
    assert loaded is None or type(loaded[0]).__name__ == "LlamaForCausalLM"
    AutoConfig.from_pretrained(path, trust_remote_code=True)  # the control: trusted, the planted code does run
    assert (tmp_path / "marker").exists()


def test_a_custom_tokenizer_class_does_not_run(tmp_path):
    path = save_tiny(tmp_path / "m")
    (path / "evil_tok.py").write_text(
        _payload(tmp_path / "marker")
        + "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast): pass\n"
    )
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    _load_quietly(path)
    assert not (tmp_path / "marker").exists()
    AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # the control
    assert (tmp_path / "marker").exists()


def test_a_tampered_saved_modeling_file_does_not_run(tmp_path):
    hybrid = hybridize.convert(make_tiny("llama"), hybridize.ConvertConfig(ratio=0.5, mixer_init="attention"))
    path = hybridize.save(hybrid, tmp_path / "h", tokenizer=word_tokenizer())
    for name in ("model.py", "configuration.py", "mamba2.py"):  # the modeling code saved for trust_remote_code users
        assert (path / name).is_file()
        (path / name).write_text(_payload(tmp_path / "marker") + (path / name).read_text())
    model, _ = hybridize.load(str(path))
    ids = torch.randint(0, 128, (1, 6))
    torch.testing.assert_close(model(ids).logits, hybrid(ids).logits)
    code, out = run_cli("generate", str(path), "--prompt", "w5 w6", "--max-new-tokens", "2")
    assert code == 0, out
    assert not (tmp_path / "marker").exists()
    control = "from transformers import AutoModelForCausalLM as A; A.from_pretrained({!r}, trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", control.format(str(path))], check=True, capture_output=True)
    assert (tmp_path / "marker").exists()  # the control: trusted, without hybridize, the saved code does run


def test_pickled_weights_are_never_read(tmp_path):
    class Planted:
        def __reduce__(self):
            return exec, (_payload(tmp_path / "marker"),)

    path = save_tiny(tmp_path / "m")
    (path / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Planted()}, path / "pytorch_model.bin")
    with pytest.raises(HybridizeError):
        hybridize.load(str(path))
    code, out = run_cli("convert", str(path), "--ratio", "0.5", "-o", str(tmp_path / "out"))
    assert code == 1 and "error" in out.lower()
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()
