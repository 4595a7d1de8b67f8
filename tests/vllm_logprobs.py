"""Sample with align's vllm engine (LoRA adapter of a run) and recompute the sampled tokens' log-probs with the
HF model; prints {"mean_abs_diff", "max_abs_diff", "tokens"} as JSON. Run by tests/test_vllm.py in a subprocess
(vLLM starts engine processes, hence the __main__ guard)."""

import json
import sys

if __name__ == "__main__":
    import torch

    from align.handoff import load_run_policy
    from align.stages.rollout import Sampling, render_prompts
    from align.stages.vllm_backend import VLLMEngine

    run, work = sys.argv[1], sys.argv[2]
    model, tokenizer, manifest = load_run_policy(run)
    engine = VLLMEngine(tokenizer, Sampling(8, 1.0, 1.0), base_model=manifest["base_model"], memory=0.2,
                        run_dir=work, adapter=manifest["adapter"])
    engine.sync(model, 0)
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": f"What is {i} + {2 * i}?"}] for i in range(8)])
    completions, logprobs = engine.generate(model, prompts)
    model.eval()
    diffs = []
    for prompt, completion, sampled in zip(prompts, completions, logprobs, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        recomputed = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        diffs += (recomputed - torch.tensor(sampled)).abs().tolist()
    print(json.dumps({"mean_abs_diff": sum(diffs) / len(diffs), "max_abs_diff": max(diffs), "tokens": len(diffs)}))
