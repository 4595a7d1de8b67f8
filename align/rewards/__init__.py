"""Reward sources. A reward function follows TRL's protocol
`fn(prompts, completions, **columns) -> list[float | None]`; a reward-model run is one too
(align.rewards.reward_model.RewardModelScorer)."""
