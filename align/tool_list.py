"""`align tools list [--tool SPEC ...] [--environment SPEC]`: the built-in and installed (entry-point) tools and
environments, and the JSON schema the model is shown for each tool given (the same `tools=` the chat template gets
in a rollout). Bad specs are refused like everywhere else (exit 2, every problem at once)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from align.config import Config, opt
from align.errors import AlignError, Problems


@dataclass
class ToolsListConfig(Config):
    tool: list[str] = opt(factory=list, help="Also resolve these tool specs (repeatable) and print their schemas.")
    environment: str | None = opt(None, "Also resolve this environment spec and print its tools' schemas.")

    def check(self, problems: Problems) -> None:
        if self.tool or self.environment:
            from align.rewards.tools import ToolSet

            try:
                ToolSet.resolve(self.tool, self.environment)
            except AlignError as e:
                problems.add_error(e)


def main(cfg: ToolsListConfig) -> str:
    from align.rewards.tools import ToolSet, available

    cfg.validate()
    found = available()
    lines = [f"tools (--tool NAME): {', '.join(found['tools']) or '(none)'}",
             f"environments (--environment NAME): {', '.join(found['environments']) or '(none)'}",
             "Also: --tool path/to/file.py:function or package.module:function; --environment file.py:Class or "
             "package.module:Class; packages add names under the entry-point groups align.tools / align.environments."]
    if cfg.tool or cfg.environment:
        for schema in ToolSet.resolve(cfg.tool, cfg.environment).schemas():
            lines.append(json.dumps(schema))
    return "\n".join(lines)
