"""TRL 0.13 PPOTrainer driver for bench/ppo_vs_trl.py (not a benchmark itself; runs in the venv that
ppo_vs_trl.py creates, bench/.venv-trl013, with transformers 4.x).

Sets up PPO the way TRL 0.13's examples/scripts/ppo/ppo.py does: policy and reference = two full copies of the SFT
model, value model and reward model = two full AutoModelForSequenceClassification copies of the reward model; with
--lora, a peft_config on the policy instead (the reference is then the policy with its adapter disabled, the value
and reward models stay full). Prompts come pre-tokenized from the parent (the same ids align renders), so both
sides see the same prompt set. Writes, to --out, per-step end timestamps with CPU samples (bench/_common.py's
`cpu_seconds`), generation time and lengths per step, and TRL's logged metrics.

    python bench/_trl013_ppo.py --policy SFT_MERGED --reward-model RM_MERGED --prompts prompts.json --out out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, offline  # noqa: E402  (stdlib-only imports: usable in this venv)


def tokenizer_for(model_dir: Path):
    """The tokenizer of an align.tiny model. Its tokenizer_config.json is written by transformers 5 (a list of
    extra special tokens), which transformers 4.x cannot read, so build it from tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), eos_token=cfg["eos_token"],
                                   pad_token=cfg["pad_token"], padding_side="left")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", type=Path, required=True, help="merged SFT model directory")
    p.add_argument("--reward-model", type=Path, required=True, help="merged reward model directory")
    p.add_argument("--prompts", type=Path, required=True, help="JSON list of prompt token-id lists")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-minibatches", type=int, default=2)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="policy as a LoRA adapter (r 16, alpha 32, all-linear)")
    args = p.parse_args()
    offline()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl import PPOConfig, PPOTrainer
    from trl.trainer import ppo_trainer

    torch.manual_seed(args.seed)
    tokenizer = tokenizer_for(args.policy)
    prompts = json.loads(args.prompts.read_text())
    train = Dataset.from_dict({"input_ids": prompts})

    record: dict = {"begin": None, "end": [], "cpu": [], "generation_s": [], "generated_tokens": [],
                    "completion_length": [], "metrics": []}

    original_generation = ppo_trainer.batch_generation

    def timed_generation(model, queries, *a, **kw):
        t0 = time.perf_counter()
        out = original_generation(model, queries, *a, **kw)
        record["generation_s"].append(time.perf_counter() - t0)
        responses = out[0][:, queries.shape[1]:]
        record["generated_tokens"].append(responses.shape[1])
        # tokens up to and including the first EOS (what is scored after stop_token truncation)
        first = trl.trainer.utils.first_true_indices(responses == tokenizer.eos_token_id)
        record["completion_length"].append(float(torch.clamp(first + 1, max=responses.shape[1]).float().mean()))
        return out

    ppo_trainer.batch_generation = timed_generation

    class Probe(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            record["begin"] = time.perf_counter()
            record["cpu_begin"] = cpu_seconds()

        def on_step_end(self, *a, **kw):
            record["end"].append(time.perf_counter())
            record["cpu"].append(cpu_seconds())

        def on_log(self, a, state, control, logs=None, **kw):
            record["metrics"].append(dict(logs or {}))

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    ref_policy = None if args.lora else AutoModelForCausalLM.from_pretrained(args.policy)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)

    with tempfile.TemporaryDirectory(prefix="trl013-ppo-") as tmp:
        config = PPOConfig(
            output_dir=tmp, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True,
            seed=args.seed, learning_rate=args.lr, lr_scheduler_type="linear",
            total_episodes=args.steps * args.batch_size,
            per_device_train_batch_size=args.batch_size // args.num_minibatches, gradient_accumulation_steps=1,
            num_mini_batches=args.num_minibatches, num_ppo_epochs=args.ppo_epochs,
            local_rollout_forward_batch_size=args.batch_size,  # the whole batch in one generate call, as align's hf
            response_length=args.response_length, stop_token="eos", temperature=args.temperature,
            kl_coef=args.kl_coef, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
            whiten_rewards=False, missing_eos_penalty=None, num_sample_generations=0,
        )
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                             reward_model=reward_model, value_model=value_model, train_dataset=train,
                             eval_dataset=train.select(range(args.batch_size)), peft_config=peft_config,
                             callbacks=[Probe()])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()

    record.update({"versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                "torch": torch.__version__},
                   "trainable_params": trainable, "batch_size": config.batch_size,
                   "mini_batch_size": config.mini_batch_size, "num_total_batches": config.num_total_batches})
    args.out.write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
