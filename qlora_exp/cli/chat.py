"""qlora-chat RUN_DIR: talk to a finished run in the terminal, several turns, with history.

Replies stream as they are generated (transformers' TextStreamer). /reset clears the history,
/exit (or EOF, Ctrl-D, or Ctrl-C) ends the chat. When the history outgrows the model's context,
the oldest turns are dropped; a single message too long to answer is refused, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import readline  # noqa: F401  gives input() line editing and history
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase, TextStreamer, set_seed

from qlora_exp.cli import imports_done
from qlora_exp.cli.common import configure_cli_logging
from qlora_exp.cli.generate import add_decoding_arguments, decoding_config
from qlora_exp.errors import exit_on_error
from qlora_exp.generation import GenerativeModel, Message, generate_replies, prompt_token_ids
from qlora_exp.run.finished import FinishedRun
from qlora_exp.schema import EvalConfig

log = logging.getLogger(__name__)

USER_PROMPT = "you> "
REPLY_PREFIX = "model> "
HELP = "Commands: /reset clears the history, /exit ends the chat (so do Ctrl-D and Ctrl-C)."
DEFAULT_MAX_NEW_TOKENS = 256


class TurnRefused(Exception):
    """A message that cannot be answered; the chat goes on without it."""


class ChatSession:
    """The conversation so far and the model that continues it."""

    def __init__(
        self,
        model: GenerativeModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: EvalConfig,
        system: str | None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.head: list[Message] = [{"role": "system", "content": system}] if system else []
        self.turns: list[Message] = []
        context = getattr(model.config, "max_position_embeddings", None) or 4096
        self.prompt_limit = context - cfg.max_new_tokens

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.turns = []

    def _prompt_length(self, turns: list[Message]) -> int:
        return len(prompt_token_ids(self.tokenizer, self.head + turns))

    def fit_history(self, turns: list[Message]) -> list[Message]:
        """Drop the oldest user/model pairs until the prompt fits the model's context."""
        while self._prompt_length(turns) > self.prompt_limit:
            if len(turns) <= 1:
                raise TurnRefused(
                    f"message too long: {self._prompt_length(turns)} tokens, this model takes "
                    f"{self.prompt_limit} (context minus --max-new-tokens)"
                )
            log.info("history too long for the context: dropping the oldest turn")
            turns = turns[2:]
        return turns

    def reply(self, text: str) -> str:
        """Stream the model's answer to `text` to stdout and add both to the history."""
        try:
            turns = self.fit_history([*self.turns, {"role": "user", "content": text}])
        except TemplateError as exc:  # e.g. a template that rejects the system role
            raise TurnRefused(f"the chat template rejects this conversation: {exc}") from exc
        sys.stdout.write(REPLY_PREFIX)
        sys.stdout.flush()
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            (answer,) = generate_replies(self.model, self.tokenizer, [self.head + turns], self.cfg, streamer)
        except torch.OutOfMemoryError as exc:
            raise TurnRefused("out of memory; try /reset or a lower --max-new-tokens") from exc
        self.turns = [*turns, {"role": "assistant", "content": answer}]
        return answer


def chat_loop(session: ChatSession) -> None:
    """Read a line, answer it, repeat; returns on /exit, EOF or Ctrl-C."""
    output = sys.stdout
    output.write(HELP + "\n")
    try:
        while True:
            try:
                line = input(USER_PROMPT)
            except EOFError:
                output.write("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                session.reset()
                output.write("(history cleared)\n")
                continue
            try:
                session.reply(text)
            except TurnRefused as exc:
                output.write(f"[{exc}]\n")
    except KeyboardInterrupt:
        output.write("\n")
    finally:
        output.flush()


@contextmanager
def interrupt_ends_quietly() -> Iterator[None]:
    """Ctrl-C while the model loads ends the command with status 130, without a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-chat", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a completed qlora-train run directory")
    parser.add_argument("--system", help="system message for the whole conversation")
    add_decoding_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    imports_done()
    args = parse_args(argv)
    configure_cli_logging()
    # Ctrl-C ends the chat even where the parent started it with SIGINT ignored (Python then keeps it
    # ignored: a launcher, a job runner, nohup): Python's own handler, which raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Undecodable bytes typed or piped in, or text the terminal cannot show, must not end the chat.
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    with exit_on_error(), interrupt_ends_quietly():
        run = FinishedRun(args.run_dir)
        cfg = decoding_config(run.config.eval, args)
        if args.max_new_tokens is None:
            cfg = dataclasses.replace(cfg, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
        tokenizer = run.load_tokenizer()
        model = run.load_quantized_model()
        set_seed(args.seed)
        chat_loop(ChatSession(model, tokenizer, cfg, args.system))


if __name__ == "__main__":
    main()
