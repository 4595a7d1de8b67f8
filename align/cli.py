"""`align` command line: a table of subcommands, each a config dataclass and a `main(cfg)`.

Exit codes: 0 ok; 2 user error (one message on stderr, no traceback); 1 unexpected internal error; 130 / 143
interrupted by SIGINT / SIGTERM (a checkpoint of the current step saved, see align.interrupt).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from align.config import build_parser, parse_args
from align.errors import AlignError
from align.integrity import writer_scope
from align.interrupt import Interrupted, TermAsInterrupt
from align.launch import LAUNCHED_BY_ALIGN, is_main_process

# name -> (help, "module:ConfigClass", "module:function"); "data inspect" is a nested command
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("Supervised fine-tuning with a PEFT adapter (or full FT).", "align.stages.sft:SFTConfig", "align.stages.sft:main"),
    "rm": ("Train a reward model: Bradley-Terry on preference pairs, or pointwise on labelled/scored rows.", "align.stages.rm:RMConfig", "align.stages.rm:main"),
    "rm-score": ("Score data with a reward-model run (also: align rm score).", "align.stages.rm:ScoreConfig", "align.stages.rm:score_main"),
    "dpo": ("Direct Preference Optimization from a base or a finished run (--from).", "align.stages.dpo:DPOConfig", "align.stages.dpo:main"),
    "kto": ("KTO: preference learning from unpaired feedback (prompt, completion, label true/false) from a base or a run (--from).", "align.stages.kto:KTOConfig", "align.stages.kto:main"),
    "orpo": ("ORPO: reference-free preference optimization (SFT on chosen + odds-ratio penalty) on pairs.", "align.stages.orpo:ORPOConfig", "align.stages.orpo:main"),
    "simpo": ("SimPO: reference-free preference optimization (length-normalised log-likelihood margin) on pairs.", "align.stages.simpo:SimPOConfig", "align.stages.simpo:main"),
    "grpo": ("GRPO: group-relative policy optimisation with reward functions (--reward).", "align.stages.grpo:GRPOConfig", "align.stages.grpo:main"),
    "ppo": ("PPO (RLHF): actor-critic training against a reward model (--reward-model) and/or reward functions.", "align.stages.ppo:PPOConfig", "align.stages.ppo:main"),
    "distill": ("On-policy distillation: the student samples, a frozen --teacher's token distributions teach it.", "align.stages.distill:DistillConfig", "align.stages.distill:main"),
    "eval": ("Evaluate a run or model on held-out data: accuracy, rewards, length, KL to the parent; preference accuracy.", "align.evaluation:EvalConfig", "align.evaluation:main"),
    "pairs": ("On-policy preference pairs: sample from a policy, label with rewards, keep (best, worst) per prompt.", "align.stages.pairs:PairsConfig", "align.stages.pairs:main"),
    "run": ("Run a pipeline file: several stages, each from another, with held-out eval and gates (exit 3 when a gate stops it).", "align.pipeline:RunConfig", "align.pipeline:main"),
    "report": ("Plots (PNG) and a summary page (markdown + HTML) for a run or a pipeline directory.", "align.report:ReportConfig", "align.report:main"),
    "generate": ("Sample from a run (base + adapter) or a model with its chat template.", "align.generate:GenerateConfig", "align.generate:main"),
    "merge": ("Merge a run's adapter into its base and write a plain HF model directory.", "align.merge:MergeConfig", "align.merge:main"),
    "export": ("Write a self-contained HF model directory of a run (for from_pretrained, vLLM, servers).", "align.export:ExportConfig", "align.export:main"),
    "data inspect": ("Show a dataset's format, a rendered example and token-length statistics.", "align.data.inspect:InspectConfig", "align.data.inspect:main"),
    "rewards check": ("Dry-run reward functions on samples: scores, timing, return-type checks.", "align.reward_check:RewardsCheckConfig", "align.reward_check:main"),
    "tools list": ("List the built-in and installed tools and environments, and the schema of each --tool given.", "align.tool_list:ToolsListConfig", "align.tool_list:main"),
    "tiny-model": ("Build a tiny random Qwen2-style model + tokenizer locally (tests, demo).", "align.tiny:TinyModelConfig", "align.tiny:main"),
}


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def build() -> tuple[argparse.ArgumentParser, dict[str, tuple[argparse.ArgumentParser, type]]]:
    from align import __version__

    top = argparse.ArgumentParser(prog="align", description="Post-training pipeline: sft -> rm/dpo -> ppo/grpo.")
    top.add_argument("--version", action="version", version=f"align {__version__}")
    subs = top.add_subparsers(dest="_command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    parsers = {}
    for name, (help_text, cfg_ref, _) in COMMANDS.items():
        cls = _load(cfg_ref)
        action = subs
        words = name.split()
        for word in words[:-1]:  # nested group, e.g. "data"
            if word not in groups:
                group = subs.add_parser(word, help=f"{word} subcommands")
                groups[word] = group.add_subparsers(dest=f"_{word}_command", metavar="COMMAND", required=True)
            action = groups[word]
        from transformers import HfArgumentParser

        action._parser_class = HfArgumentParser
        positional = getattr(cls, "positional", None)
        usage = f"align {name}{f' {positional.upper()}' if positional else ''} [OPTIONS]  (align {name} --help lists them)"
        parser = action.add_parser(words[-1], dataclass_types=cls, help=help_text, description=help_text, usage=usage,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        parser.set_defaults(_name=name)
        parsers[name] = (build_parser(cls, parser), cls)
    return top, parsers


def unknown_arguments(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """"unrecognized arguments: ..." naming the closest known flag for each unknown one."""
    from align.errors import did_you_mean

    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    hints = [f"{flag}:{did_you_mean(flag, known) or ' no such option'}"
             for flag in (e.split("=")[0] for e in extras if e.startswith("-"))]
    return f"unrecognized arguments: {' '.join(extras)} ({' '.join(hints) or 'see --help'})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["rm", "score"]:  # `align rm score` is spelled as a sub-command of the rm stage
        argv = ["rm-score", *argv[2:]]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    top, parsers = build()
    namespace, extras = top.parse_known_args(argv)
    if extras and getattr(namespace, "_name", None):  # the command's own usage, with a did-you-mean per flag
        parsers[namespace._name][0].error(unknown_arguments(extras, parsers[namespace._name][0]))
    if extras:
        top.parse_args(argv)  # argparse's own error for the top level
    if not namespace._command:
        top.print_help()
        return 0
    name = namespace._name
    parser, cls = parsers[name]
    cfg = None
    try:
        cfg = parse_args(cls, top, argv, sub=parser)
        cfg.launch_argv = argv[len(name.split()):]  # what --num-processes hands to the launched processes
        with TermAsInterrupt(), writer_scope():  # the output directories this command locks (align.integrity)
            result = _load(COMMANDS[name][2])(cfg)
    except AlignError as e:
        if is_main_process() and not getattr(e, "silent", False):  # launched processes: rank 0 speaks for all
            print(f"align {name}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2 = user error; align run's gate failure has its own code
    except Exception as e:  # a full disk, a read-only file system, a path of the wrong kind: the user's to fix
        from align.io import os_error_message

        message = os_error_message(e, getattr(cfg, "output", None))
        if message is None:
            raise
        if is_main_process():
            print(f"align {name}: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGINT/SIGTERM: the stage saved a checkpoint at the current step (align.interrupt)
        message = str(e).replace("continue with --resume", "run the pipeline again to continue") if name == "run" \
            else str(e)
        if is_main_process():
            print(f"align {name}: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if is_main_process() and not os.environ.get(LAUNCHED_BY_ALIGN):
            print(f"align {name}: interrupted", file=sys.stderr)
        return 130
    if result is not None and is_main_process() and not os.environ.get(LAUNCHED_BY_ALIGN):
        print(result)  # once: by rank 0, or by the `align` process that launched the workers
    return 0


if __name__ == "__main__":
    sys.exit(main())
