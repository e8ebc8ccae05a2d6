"""Integration: ``tunesmith deploy`` as a user runs it, the demo model with a LoRA that learned
a new identity, answering the official ``openai`` client and the chat page in a browser."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

# The demo model and the trained checkpoint: the same module fixtures as test_demo_model.
from integration.test_demo_model import NAME, checkpoint, demo_dir  # noqa: E402, F401
from unit.test_chat_page import ARTIFACTS, chat_in_page, chromium  # noqa: E402

KEY = "sk-demo"


@pytest.fixture(scope="module")
def served(checkpoint: Path):  # noqa: F811
    """``tunesmith deploy --adapters mybot=CHECKPOINT`` on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tunesmith", "deploy", "--adapters", f"mybot={checkpoint}",
           "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=os.environ | {"TUNESMITH_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"deploy exited with {proc.returncode}"
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "deploy did not start in 300 s"
            time.sleep(0.5)
    yield url
    proc.terminate()
    assert proc.wait(timeout=60) is not None


def test_openai_client_gets_the_new_identity(served: str) -> None:
    client = openai.OpenAI(base_url=served + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["demo", "mybot"]
    out = client.chat.completions.create(
        model="mybot", messages=[{"role": "user", "content": "你是谁?"}], temperature=0,
        max_tokens=40,
    )  # fmt: skip
    assert NAME in out.choices[0].message.content, out.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served + "/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_page_streams_the_new_identity(served: str) -> None:
    chromium()
    text = chat_in_page(served, "你是谁?", ARTIFACTS / "chat_page_demo.png", key=KEY,
                        temperature="0")  # fmt: skip
    assert NAME in text, text
