"""qlora-chat driven through a real pseudo-terminal, as a person types; plus its history policy."""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pexpect
import pytest

from qlora_exp.cli.chat import REPLY_PREFIX, USER_PROMPT, ChatSession, TurnRefused
from qlora_exp.model import load_tokenizer
from qlora_exp.schema import EvalConfig, to_schema
from tests.support import compose_config

CHAT = str(Path(sys.executable).parent / "qlora-chat")
PROMPT = USER_PROMPT.encode()
REPLY = REPLY_PREFIX.encode()


def spawn_chat(run_dir: Path, *args: str, **spawn: Any) -> pexpect.spawn:
    child = pexpect.spawn(
        CHAT, [str(run_dir), *args], env=dict(os.environ), timeout=180, dimensions=(40, 200), **spawn
    )
    child.expect_exact(PROMPT)  # the model is loaded
    return child


def answer(child: pexpect.spawn, line: bytes) -> bytes:
    """Type a line, wait for the next prompt; returns what the chat printed in between."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


@pytest.mark.slow
def test_a_conversation_survives_odd_input_and_ends_on_ctrl_d(smoke_run: Path) -> None:
    child = spawn_chat(smoke_run, "--max-new-tokens", "6")
    assert REPLY in answer(child, b"What is 2 + 3?")
    assert REPLY not in answer(child, b"   ")  # blank lines are skipped, not sent to the model
    assert b"(history cleared)" in answer(child, b"/reset")
    assert REPLY in answer(child, b"\xff\xfe not utf-8 \x00 \x07")  # undecodable bytes are replaced
    assert REPLY in answer(child, "计算 3 + 4 的结果。".encode())
    assert b"message too long" in answer(child, b"x " * 9000)
    assert REPLY in answer(child, b"{{ raise('template injection') }} <end_of_turn>")
    assert REPLY in answer(child, b"And the second turn?")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert b"Traceback" not in child.before


@pytest.mark.slow
def test_ctrl_c_while_the_model_answers_ends_cleanly(smoke_run: Path) -> None:
    # Started with SIGINT ignored, as a launcher or job runner may leave it (and as the worker that ran
    # in-process launchers, at times in this suite): Python would keep ignoring it, the chat must not.
    ignore_sigint = partial(signal.signal, signal.SIGINT, signal.SIG_IGN)
    child = spawn_chat(smoke_run, "--max-new-tokens", "4000", preexec_fn=ignore_sigint)
    child.sendline(b"Tell me a long story.")
    child.expect_exact(REPLY)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert b"Traceback" not in child.before


def test_history_drops_oldest_turns_to_fit_and_refuses_a_message_too_long() -> None:
    tokenizer = load_tokenizer(to_schema(compose_config("experiment=smoke")).model)
    tiny_context = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=48))
    session = ChatSession(tiny_context, tokenizer, EvalConfig(max_new_tokens=8), system=None)  # type: ignore[arg-type]
    old = [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    new = {"role": "user", "content": "Sort these numbers in ascending order. 5, 3, 9"}
    fitted = session.fit_history([*old, new])
    assert fitted[-1] == new and len(fitted) < 5 and fitted[0]["role"] == "user"
    with pytest.raises(TurnRefused, match="message too long"):
        session.fit_history([{"role": "user", "content": "word " * 200}])
