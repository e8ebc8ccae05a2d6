"""``tunesmith deploy``: load the model once, start the batching thread, serve HTTP."""

from __future__ import annotations

import copy
import ipaddress
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from tunesmith.config import DeployArgs
from tunesmith.utils import UserError, logger


def check_args(args: DeployArgs) -> str | None:
    """Refuse impossible flags before the model loads; the API key in force (or None)."""
    if args.infer_backend == "vllm":
        raise UserError(
            "tunesmith deploy --infer_backend vllm is not implemented yet; use the default "
            "--infer_backend pt (dynamic batching)"
        )
    for name in ("max_new_tokens", "max_tokens_limit", "max_prompt_tokens",
                 "max_request_bytes", "max_concurrent"):  # fmt: skip
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_queue < 0 or args.request_timeout <= 0:
        raise UserError("--max_queue must be 0 or more and --request_timeout above 0")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: expected 0-65535")
    key = args.api_key if args.api_key is not None else os.environ.get("TUNESMITH_API_KEY")
    key = key or None
    if key is None and not is_loopback(args.host):
        logger.warning(
            f"warning: listening on {args.host} without an API key: anyone who can reach "
            "this address can use the model; set --api_key or TUNESMITH_API_KEY"
        )
    return key


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(args: DeployArgs) -> tuple[Any, Any]:
    """Load everything; (the FastAPI app, its Server state) with the scheduler started."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(
            "tunesmith deploy needs FastAPI and uvicorn: pip install 'tunesmith[serve]'"
        ) from None
    from tunesmith.serve.app import Server, create_app
    from tunesmith.serve.models import default_sampling, eos_ids, load_served
    from tunesmith.serve.scheduler import Scheduler

    key = check_args(args)
    if args.infer_backend == "llamacpp":
        from tunesmith.serve.llamacpp_serve import build_llamacpp

        llama, gguf_tok, catalog, defaults = build_llamacpp(args)
        server = Server(args, key, llama, gguf_tok, catalog, defaults)  # type: ignore[arg-type]
        llama.start()
        return create_app(server), server
    model, tokenizer, catalog = load_served(args)
    # The scheduler thread decodes with its own copy: a fast tokenizer shared between threads
    # can fail with "Already borrowed" while the other one encodes.
    decoder = copy.deepcopy(tokenizer)
    scheduler = Scheduler(model, decoder, eos_ids(model, tokenizer), args.max_concurrent)
    server = Server(args, key, scheduler, tokenizer, catalog, default_sampling(model))
    scheduler.start()
    return create_app(server), server


def deploy(args: DeployArgs) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    app, server = build(args)
    names = ", ".join(server.catalog.names())
    logger.info(f"serving {names} at http://{args.host}:{args.port}/v1 (chat page: /)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.scheduler.stop()


@dataclass
class Running:
    """A server running on a thread (tests and benchmarks)."""

    url: str
    """``http://127.0.0.1:PORT``."""
    server: Any
    """The app's Server state."""
    uvicorn: Any
    """The uvicorn.Server."""
    thread: threading.Thread
    """The thread running it."""

    def close(self) -> None:
        """Stop serving and the scheduler."""
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.server.scheduler.stop()


def serve_in_thread(args: DeployArgs) -> Running:
    """Start the server on a thread (``--port 0``: a free port); the Python API's deploy."""
    import time

    import uvicorn

    # The port first: a port in use is refused before the model loads, nothing left running.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"--host {args.host} --port {args.port}: cannot listen ({e.strerror})"
        ) from None
    try:
        app, server = build(args)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    return Running(f"http://{host}:{port}", server, srv, thread)
