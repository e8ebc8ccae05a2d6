"""``tunesmith deploy --infer_backend llamacpp`` on the tiny random Qwen2 (its GGUF export made
once and cached): the official ``openai`` client gets the llama.cpp engine's own answers,
streamed and whole, from the base and a merged adapter; concurrent requests are answered one
at a time, each as if alone; a client that leaves frees its request."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from llamacpp_util import needs_llama_cpp

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tunesmith.cli import main, parse_args  # noqa: E402
from tunesmith.config import DeployArgs, InferCommandArgs  # noqa: E402
from tunesmith.serve.deploy import serve_in_thread  # noqa: E402

pytestmark = [pytest.mark.usefixtures("isolated_torch"), needs_llama_cpp]
HI = [{"role": "user", "content": "hello there"}]


def start(model_dir: Path, *flags: str):
    argv = ["--model", str(model_dir), "--port", "0", "--infer_backend", "llamacpp",
            "--served_model_name", "tiny", *flags]  # fmt: skip
    return serve_in_thread(parse_args(DeployArgs, "deploy", "", argv))


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, checkpoint: Path):
    """The tiny model and its trained LoRA (merged into its own GGUF file) as 'echo'."""
    r = start(tiny_model_dir, "--adapters", f"echo={checkpoint}", "--max_tokens_limit", "64")
    yield r
    r.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def engine_answer(model_dir: Path, adapters: list[str], messages: list[dict], n: int) -> str:
    """What ``infer --infer_backend llamacpp`` answers greedily (a fresh engine)."""
    from tunesmith.infer.llamacpp_backend import load_llamacpp
    from tunesmith.infer.llamacpp_sampling import GenOptions

    argv = ["--model", str(model_dir), "--infer_backend", "llamacpp"]
    for a in adapters:
        argv += ["--adapters", a]
    engine = load_llamacpp(parse_args(InferCommandArgs, "infer", "", argv))
    return engine.generate(messages, GenOptions(max_new_tokens=n, temperature=0))


def greedy(client, model: str, n: int = 12, **kw) -> str:
    out = client.chat.completions.create(model=model, messages=HI, max_tokens=n, temperature=0,
                                         **kw)  # fmt: skip
    return out.choices[0].message.content


def test_answers_are_the_engines_whole_and_streamed(
    client, tiny_model_dir: Path, checkpoint: Path
) -> None:
    assert [m.id for m in client.models.list()] == ["tiny", "echo"]
    out = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == engine_answer(tiny_model_dir, [], HI, 12)
    assert out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 0
    # The adapter, with its run's system prompt (the request has none), as infer answers.
    echo = greedy(client, "echo")
    terse = [{"role": "system", "content": "Be terse."}, *HI]
    assert echo == engine_answer(tiny_model_dir, [str(checkpoint)], terse, 12)
    assert echo != out.choices[0].message.content
    for model in ("tiny", "echo"):
        stream = client.chat.completions.create(model=model, messages=HI, max_tokens=12,
                                                temperature=0, stream=True)  # fmt: skip
        chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(chunks) == greedy(client, model)


def test_length_stop_and_seed(client) -> None:
    out = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=0,
                                         stop=["\x00never"])  # fmt: skip
    full = out.choices[0].message.content
    if out.choices[0].finish_reason == "length":
        assert out.usage.completion_tokens == 10
    stop = full[len(full) // 2 :].strip()[:2]
    assert stop, full
    cut = greedy(client, "tiny", 10, stop=[stop])
    assert cut == full[: full.index(stop)]
    text = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8,
                                     temperature=0)  # fmt: skip
    assert text.usage.prompt_tokens > 0 and text.choices[0].text
    a, b, c = (client.chat.completions.create(model="tiny", messages=HI, max_tokens=12,
               temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8))  # fmt: skip
    assert a == b and a != c


def test_concurrent_requests_are_serialized(server, client) -> None:
    alone = {m: greedy(client, m, 16) for m in ("tiny", "echo")}
    got: dict[tuple[str, int], str] = {}
    threads = [threading.Thread(target=lambda m=m, i=i: got.__setitem__((m, i),
               greedy(client, m, 16))) for m in ("tiny", "echo") for i in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {(m, i): alone[m] for m in ("tiny", "echo") for i in range(3)}
    assert server.server.in_flight == 0 and server.server.scheduler.running() == 0


def test_disconnect_frees_the_request(server) -> None:
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 64, "stream": True,
                       "temperature": 0, "stop": ["\x00never"]})  # fmt: skip
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body.encode())
    req.add_header("Content-Type", "application/json")
    r = urllib.request.urlopen(req, timeout=60)
    r.readline()  # the first event: the request is running
    r.close()
    # The handler drops the request at once; the scheduler notices the cancellation at its next
    # token, which on a loaded machine comes later: wait for both.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        server.server.in_flight or server.server.scheduler.running()
    ):
        time.sleep(0.05)
    assert server.server.in_flight == 0 and server.server.scheduler.running() == 0
    assert greedy(server_client(server), "tiny", 4)  # still answering


def server_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_prompt_longer_than_the_context_is_400(tiny_model_dir: Path) -> None:
    r = start(tiny_model_dir, "--max_model_len", "64")
    try:
        c = server_client(r)
        long = [{"role": "user", "content": "word " * 80}]
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=long, max_tokens=2)
        assert e.value.body["code"] == "context_length_exceeded"
        assert "the limit is 63" in e.value.body["message"]
        # An answer stops where the context is full.
        out = c.chat.completions.create(model="tiny", messages=HI, max_tokens=64, temperature=0,
                                        stop=["\x00never"])  # fmt: skip
        assert out.usage.total_tokens <= 64 + 1
    finally:
        r.close()


def test_bad_flags_are_one_sentence(tiny_model_dir: Path, tmp_path: Path, capsys,
                                    monkeypatch) -> None:  # fmt: skip
    argv = ["deploy", "--model", str(tiny_model_dir), "--infer_backend", "llamacpp"]
    assert main([*argv, "--adapter_root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--adapter_root is not served by --infer_backend llamacpp" in err
    assert "Traceback" not in err
    assert main([*argv, "--max_model_len", "100000"]) == 2
    assert "more than the context length" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs llama-cpp-python" in err and "pip install 'tunesmith[llamacpp]'" in err
