"""Tiny-model factory: a small Qwen2-style causal LM and a byte-level BPE tokenizer with a chat template,
built locally (no model hub), for tests, the demo and benchmarks.

    align tiny-model --output runs/tiny            # CLI
    from align.tiny import build_tiny_model        # Python
    build_tiny_model("runs/tiny", hidden_size=128, num_layers=2)

The directory loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` like any
hub model. Weights are random (seeded); the tokenizer is trained on the bundled sample data plus a little
English, so that arithmetic prompts tokenize compactly. The chat template is ChatML (`<|im_start|>role ...
<|im_end|>`); `<|im_end|>` is the end-of-turn / EOS token and `<|endoftext|>` the pad token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.config import Config, opt
from align.errors import Problems
from align.io import output_path_problem

# ChatML; with tools, Qwen2.5's form for the calls and results: each call as <tool_call>{"name": ..., "arguments":
# {...}}</tool_call> in the assistant turn, each result as <tool_response>...</tool_response> in a user turn. The tools
# themselves are rendered compactly in the system turn, one line each: `name(param: type, ...): description` (real
# templates print the whole JSON schema: the calculator's system turn takes 60 tokens here, 492 in Qwen2.5's form)
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools' }}"
    "{%- for tool in tools %}"
    "{%- set fn = tool['function'] if tool['function'] is defined else tool %}"
    "{{- '\\n' + fn['name'] + '(' }}"
    "{%- for name, param in (fn.get('parameters') or {}).get('properties', {}).items() %}"
    "{{- (', ' if not loop.first else '') + name + ': ' + (param.get('type') or 'any') | string }}"
    "{%- endfor %}"
    "{{- ')' + (': ' + fn['description'] if fn.get('description') else '') }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_ENGLISH = (
    "the a an of to and in is it you that he was for on are with as I his they be at one have this from or had by "
    "what how why when where which who answer question solve compute calculate sum difference product plus minus "
    "times equals result number numbers value total think step first then so therefore final hello world yes no "
    "please thank user assistant system helpful model language train reward good bad correct wrong true false "
    "security password attack network data file error example test sample prompt completion response"
)


def _tokenizer_corpus() -> list[str]:
    from align.data.samples import arithmetic_problems

    lines = [f"What is {a} {op} {b}? {ans}" for a, op, b, ans in arithmetic_problems(3000, seed=1234)]
    lines += [_ENGLISH] * 20 + [_ENGLISH.upper(), _ENGLISH.capitalize()]
    lines += [" ".join(str(i) for i in range(0, 1000, 7))]
    return lines


def build_tokenizer(vocab_size: int = 1024, split_digits: bool = False):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast` with a chat template.

    split_digits: every digit is its own token (numbers are never merged), so arithmetic can generalise from digits
    instead of memorising a token per number."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    output: str | Path,
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.1,
    seed: int = 0,
    split_digits: bool = False,
) -> Path:
    """Write a random-weight model + tokenizer to `output` and return its path.

    arch "qwen2": a causal LM (policies, reward models); "bert": an encoder (reward models, `align rm`).
    """
    import torch
    from transformers import BertConfig, BertModel, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    output = Path(output)
    tokenizer = build_tokenizer(vocab_size, split_digits)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if arch == "bert":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, intermediate_size=intermediate_size or 2 * hidden_size,
                            max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                            initializer_range=initializer_range)
        BertModel(config).save_pretrained(output)
        tokenizer.save_pretrained(output)
        return output
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


@dataclass
class TinyModelConfig(Config):
    output: str | None = opt(None, "Directory to write the model and tokenizer to.", aliases=["-o"])
    arch: Literal["qwen2", "bert"] = opt("qwen2", "qwen2: causal LM; bert: encoder (for reward models).")
    hidden_size: int = opt(128, "Hidden size.", range="[1, inf)")
    num_layers: int = opt(2, "Transformer layers.", range="[1, inf)")
    num_heads: int = opt(2, "Attention heads (head dim = hidden size / heads).", range="[1, inf)")
    vocab_size: int = opt(1024, "BPE vocabulary size (including special tokens).", range="[1, inf)")
    initializer_range: float = opt(0.1, "Std of the random weights (0.1 lets LoRA on this untrained model learn fast).", range="(0, inf)")
    seed: int = opt(0, "Seed of the random weights.")
    split_digits: bool = opt(False, "Tokenize every digit on its own (arithmetic generalises; the demo uses it).")
    overwrite: bool = opt(False, "Replace an existing directory.")

    def check(self, problems: Problems) -> None:
        if not self.output:
            problems.add("--output is required: the directory to write the tiny model to.")
        elif (problem := output_path_problem(self.output)) is not None:
            problems.add(problem)
        elif Path(self.output).exists() and any(Path(self.output).iterdir()) and not self.overwrite:
            problems.add(f"--output {self.output} exists and is not empty; pass --overwrite or choose another path.")
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.add(f"--hidden-size {self.hidden_size} must be divisible by --num-heads {self.num_heads}.")


def main(cfg: TinyModelConfig) -> Path:
    cfg.validate()
    return build_tiny_model(cfg.output, arch=cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                            num_heads=cfg.num_heads, vocab_size=cfg.vocab_size, seed=cfg.seed,
                            initializer_range=cfg.initializer_range, split_digits=cfg.split_digits)
