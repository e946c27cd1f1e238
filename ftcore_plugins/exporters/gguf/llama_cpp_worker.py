"""What gguf-export asks of llama.cpp (llama-cpp-python), run in a child process.

llama.cpp aborts the whole process on some malformed inputs (GGML_ASSERT) and runs its own
thread pool; in a child, neither can take the training process down or slow it. The parent
calls ``run(request)``; the child is ``python -m ftcore_plugins.exporters.gguf.llama_cpp_worker``.

Requests (JSON):
- ``{"op": "quantize", "source": path, "output": path, "type": "q4_k_m"}``: llama.cpp's own quantizer;
- ``{"op": "generate", "model": path, "lora": path|None, "prompts": [text], "max_new_tokens": n,
  "forced": [[token]]}``: for each prompt, llama.cpp's own greedy continuation, stopping at a token it
  treats as end of generation, and its next-token choice at each step of the forced continuation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# llama.cpp's file types (enum llama_ftype) for the quantizer.
FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
GGML_TYPE_F32 = 0


class WorkerError(RuntimeError):
    """llama.cpp failed; the message carries the end of what it printed."""


def run(request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one request in a child process and return its JSON answer."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ftcore-llama-cpp-") as tmp:
        answer = Path(tmp) / "answer.json"
        proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(request), str(answer)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0 or not answer.is_file():
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise WorkerError(f"llama.cpp stopped with status {proc.returncode}:\n{tail}")
        return json.loads(answer.read_text(encoding="utf-8"))


def _quantize(request: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[request["type"]]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(request["source"].encode(), request["output"].encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize returned {status}")
    return {"ok": True}


def _generate(request: dict[str, Any]) -> dict[str, Any]:
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    # An f32 KV cache, so that the file's weights are what is compared, not the cache's rounding.
    llm = Llama(request["model"], n_ctx=request.get("n_ctx", 1024), n_threads=os.cpu_count() or 1, verbose=False,
                seed=0, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, lora_path=request.get("lora"))
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n_vocab = llm.n_vocab()
    outputs = []
    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                                   shape=(n_vocab,))))

    for prompt, forced in zip(request["prompts"], request.get("forced") or [[] for _ in request["prompts"]]):
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        tokens, stopped = [], False
        for _ in range(request["max_new_tokens"]):
            tokens.append(next_token())
            if llama_cpp.llama_vocab_is_eog(vocab, ctypes.c_int32(tokens[-1])):
                stopped = True
                break
            llm.eval(tokens[-1:])
        llm.reset()
        llm.eval(ids)
        choices = []
        for i, token in enumerate(forced):
            choices.append(next_token())
            if i + 1 < len(forced):
                llm.eval([token])
        outputs.append({"prompt_ids": ids, "tokens": tokens, "stopped": stopped, "forced_choices": choices})
    llm.close()
    return {"outputs": outputs}


if __name__ == "__main__":
    task = json.loads(sys.argv[1])
    result = {"quantize": _quantize, "generate": _generate}[task["op"]](task)
    Path(sys.argv[2]).write_text(json.dumps(result), encoding="utf-8")
