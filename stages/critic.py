"""The PPO critic: a value model V(s_t) = w·h_t + b on the last hidden state h_t of a transformer, with its own
adapter. (`--critic-init`, `--critic-placement`; the choice made is recorded in run.json under `critic`.)

Initialisation:
- `reward_model`: the reward-model run's adapter and its score head (w ← score weights, b = 0), so the critic
  starts out predicting the reward model's score of the text so far — the usual RLHF choice (InstructGPT).
- `policy`: a fresh adapter of the actor's kind on the actor's base, with a zero value head.
`auto` takes `reward_model` when a reward model is given and shares the actor's tokenizer; a reward model with another
tokenizer (e.g. an encoder such as BERT scoring the causal policy's decoded text) cannot read the actor's token ids,
so the critic then comes from the policy (and `reward_model` is refused).

Placement (memory):
- `shared` (default where possible): the critic is a second adapter ("critic") on the actor's own PeftModel,
  so actor, reference (adapters disabled, or a frozen "ref" copy for --handoff continue) and critic all use one
  copy of the base weights. Only adapters and one small head are added. A reward model can be placed there
  exactly only when it was trained on the same base (same base model, same merged parent adapters, same 4-bit
  choice) with the same adapter type — the case for `sft → rm` and `sft → ppo --handoff merge` (ppo's default)
  from the same SFT run. Shared placement needs an adapter the actor can hold next to its own (not prompt
  learning).
- `separate`: the critic is its own model (the reward-model run loaded trainable, or a second copy of the
  actor's base with a fresh adapter): one more copy of the base weights in memory.
`auto` takes shared when possible, else separate (the reason is logged and recorded).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import AlignError
from align.models import activate, backbone, is_adapter_weight

logger = logging.getLogger(__name__)

CRITIC = "critic"


@dataclass
class Critic:
    model: Any  # a PeftModel: the actor's (shared) or the critic's own (separate)
    adapter: str
    head: nn.Module
    placement: str
    init: str
    info: dict[str, Any] = field(default_factory=dict)

    def values(self, input_ids, attention_mask, position_ids, start: int) -> torch.Tensor:
        """V at every position from `start` on, minus the last: the value of the state before each completion token
        (batch × completion length), in float32."""
        if self.placement == "shared":
            activate(self.model, self.adapter, trainable=("default", CRITIC))
        hidden = backbone(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
        hidden = hidden[:, start - 1 : -1]
        return self.head(hidden.to(next(self.head.parameters()).dtype)).squeeze(-1).float()

    def parameters(self) -> list[nn.Parameter]:
        if self.placement == "shared":
            own = [p for n, p in self.model.named_parameters() if is_adapter_weight(n, CRITIC)]
        else:
            own = [p for p in self.model.parameters() if p.requires_grad]
        for p in own:
            p.requires_grad_(True)
        return own + [p for p in self.head.parameters() if all(p is not q for q in own)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = {f"adapter.{k}": v for k, v in get_peft_model_state_dict(self.model, adapter_name=self.adapter).items()}
        if not self.head_in_adapter:
            state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

    @property
    def head_in_adapter(self) -> bool:
        """Whether the head is part of the adapter's weights (a separate reward-model critic's score head)."""
        own = {id(p) for p in self.model.parameters()}
        return any(id(p) in own for p in self.head.parameters())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        adapter = {k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")}
        set_peft_model_state_dict(self.model, adapter, adapter_name=self.adapter)
        if not self.head_in_adapter:
            self.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})

    def save(self, directory: Path) -> None:
        """critic.safetensors (adapter + value head weights) and critic.json (how it was built)."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()},
                  str(directory / "critic.safetensors"))
        (directory / "critic.json").write_text(json.dumps(self.describe(), indent=2) + "\n")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(directory / "critic.safetensors")))

    def describe(self) -> dict[str, Any]:
        return {"init": self.init, "placement": self.placement, **self.info}


# -- building ----------------------------------------------------------------------------------------------------
def build_critic(policy, *, init: str, placement: str, reward_model: str | None,
                 trust_remote_code: bool = False) -> Critic:
    """The critic for `policy` (an align.handoff.Policy whose model holds the actor adapter "default")."""
    foreign = reward_model and other_tokenizer(policy, reward_model)
    if init == "auto":
        init = "reward_model" if reward_model and not foreign else "policy"
        if foreign:
            logger.info("Critic initialised from the policy: %s.", foreign)
    if init == "reward_model" and not reward_model:
        raise AlignError("--critic-init reward_model needs --reward-model RM_RUN (or use --critic-init policy).")
    if init == "reward_model" and foreign:
        raise AlignError(f"--critic-init reward_model is not possible here: {foreign}. The critic reads the actor's "
                         "tokens; use --critic-init policy (auto does).")
    reason = shared_impossible(policy, reward_model if init == "reward_model" else None)
    if placement == "shared" and reason:
        raise AlignError(f"--critic-placement shared is not possible here: {reason}. Use --critic-placement separate.")
    if placement == "auto":
        placement = "separate" if reason else "shared"
        if reason:
            logger.info("Critic placed in a separate model: %s.", reason)
    info = {"reason": reason} if reason and placement == "separate" else {}
    if init == "reward_model":
        info["reward_model"] = str(Path(reward_model).resolve())
        critic = _from_reward_model(policy, reward_model, placement, trust_remote_code)
    else:
        critic = _from_policy(policy, placement)
    critic.info.update(info)
    device = next(policy.model.parameters()).device
    critic.head.to(device)
    return critic


def other_tokenizer(policy, reward_model: str) -> str | None:
    """Why the reward model cannot read the actor's token ids (None when it can): another vocabulary, e.g. an encoder
    reward model (BERT) scoring a causal policy's text. Such a reward model still scores the decoded text."""
    from align.handoff import resolve_parent
    from align.models import load_tokenizer

    vocab = load_tokenizer(str(resolve_parent(reward_model, "load").weights_dir)).get_vocab()
    if vocab != policy.tokenizer.get_vocab():
        return f"the reward model {reward_model} uses another tokenizer than the actor ({len(vocab)} vs " \
               f"{len(policy.tokenizer.get_vocab())} tokens)"
    return None


def shared_impossible(policy, reward_model: str | None) -> str | None:
    """Why the critic cannot be an adapter on the actor's model (None when it can)."""
    from align.adapters import ADAPTERS

    if ADAPTERS[policy.adapter].full or ADAPTERS[policy.adapter].prompt_learning:
        return f"the actor's '{policy.adapter}' adapter cannot share its model with a second adapter"
    if reward_model is None:
        return None
    from align.handoff import resolve_parent

    rm = resolve_parent(reward_model, "load")
    if rm.full:
        return "the reward model is fully fine-tuned (it has no adapter to place on the actor's base)"
    same = (_resolved(rm.base_model) == _resolved(policy.manifest["base_model"])
            and [_resolved(a) for a in rm.merged_adapters] == [_resolved(a) for a in policy.manifest["merged_adapters"]]
            and rm.quantized_4bit == policy.quantized_4bit)
    if not same:
        return ("the reward model was trained on another base than the actor's (base, merged parent adapters or 4-bit "
                "differ; `ppo --handoff merge` from the rm's parent run shares it)")
    rm_type = _peft_config(rm.weights_dir)["peft_type"]
    actor_type = str(policy.model.peft_config["default"].peft_type.value)
    if rm_type != actor_type:
        return f"the reward model's adapter type {rm_type} differs from the actor's {actor_type}"
    return None


def _resolved(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _peft_config(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "adapter_config.json").read_text())


def _value_head(model, weight: torch.Tensor | None = None) -> nn.Linear:
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    hidden = config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=True)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if weight is not None:
        head.weight.data.copy_(weight.reshape(1, hidden).float())
    return head


def _from_reward_model(policy, reward_model: str, placement: str, trust_remote_code: bool = False) -> Critic:
    from align.handoff import load_run_policy, resolve_parent

    rm = resolve_parent(reward_model, "load")
    if placement == "separate":
        model, _, _ = load_run_policy(reward_model, trainable=True, trust_remote_code=trust_remote_code)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
        if head is None:
            raise AlignError(f"{reward_model}: cannot find the reward model's score head.")
        for p in head.parameters():
            p.requires_grad_(True)
        return Critic(model, "default", head, "separate", "reward_model")
    # shared: the rm adapter's weights become the "critic" adapter of the actor's model; its score head the value head
    score = add_reward_adapter(policy.model, CRITIC, rm.weights_dir, trainable=True)
    activate(policy.model, "default", trainable=("default", CRITIC))
    return Critic(policy.model, CRITIC, _value_head(policy.model, score), "shared", "reward_model")


def add_reward_adapter(model, name: str, rm_dir: Path, *, trainable: bool) -> torch.Tensor:
    """Load a reward-model run's adapter as adapter `name` of `model` (the same base); returns its score-head
    weight (1 × hidden)."""
    from peft import PeftConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(str(rm_dir))
    config.modules_to_save, config.task_type, config.inference_mode = None, "CAUSAL_LM", not trainable
    model.add_adapter(name, config)
    weights = load_peft_weights(str(rm_dir), device="cpu")
    score = {k: v for k, v in weights.items() if k.split(".")[-2] in ("score", "classifier")}
    if len(score) != 1 or next(iter(score)).split(".")[-1] != "weight":
        raise AlignError(f"{rm_dir}: expected one score-head weight in the reward model's adapter, found {sorted(score)}.")
    result = set_peft_model_state_dict(model, {k: v for k, v in weights.items() if k not in score}, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing:
        raise AlignError(f"{rm_dir}: the reward model's adapter does not fit the actor's base ({len(missing)} weights "
                         f"missing, e.g. {missing[0]}).")
    return next(iter(score.values()))


def place_reward_model(policy, scorer, name: str) -> bool:
    """Run a RewardModelScorer as a frozen adapter `name` + head on the actor's model (when the reward model was
    trained on the actor's base) instead of loading a model copy of its own. False (nothing done) if it does not fit."""
    if shared_impossible(policy, str(scorer.run)) is not None or len(scorer.heads) > 1:
        return False  # a several-head RM (one head picked) scores with its own model copy
    weight = add_reward_adapter(policy.model, name, scorer.run / "adapter", trainable=False)
    head = _value_head(policy.model, weight).requires_grad_(False)
    scorer.place_on(policy.model, name, head.to(next(policy.model.parameters()).device))
    return True


def _from_policy(policy, placement: str) -> Critic:
    import copy

    if placement == "shared":
        config = copy.deepcopy(policy.model.peft_config["default"])
        config.inference_mode = False
        policy.model.add_adapter(CRITIC, config)
        activate(policy.model, "default", trainable=("default", CRITIC))
        return Critic(policy.model, CRITIC, _value_head(policy.model), "shared", "policy")
    from align.adapters import AdapterOptions, peft_config
    from align.handoff import materialize_base
    from align.models import attach_adapter

    manifest = policy.manifest
    base = materialize_base(manifest["base_model"], manifest["merged_adapters"], quantize_4bit=policy.quantized_4bit)
    lora = peft_config(AdapterOptions(adapter="lora", lora_dropout=0.0), "CAUSAL_LM", manifest["base_model"])
    model = attach_adapter(base, lora)
    return Critic(model, "default", _value_head(model), "separate", "policy")

