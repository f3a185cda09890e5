"""llama.cpp: GGUF export (`export_gguf`) and llama.cpp as a runtime for bench, generate and eval.

- `tensors.py`: a model's weights in llama.cpp's `llama` / `granitehybrid` layout, and what cannot be exported.
- `tokenizer.py`: the `tokenizer.ggml.*` fields, from the GGUF the model came from or from its tokenizer files.
- `export.py`: `export_gguf`, one atomic GGUF file at f32, f16, bf16 or q8_0.
- `runtime.py`: llama-cpp-python (the optional `gguf` extra) behind the model and tokenizer calls hybridize's tools make.
- `generate.py`, `bench.py`: `hybridize generate` and `hybridize bench` on GGUF files.

Only `runtime.py`, `generate.py` and `bench.py` need llama-cpp-python, and import it when called.
"""

from .export import export_gguf
from .tensors import check_gguf_export, gguf_layout
from .tokenizer import tokenizer_origin

__all__ = ["check_gguf_export", "export_gguf", "gguf_layout", "tokenizer_origin"]
