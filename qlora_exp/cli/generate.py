"""qlora-generate RUN_DIR --prompt TEXT | --file prompts.jsonl: answers from a finished run.

The base model is loaded quantized as in training, with the run's adapter, tokenizer and chat
template. Decoding defaults to the run's `eval` settings (greedy); flags override them.
With --prompt, each answer is printed as text (answers separated by a blank line); with --file,
one JSON object per input line is printed: the input's fields plus "generation".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from transformers import set_seed

from qlora_exp.cli import imports_done
from qlora_exp.cli.common import configure_cli_logging
from qlora_exp.errors import DataError, exit_on_error
from qlora_exp.generation import Message, generate_replies
from qlora_exp.run.finished import FinishedRun
from qlora_exp.schema import EvalConfig

log = logging.getLogger(__name__)


def parse_prompt_line(record: Any, where: str) -> list[Message]:
    """One prompts.jsonl record as a conversation ending with a user turn.

    Accepted: {"prompt": TEXT} (optional "system": TEXT) or {"messages": [{"role", "content"}, ...]}.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        valid = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not valid or not messages or messages[-1]["role"] != "user":
            raise DataError(
                f'{where}: "messages" must be a list of {{role, content}} strings ending with a user turn'
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f'{where}: needs a non-empty string "prompt" (or a "messages" list)')
    system = record.get("system")
    head = [{"role": "system", "content": str(system)}] if system else []
    return [*head, {"role": "user", "content": prompt}]


def read_prompts_file(path: Path) -> tuple[list[dict[str, Any]], list[list[Message]]]:
    """Records and conversations of a JSONL prompts file; errors name the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"--file: {path} not found. Fix: pass an existing JSONL file") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"--file: {path} is not UTF-8. Fix: re-save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"--file: cannot read {path}: {exc}") from exc
    records, conversations = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg}). Fix: one object per line") from exc
        conversations.append(parse_prompt_line(record, f"{path}:{number}"))
        records.append(record)
    if not conversations:
        raise DataError(f"{path}: no prompts in the file")
    return records, conversations


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --do-sample, --temperature, --top-p, --seed (shared with qlora-chat)."""
    group = parser.add_argument_group("decoding (defaults: the run's eval settings)")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--temperature", type=float, help="implies --do-sample unless --no-do-sample")
    group.add_argument("--top-p", type=float, help="implies --do-sample unless --no-do-sample")
    group.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")


def decoding_config(base: EvalConfig, args: argparse.Namespace) -> EvalConfig:
    """The run's EvalConfig with the flags given on the command line (validated again)."""
    overrides = {
        key: getattr(args, key)
        for key in ("max_new_tokens", "do_sample", "temperature", "top_p")
        if getattr(args, key) is not None
    }
    if "do_sample" not in overrides and ("temperature" in overrides or "top_p" in overrides):
        overrides["do_sample"] = True
    return dataclasses.replace(base, **overrides)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-generate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a completed qlora-train run directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user message (repeat for several)")
    source.add_argument("--file", type=Path, help='JSONL: {"prompt": ...} or {"messages": [...]} per line')
    parser.add_argument("--system", help="system message put before each --prompt")
    add_decoding_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    imports_done()
    args = parse_args(argv)
    configure_cli_logging()
    with exit_on_error():
        run = FinishedRun(args.run_dir)
        cfg = decoding_config(run.config.eval, args)
        if args.file is not None:
            records, conversations = read_prompts_file(args.file)
        else:
            records = [{"prompt": text} for text in args.prompt]
            conversations = [parse_prompt_line({**r, "system": args.system}, "--prompt") for r in records]
        tokenizer = run.load_tokenizer()
        model = run.load_quantized_model()
        set_seed(args.seed)
        replies = generate_replies(model, tokenizer, conversations, cfg)
        for record, reply in zip(records, replies, strict=True):
            if args.file is not None:
                sys.stdout.write(json.dumps({**record, "generation": reply}, ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(reply + "\n\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
