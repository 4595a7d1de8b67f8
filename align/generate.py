"""`align generate`: sample from a run (base + adapter, or its full model) or a plain model directory, with
the chat template. Greedy by default (--temperature 0)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align.config import Config, RemoteCodeOption, opt
from align.errors import Problems
from align.models import target_problem


@dataclass
class GenerateConfig(RemoteCodeOption, Config):
    positional = "target"
    target: str | None = opt(None, "A run directory (from any stage) or a model directory / hub id.")
    prompt: list[str] = opt(factory=list, help="User message(s) to answer; several prompts are generated as one batch.")
    system_prompt: str | None = opt(None, "System message placed before each prompt.")
    max_new_tokens: int = opt(64, "Tokens to generate per prompt.", range="[1, inf)")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.", range="[0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling threshold.", range="(0, 1]")
    seed: int = opt(0, "Sampling seed.")

    def check(self, problems: Problems) -> None:
        if not self.target:
            problems.add("Give a run or model directory: align generate RUN --prompt '...'.")
        elif problem := target_problem(self.target):
            problems.add(problem)
        if not self.prompt:
            problems.add("--prompt is required.")
        if self.max_new_tokens <= 0:
            problems.add(f"--max-new-tokens must be positive, got {self.max_new_tokens}.")
        if self.temperature < 0:
            problems.add(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            problems.add(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.target and (Path(self.target) / "run.json").is_file():
            from align.runs import read_manifest

            if read_manifest(self.target).get("task") == "seq-cls":
                problems.add(f"{self.target} is a reward model (align rm): it scores text, it does not generate. "
                             f"Score with `align rm score {self.target} --data D`, or generate from a policy run.")


def load_target(target: str, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer, manifest or None) for a run directory or a model directory / hub id."""
    from align.handoff import load_run_policy
    from align.models import load_base_model, load_tokenizer

    if (Path(target) / "run.json").is_file():
        model, tokenizer, manifest = load_run_policy(target, trust_remote_code=trust_remote_code)
    else:
        model = load_base_model(target, trust_remote_code=trust_remote_code)
        tokenizer, manifest = load_tokenizer(target, trust_remote_code), None
    model.eval()
    return model, tokenizer, manifest


def generate(model, tokenizer, prompts: list[str], *, system_prompt: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Completions (decoded, without the prompt) for each user prompt, batched with left padding."""
    import torch

    conversations = [([{"role": "system", "content": system_prompt}] if system_prompt else [])
                     + [{"role": "user", "content": p}] for p in prompts]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def main(cfg: GenerateConfig) -> str:
    cfg.validate()
    from transformers import set_seed

    set_seed(cfg.seed)
    model, tokenizer, _ = load_target(cfg.target, cfg.trust_remote_code)
    outs = generate(model, tokenizer, cfg.prompt, system_prompt=cfg.system_prompt, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p)
    return "\n".join(f"### {p}\n{o}" if len(outs) > 1 else o for p, o in zip(cfg.prompt, outs, strict=True))
