"""Loading models, tokenizers and runs' policies; attaching and saving adapters.

- `--model` is a local `from_pretrained` directory or a hub id (hub only when online).
- dtype "auto": float32 on CPU; bfloat16 on a GPU that supports it (float16 otherwise).
- `trust_remote_code` is off unless asked for.
- A tokenizer without a chat template gets FALLBACK_CHAT_TEMPLATE (plain-text role headers, no new tokens);
  a tokenizer without a pad token pads with its EOS token. Both travel with the run's saved tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from align.errors import AlignError

logger = logging.getLogger(__name__)

FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{{- '\n\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\n' }}{%- endif %}"
)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(dtype: str = "auto"):
    import torch

    if dtype == "auto":
        if has_cuda():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def missing_directory(name: str) -> str | None:
    """"NAME: no such directory." (with a did-you-mean among its parent's directories) when `name` can only be a
    local path — hub ids are `name` or `org/name`, so a leading ./ / ~ or a deeper path is one — and is not a
    directory; else None (a directory, or a possible hub id: fetching it says whether it exists)."""
    path = Path(name).expanduser()
    if path.is_dir() or not (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1):
        return None
    return f"{name}: no such directory." + (f" Did you mean '{near}'?" if (near := _nearest_path(name)) else "")


def target_problem(name: str) -> str | None:
    """What is wrong with a RUN|MODEL argument (align eval, align generate) that can be told without loading it:
    a missing directory, or one that holds neither a run (run.json) nor a model (config.json) — e.g. a pipeline's
    output, whose stages are then named."""
    if missing := missing_directory(name):
        return missing
    path = Path(name).expanduser()
    if not path.is_dir() or (path / "run.json").is_file() or (path / "config.json").is_file():
        return None
    runs = sorted(str(Path(name) / p.name) for p in path.iterdir() if (p / "run.json").is_file())
    hint = f" It holds runs; give one of them: {', '.join(runs)}." if runs else ""
    return f"{name}: neither a run directory (no run.json) nor a model directory (no config.json).{hint}"


def _nearest_path(name: str) -> str | None:
    """`name` with its first missing component replaced by the closest existing directory name, if that exists."""
    import difflib

    parts = Path(name).parts
    for i, part in enumerate(parts):
        parent = Path(*parts[:i]) if i else Path(".")
        if not (parent / part).is_dir():
            siblings = [p.name for p in parent.expanduser().iterdir() if p.is_dir()] if parent.expanduser().is_dir() else []
            close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
            guess = Path(*parts[:i], close[0], *parts[i + 1:]) if close else None
            return str(guess) if guess is not None and guess.expanduser().is_dir() else None
    return None


def check_model_path(model: str | None, flag: str = "--model") -> str | None:
    """A problem message if `model` names a local path that is not a model directory, else None."""
    if not model:
        return f"{flag} is required: a local model directory or a hub id."
    path = Path(model)
    if missing := missing_directory(model):
        return f"{flag} {missing} Pass a model directory (with config.json) or a hub id."
    if path.is_dir() and not (path / "config.json").is_file():
        hint = " It looks like a run directory: use --from." if (path / "run.json").is_file() else ""
        return f"{flag} {model}: not a model directory (no config.json).{hint}"
    return None


def _load(loader, name: str, what: str, **kwargs: Any):
    try:
        return loader(name, **kwargs)
    except OSError as e:
        raise AlignError(
            f"Cannot load {what} '{name}': it is not a local directory and could not be fetched from the model hub "
            f"({str(e).splitlines()[0]}). Pass a local directory (e.g. one made by `align tiny-model`), or go online."
        ) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e) or kwargs.get("trust_remote_code"):
            raise
        raise AlignError(f"Cannot load {what} '{name}': it runs its own code (custom model classes in its directory or "
                         "repo). Pass --trust-remote-code if you trust that code.") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone and training would go on with it
        raise AlignError(f"{name} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])} missing). Save the model's "
                         "tokenizer into that directory (tokenizer.save_pretrained(DIR)), or pass a complete model "
                         "directory.")
    tokenizer = _load(AutoTokenizer.from_pretrained, name, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        logger.warning("Tokenizer of %s has no chat template; using align's plain-text fallback template.", name)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


SEQ_CLS_HEADS = ["score", "classifier"]  # transformers' names of a sequence-classification head (Qwen/Llama, BERT)


def quantization_config(skip: list[str] | None = None):
    """nf4 double-quant 4-bit; `skip`: modules kept in full precision (a classifier's new head: bitsandbytes cannot
    train or copy a 4-bit head, and transformers skips only `score`, not BERT's `classifier`)."""
    import torch
    from transformers import BitsAndBytesConfig

    from align.launch import sharded_launch

    compute = torch.bfloat16 if has_cuda() else torch.float32
    # FSDP and DeepSpeed ZeRO-3 shard only float tensors: the packed 4-bit weights are stored in the model's dtype
    # (PEFT's FSDP/DeepSpeed QLoRA guides); bitsandbytes' default uint8 storage otherwise
    storage = {"bnb_4bit_quant_storage": compute} if has_cuda() and sharded_launch(None) else {}
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        **storage, **({"llm_int8_skip_modules": skip} if skip else {}),
    )


def load_base_model(
    name: str, *, quantize_4bit: bool = False, dtype: str = "auto", trust_remote_code: bool = False,
    task: str = "causal-lm", num_labels: int = 1, attn_implementation: str | None = None,
):
    """The base model for `task` ("causal-lm" or "seq-cls" with a `num_labels` head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "causal-lm":
        check_causal(name, trust_remote_code)

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        kwargs["quantization_config"] = quantization_config(SEQ_CLS_HEADS if task == "seq-cls" else None)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if has_cuda() else "cpu"  # this process's GPU
    if task == "seq-cls":
        with _held_load_report() as held:
            model, info = _load(AutoModelForSequenceClassification.from_pretrained, name, "model",
                                num_labels=num_labels, output_loading_info=True, **kwargs)
        if not _only_new_head(info):  # the head is new by design; anything else missing or left over is worth a look
            for record in held:
                logging.getLogger(record.name).handle(record)
    else:
        model = _load(AutoModelForCausalLM.from_pretrained, name, "model", **kwargs)
    if quantize_4bit:
        keep_4bit_kernel_fixed(model)
    return model


@contextlib.contextmanager
def _held_load_report():
    """Holds back transformers' LOAD REPORT warning (it lists the new head of a reward model as MISSING and advises
    training it, which is what the rm stage does); yields the held records."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    source = logging.getLogger("transformers.modeling_utils")
    source.addFilter(hold)
    try:
        yield held
    finally:
        source.removeFilter(hold)


def _only_new_head(info: dict[str, Any]) -> bool:
    """Did loading a base as a sequence classifier leave only the head new (and a causal LM's lm_head unused)?"""
    return (not info.get("mismatched_keys") and not info.get("error_msgs")
            and all(k.split(".")[0] in SEQ_CLS_HEADS for k in info.get("missing_keys", ()))
            and all(k.split(".")[0] == "lm_head" for k in info.get("unexpected_keys", ())))


def check_causal(name: str, trust_remote_code: bool = False) -> None:
    """Causal-LM stages need a decoder. transformers maps encoder configs (BERT, RoBERTa, ...) to a causal-LM class
    too: it loads, attends in both directions (each token sees the ones it should predict) and trains garbage."""
    from transformers import AutoConfig

    config = _load(AutoConfig.from_pretrained, name, "model config", trust_remote_code=trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise AlignError(f"{name} is an encoder-decoder model ({config.model_type}); align trains decoder-only causal "
                         "LMs. Pass a decoder model (Llama, Qwen, Mistral, ... or one made by `align tiny-model`).")
    if getattr(config, "is_decoder", None) is False:  # set only on encoder configs, False unless made a decoder
        raise AlignError(f"{name} is an encoder model ({config.model_type}: it attends in both directions), not a "
                         "causal LM: it cannot be trained or sampled token by token. Pass a decoder model (Llama, "
                         "Qwen, Mistral, ... or one made by `align tiny-model`); an encoder can be a reward model "
                         "(align rm).")


def keep_4bit_kernel_fixed(model) -> None:
    """Stop bitsandbytes from switching 4-bit layers to its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight the first time it runs in eval mode
    without grad, and from then on uses another kernel: eval numbers then differ from training-mode numbers
    (~1e-3 relative), and a later training step fails ("a view of a leaf Variable that requires grad is being
    used in an in-place operation"). Training interleaves evaluation, so align keeps one kernel throughout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_adapter(model, config, *, gradient_checkpointing: bool = False):
    """Wrap `model` with a fresh trainable PEFT adapter (`config`), or add a native one (a NativeConfig: bitfit,
    bottleneck); None means full fine-tuning."""
    from peft import get_peft_model

    from align import native_adapters

    if config is None:
        model.requires_grad_(True)
        return model
    if isinstance(config, native_adapters.NativeConfig):
        check_target_modules(model, config.targets)
        return native_adapters.attach(model, config)
    if getattr(model, "is_loaded_in_4bit", False) and gradient_checkpointing:
        # checkpointed frozen 4-bit layers need an input that requires grad. PEFT's prepare_model_for_kbit_training
        # is not used (nor by TRL 1.16): it also casts every non-4-bit weight to float32, which turns the residual
        # stream float32 (on an H100: +24% peak memory and +23% step time over LoRA, bench/gpu_sft.py)
        model.enable_input_require_grads()
    check_target_modules(model, getattr(config, "target_modules", None))
    if hasattr(config, "exclude_modules") and not config.exclude_modules and any(
            "align_bottleneck" in n for n, _ in model.named_modules()):
        config.exclude_modules = native_adapters.EXCLUDE_FROM_PEFT  # a merged-in bottleneck's layers stay as they are
    return get_peft_model(model, config)


def check_target_modules(model, targets) -> None:
    """Every named --target-modules entry must match a module of `model` (PEFT only fails when none does)."""
    if not targets or isinstance(targets, str):  # None, "all-linear" or a regex: PEFT's own matching
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = sorted(t for t in targets if t not in names)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__})
        raise AlignError(f"--target-modules {' '.join(missing)}: not in this model. Its linear layers are: "
                         f"{', '.join(linear)} (or use all-linear).")


def model_positions(model) -> int | None:
    """How many positions the model can attend over (max_position_embeddings / n_positions), or None if unknown."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def fit_positions(cfg, model) -> dict[str, list[int]]:
    """--max-length may not exceed the positions the model has (it would index past its position embeddings): a value
    the user set is refused; the default is lowered to the model's limit (logged). Returns {option: [default, fitted]}
    for what was lowered (run.json records it)."""
    from align.config import user_set

    limit, max_length = model_positions(model), getattr(cfg, "max_length", None)
    if not max_length or limit is None or max_length <= limit:
        return {}
    if user_set(cfg, "max_length"):
        raise AlignError(f"--max-length {max_length} exceeds the model's {limit} positions (max_position_embeddings "
                         f"in its config.json). Use --max-length {limit} or less.")
    logger.info("--max-length: the default %d is more than the model's %d positions; using %d.", max_length, limit, limit)
    cfg.max_length = limit
    return {"max_length": [max_length, limit]}


def check_vocabulary(model, tokenizer) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise AlignError(f"The tokenizer has {len(tokenizer)} tokens, but the model embeds only {rows} "
                         "(vocab_size in its config.json): they do not belong together. Use the tokenizer saved with "
                         "the model.")


def backbone(model):
    """The bare transformer (no LM / classification head) under a PeftModel or a transformers model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def activate(model, adapter: str, trainable: tuple[str, ...] = ()) -> None:
    """Make `adapter` the active one of a multi-adapter PeftModel, keeping `trainable` adapters trainable
    (PEFT's set_adapter freezes every other adapter)."""
    if model.active_adapter != adapter:
        model.set_adapter(adapter, inference_mode=adapter not in trainable)
        for name in trainable:
            model.set_requires_grad(name, True)


def is_adapter_weight(name: str, adapter: str) -> bool:
    """Whether parameter `name` belongs to PEFT adapter `adapter` (ModuleDict keys: `lora_A.critic.weight`;
    ParameterDict keys, LoHa/LoKr/IA3: `hada_w1_a.critic`)."""
    return f".{adapter}." in name or name.endswith(f".{adapter}")


def disable_dropout(model) -> None:
    """Turn off every source of training-mode randomness in `model`: nn.Dropout modules (incl. LoRA's) and PEFT's
    per-adapter `module_dropout` / `rank_dropout` (LoHa, LoKr), which TRL's disable_dropout does not reach. RL
    stages need this so the policy equals its reference at the first step and π_old is the π being optimised."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) or type(module).__name__ == "MultiplicativeDropoutLayer":  # BOFT's
            module.p = 0.0
        for name in ("module_dropout", "rank_dropout"):
            rates = getattr(module, name, None)
            if isinstance(rates, dict):
                for adapter in rates:
                    rates[adapter] = 0.0


def save_policy(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """Save the trained adapter (PEFT format; only "default", not TRL's frozen "ref" copy; align's own format for
    bitfit/bottleneck) or the full model, with the tokenizer alongside. `state_dict`: the full weights gathered from
    sharded processes (FSDP, DeepSpeed), instead of the model's own."""
    from align import native_adapters

    extra = {"state_dict": state_dict} if state_dict is not None else {}
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, selected_adapters=["default"], **extra)
    elif hasattr(model, "align_adapter"):
        native_adapters.save(model, directory)
    else:
        model.save_pretrained(directory, **extra)
    tokenizer.save_pretrained(directory)
