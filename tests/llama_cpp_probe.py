"""Run llama.cpp (llama-cpp-python) on a GGUF file in a child process and report what it computed.

The tests call it through ``probe()``: llama.cpp's own threading runtime then never
shares a process with torch's, which slows the rest of the test session down.

    python llama_cpp_probe.py REQUEST.json RESULT.npz
REQUEST: {"model": path, "vocab_only": bool, "lora": path or absent,
          "ops": [{"op": "logits"|"greedy"|"tokenize"|"detokenize"|"chat"|"n_vocab", ...}]}
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

GGML_TYPE_F32 = 0


def probe(model: Path, ops: list[dict[str, Any]], vocab_only: bool = False, lora: Path | None = None) -> list[Any]:
    """Results of ``ops`` run by llama.cpp on ``model`` (with the GGUF LoRA adapter ``lora`` applied), in order."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.npz"
        request.write_text(json.dumps({"model": str(model), "vocab_only": vocab_only, "ops": ops,
                                           "lora": str(lora) if lora else None}))
        proc = subprocess.run([sys.executable, __file__, str(request), str(result)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"llama.cpp failed on {model}:\n{proc.stderr[-3000:]}"
        with np.load(result) as data:
            plain = json.loads(str(data["json"]))
            return [data[f"a{i}"] if f"a{i}" in data else plain[i] for i in range(len(ops))]


def _run(request: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    import numpy as np
    from llama_cpp import Llama

    # An f32 KV cache, so that f32 weights are compared at f32 precision.
    llm = Llama(request["model"], logits_all=True, n_ctx=256, n_threads=2, verbose=False, seed=0,
                vocab_only=request["vocab_only"], type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                lora_path=request.get("lora"))
    plain: list[Any] = []
    arrays: dict[str, Any] = {}
    for i, op in enumerate(request["ops"]):
        value: Any = None
        if op["op"] == "tokenize":
            value = llm.tokenize(op["text"].encode("utf-8"), add_bos=True, special=True)
        elif op["op"] == "detokenize":
            value = llm.detokenize(op["ids"], special=True).decode("utf-8")
        elif op["op"] == "chat":   # render with the file's own chat template, as llama-cpp-python's chat does
            value = _chat_prompt(llm, op["messages"])
            value = [value, llm.tokenize(value.encode("utf-8"), add_bos=False, special=True)]
        elif op["op"] == "n_vocab":
            value = llm.n_vocab()
        elif op["op"] == "logits":
            llm.reset()
            llm.eval(op["ids"])
            arrays[f"a{i}"] = np.array(llm.scores[: len(op["ids"])], dtype=np.float32)
        elif op["op"] == "greedy":
            llm.reset()
            llm.eval(op["ids"])
            value = []
            for _ in range(op["n"]):
                value.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([value[-1]])
        else:
            raise ValueError(f"unknown op {op['op']!r}")
        plain.append(value)
    llm.close()
    return plain, arrays


def _chat_prompt(llm: Any, messages: list[dict[str, str]]) -> str:
    """The prompt llama-cpp-python builds from the GGUF's tokenizer.chat_template (see Llama.__init__)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token_id: int) -> str:
        return llm._model.token_get_text(token_id) if token_id != -1 else ""

    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                    eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))
    return formatter(messages=messages).prompt


if __name__ == "__main__":
    import numpy as np

    plain, arrays = _run(json.loads(Path(sys.argv[1]).read_text()))
    np.savez(sys.argv[2], json=np.array(json.dumps(plain)), **arrays)
