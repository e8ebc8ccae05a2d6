"""``tunesmith deploy`` on the tiny random Qwen2: a live server on a random loopback port,
driven by the official ``openai`` client (and raw HTTP where the wire format matters)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tunesmith.cli import parse_args  # noqa: E402
from tunesmith.config import DeployArgs  # noqa: E402
from tunesmith.serve.deploy import serve_in_thread  # noqa: E402

KEY = "sk-test-key"
HI = [{"role": "user", "content": "hello there"}]


def start(model_dir: Path, *flags: str):
    argv = ["--model", str(model_dir), "--port", "0", "--torch_dtype", "float32",
            "--served_model_name", "tiny", *flags]  # fmt: skip
    return serve_in_thread(parse_args(DeployArgs, "deploy", "", argv))


@pytest.fixture(scope="module")
def server(isolated_torch, tiny_model_dir: Path, checkpoint: Path, tmp_path_factory):
    """The tiny model with the trained LoRA as 'echo', a key, an adapter root and a small
    body limit."""
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(checkpoint, root / "team" / "bot")
    # A link inside the root to an adapter outside it: not served.
    (root / "escape").symlink_to(checkpoint, target_is_directory=True)
    r = start(tiny_model_dir, "--adapters", f"echo={checkpoint}", "--api_key", KEY,
              "--max_request_bytes", "4000", "--max_tokens_limit", "64",
              "--adapter_root", str(root))  # fmt: skip
    yield r
    r.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def greedy(client, model: str, max_tokens: int = 12, **kw) -> str:
    out = client.chat.completions.create(model=model, messages=HI, max_tokens=max_tokens,
                                         temperature=0, **kw)  # fmt: skip
    return out.choices[0].message.content


def test_models_lists_base_adapters_and_root(client) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["tiny", "echo"]
    assert "team/bot" in ids
    assert "escape" not in ids  # a symlink out of the root is not served


def test_chat_usage_and_equals_plain_generate(server, client, tiny_model_dir, checkpoint) -> None:
    tok = server.server.tokenizer

    def prompt_ids(msgs: list[dict]) -> list[int]:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    out = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=0)
    n = len(prompt_ids(HI))
    assert out.usage.prompt_tokens == n
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == n + 10
    # The adapter answers as peft + generate do on the same checkpoint (with the run's
    # system prompt, as the request has none).
    out = client.chat.completions.create(model="echo", messages=HI, max_tokens=10, temperature=0)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = prompt_ids([{"role": "system", "content": "Be terse."}, *HI])
    assert out.usage.prompt_tokens == len(ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, checkpoint).eval()
    gen = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :]
    assert out.choices[0].message.content == tok.decode(gen, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(gen)


def test_adapter_changes_the_answer_and_batches_mix(client) -> None:
    alone = {m: greedy(client, m, 16) for m in ("tiny", "echo", "team/bot")}
    assert alone["echo"] == alone["team/bot"]  # the same checkpoint, by name and by root
    assert alone["tiny"] != alone["echo"]
    # Concurrently: rows of different adapters decoded in one batch, each as if alone.
    got: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: got.__setitem__(m, greedy(client, m, 16)))
               for m in ("tiny", "echo", "team/bot")]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_stream_wire_format(server) -> None:
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 6, "stream": True,
                       "temperature": 0, "stream_options": {"include_usage": True}})  # fmt: skip
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body.encode())
    req.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == greedy_raw(server, 6)


def greedy_raw(server, n: int) -> str:
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": n, "temperature": 0})
    return post(server.url + "/v1/chat/completions", body.encode())[2]["choices"][0]["message"][
        "content"
    ]


def test_stream_with_openai_client(client) -> None:
    stream = client.chat.completions.create(model="echo", messages=HI, max_tokens=8,
                                            temperature=0, stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == greedy(client, "echo", 8)


def test_completions_stop_and_seed(client) -> None:
    out = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=12,
                                    temperature=0)  # fmt: skip
    full = out.choices[0].text
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens == 12
    stop = full[3:6]
    cut = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=12,
                                    temperature=0, stop=[stop])  # fmt: skip
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    a, b, c = (client.chat.completions.create(model="echo", messages=HI, max_tokens=12,
               temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8))  # fmt: skip
    assert a == b and a != c


def test_wrong_or_missing_key_is_401(server) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, _, body = post(server.url + "/v1/chat/completions", b"{}", key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:  # no key needed
        assert json.loads(r.read())["status"] == "ok"


def test_bad_input_is_400(server, client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=65)  # over limit
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HI, n=2)
    status, _, body = post(server.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, _, body = post(server.url + "/v1/chat/completions", b'{"model": "tiny"}')
    assert status == 400 and body["error"]["param"] == "messages"


def test_unknown_model_and_paths_out_of_the_root_are_404(server, client) -> None:
    for name in ("nope", "../echo", "/etc", "team/../../x", "escape", "team"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=name, messages=HI, max_tokens=2)
        assert e.value.body["code"] == "model_not_found", name


def test_oversized_body_is_413(client) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        big = [{"role": "user", "content": "x" * 5000}]
        client.chat.completions.create(model="tiny", max_tokens=2, messages=big)
    assert e.value.status_code == 413


def test_disconnect_frees_the_slot(server) -> None:
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 64, "stream": True,
                       "temperature": 0})  # fmt: skip
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body.encode())
    req.add_header("Authorization", f"Bearer {KEY}")
    before = server.server.scheduler.generated
    r = urllib.request.urlopen(req, timeout=60)
    r.readline()  # the first event: generation is running
    r.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.server.in_flight == 0 and server.server.scheduler.running() == 0:
            break
        time.sleep(0.05)
    assert server.server.in_flight == 0 and server.server.scheduler.running() == 0
    assert server.server.scheduler.generated - before < 64  # stopped before the end


def test_disconnect_without_stream_frees_the_slot(server) -> None:
    import http.client

    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 3000, "temperature": 0})
    before = server.server.scheduler.generated
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    deadline = time.monotonic() + 10
    while server.server.scheduler.running() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.close()  # the client gives up without reading the answer
    deadline = time.monotonic() + 20  # the scheduler notices at its next step: wait for both
    while time.monotonic() < deadline and (
        server.server.in_flight or server.server.scheduler.running()
    ):
        time.sleep(0.05)
    assert server.server.in_flight == 0 and server.server.scheduler.running() == 0
    assert server.server.scheduler.generated - before < 3000


def test_full_queue_is_429_and_timeout_is_504(isolated_torch, tiny_model_dir: Path) -> None:
    r = start(tiny_model_dir, "--max_concurrent", "1", "--max_queue", "0",
              "--request_timeout", "1.5")  # fmt: skip
    try:
        c = openai.OpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0)
        long = c.chat.completions.create(model="tiny", messages=HI, max_tokens=4096 - 100,
                                         stream=True, temperature=0)  # fmt: skip
        next(iter(long))  # it holds the only slot now
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.APIError, match="request_timeout"):
            for _ in long:  # the held stream runs into the 1.5 s timeout
                pass
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="tiny", messages=HI, max_tokens=4000)
        assert e.value.status_code == 504
        assert c.chat.completions.create(model="tiny", messages=HI, max_tokens=2).choices
    finally:
        r.close()
