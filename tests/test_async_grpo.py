"""`align grpo --async`: K = 0 is the synchronous run; with K = 1 every batch is at most one step old and its
importance weights come from the log-probs of the snapshot that sampled it; a run killed at a checkpoint resumes to
the uninterrupted run's result. Every run but the killed one runs in the test's process (helpers.run_in_process)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_at_checkpoint, max_adapter_difference, run_in_process

ARGS = ["--data", "arith-prompts", "--reward", "closeness(scale=50)", "--num-generations", "4", "--batch-size", "8",
        "--max-completion-length", "6", "--backend", "hf", "--no-tensorboard", "--logging-steps", "1", "--lr", "3e-3",
        "--seed", "3"]


def _metrics(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def _grpo(tiny_model, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align", "grpo", "--model", tiny_model, "--output", str(run), *ARGS, *extra]


def test_staleness_zero_is_the_synchronous_run(tiny_model, tmp_path):
    sync, zero = tmp_path / "sync", tmp_path / "k0"
    # --num-processes 1: seeded rows, as --async
    run_in_process(_grpo(tiny_model, sync, "--max-steps", "3", "--num-processes", "1"))
    run_in_process(_grpo(tiny_model, zero, "--max-steps", "3", "--async", "--max-staleness", "0"))
    a, b = _metrics(sync), _metrics(zero)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert y["async/staleness_max"] == 0
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["reward"] == pytest.approx(x["reward"], abs=1e-6)
    assert len({m["reward"] for m in a}) > 1  # the steps sampled different completions
    # weights: the IS weights of K = 0 are 1 ± 1e-6 (the sampler's log-probs come from a second forward pass), which
    # Adam's normalisation carries into the update (measured 7e-6 at this lr after 3 steps, of updates ~1e-2)
    assert max_adapter_difference(sync, zero) <= 1e-5


def test_one_step_stale_batches_are_corrected_with_their_own_sampler_logprobs(tiny_model, tmp_path):
    from align.stages.common import start_stage
    from align.stages.grpo import GRPOConfig, build_trainer, load_prompt_data

    cfg = GRPOConfig.from_kwargs(model=tiny_model, data="arith-prompts", reward=["closeness(scale=50)"],
                                 output=str(tmp_path / "k1"), num_generations=4, batch_size=8, max_completion_length=6,
                                 backend="hf", tensorboard=False, max_steps=3, lr=3e-3, async_rollouts=True,
                                 max_staleness=1)
    assert cfg.resolved()["is_correction"] == "token_truncate"
    started = start_stage(cfg, "grpo", load_prompt_data)
    trainer = build_trainer(cfg, started, callbacks=[])
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    outputs = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: outputs.append(generate(inputs)) or outputs[-1]
    trainer.train()

    history = trainer.async_rollouts.history
    assert [(h["step"], h["version"]) for h in history] == [(0, 0), (1, 0), (2, 1)]  # at most one step old

    # the batch trained at step 1 was sampled by version 0, the starting policy: its sampler log-probs are that
    # policy's (recomputed here with TRL's own scoring on a model holding the saved starting weights) ...
    start = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for name, p in start.named_parameters():
            if name in trainable:
                p.copy_(trainable[name])
    out = outputs[1]
    mask = out["completion_mask"].bool()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad():
        at_v0, _, _ = trainer._get_per_token_logps_and_entropies(start.eval(), ids, attention,
                                                                 out["completion_ids"].size(1), batch_size=8)
    sampler = out["sampling_per_token_logps"]
    assert (sampler - at_v0)[mask].abs().max().item() < 1e-4
    # ... the trainer scores them with the policy after one step, and the IS weight is exp(trainer − sampler), capped
    trainer_logps = out["old_per_token_logps"]
    assert (trainer_logps - sampler)[mask].abs().max().item() > 1e-3  # really off-policy
    expected = torch.clamp(torch.exp(trainer_logps - sampler), max=cfg.is_cap)
    assert torch.allclose(out["importance_sampling_ratio"][mask], expected[mask], atol=1e-6)

    # the sampler is a model of its own: changing the trained weights does not change what it computes
    sampler = trainer.async_rollouts.sampler
    probe = torch.tensor([[5, 17, 33, 60]])
    with torch.no_grad():
        before = sampler(probe).logits.clone()
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(0.5)
        assert torch.equal(sampler(probe).logits, before)
        assert not torch.allclose(trainer.model(probe).logits, before, atol=1e-3)


def test_killed_async_run_resumes_to_the_uninterrupted_result(tiny_model, tmp_path):
    extra = ["--max-steps", "5", "--save-steps", "2", "--async", "--max-staleness", "1"]
    straight, run = tmp_path / "straight", tmp_path / "killed"
    run_in_process(_grpo(tiny_model, straight, *extra))
    kill_at_checkpoint(_grpo(tiny_model, run, *extra), run, 2, lost=1)  # step 3 is lost
    assert (run / "checkpoints" / "checkpoint-2" / "async_rollouts-0.pt").is_file()
    run_in_process([*_grpo(tiny_model, run, *extra), "--resume"])
    a, b = _metrics(straight), _metrics(run)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b, strict=True):
        assert y["async/staleness_max"] == x["async/staleness_max"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["reward"] == pytest.approx(x["reward"], abs=1e-6)
    assert b[2]["async/staleness_max"] == 1  # step 3 trained the batch sampled before the kill, not a new one
    assert max_adapter_difference(run, straight) <= 1e-6


def test_async_limits_are_refused_with_every_problem(cli, tiny_model, tmp_path):
    code, _, err = cli("grpo", "--model", tiny_model, "--output", tmp_path / "x", *ARGS[:-2], "--async", "--backend",
                       "vllm", "--grad-accum", "2", "--is-correction", "none")
    assert code == 2
    assert "--async samples from a snapshot of the policy with the hf backend" in err
    assert "--async needs one generation per optimizer step: --grad-accum 1 and --num-iterations 1, got 2 and 1." in err
    assert "Use --is-correction auto (token_truncate) or another mode, not none." in err
    code, _, err = cli("grpo", "--model", tiny_model, "--output", tmp_path / "y", *ARGS, "--max-staleness", "2")
    assert code == 2 and "--max-staleness 2 bounds --async sampling; add --async, or drop it." in err
