"""Dynamic batching for the ``pt`` backend: one thread steps every running request together.

Requests wait in a queue; at every decode step boundary the waiting ones (up to the batch
size) are prefilled together, left-padded, and their KV cache is spliced into the running
batch's (both left-padded to one length, the attention mask hiding the padding, each row's
position ids counted from its own first real token). One forward then decodes a token for
every row, whatever its adapter: peft's mixed-adapter batches (``adapter_names``) apply each
row's LoRA to its own row only. A row that finishes, times out or whose client went away
leaves the batch at the next step, and the padding columns no row needs any more are cut.

Everything that touches the model (forward passes, loading an adapter from
``--adapter_root``) runs on this one thread, so no lock is held around the model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.infer.decode import cache_arg, core_model
from tunesmith.utils import error_line, logger

BASE = "__base__"
"""peft's name for "no adapter" in a mixed-adapter batch."""


@dataclass(frozen=True)
class Sampling:
    """How one request chooses its tokens."""

    temperature: float = 1.0
    """0: greedy."""
    top_p: float = 1.0
    """Nucleus mass (1: off)."""
    top_k: int = 0
    """Most likely tokens kept (0: off)."""
    repetition_penalty: float = 1.0
    """transformers' penalty on tokens already in prompt or answer (1: off)."""
    seed: int | None = None
    """Seed of the request's own random generator (none: a random one)."""


@dataclass
class Job:
    """One request as the scheduler sees it."""

    prompt: list[int]
    """The prompt's token ids."""
    adapter: str | None
    """The peft adapter name to apply (None: the base model)."""
    max_tokens: int
    """Most tokens to generate."""
    sampling: Sampling
    """Token choice."""
    stops: list[str]
    """Strings that end the answer (not included)."""
    deadline: float
    """``time.monotonic()`` after which the request is stopped with ``timeout``."""
    emit: Callable[[str, Any], None]
    """Called on the scheduler thread with ("text", str), ("done", (finish_reason, tokens))
    or ("error", message); must be thread-safe."""
    adapter_path: Path | None = None
    """Where to load ``adapter`` from if it is not loaded yet (``--adapter_root``)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by the server when the client went away: the row leaves at the next step."""
    tokens: list[int] = field(default_factory=list)
    """Tokens generated so far."""
    sent: int = 0
    """Characters of the answer already emitted."""
    rng: torch.Generator | None = None
    """The request's random generator (made when it starts)."""


@dataclass
class _Batch:
    jobs: list[Job]
    cache: Any
    """transformers' DynamicCache, rows in ``jobs`` order."""
    mask: torch.Tensor
    """[B, T] 1 on real tokens of the cache, 0 on left padding."""
    last: torch.Tensor
    """[B, 1] the token each row feeds next."""
    pos: torch.Tensor
    """[B, 1] its position."""


class JobQueue:
    """A decoding thread fed by a queue of jobs: the plumbing both schedulers (pt here,
    llama.cpp in ``llamacpp_serve``) share. ``submit`` from any thread; the subclass's
    ``_loop`` takes jobs from ``waiting`` under ``wake`` and returns when ``stopping``."""

    def __init__(self, name: str) -> None:
        self.waiting: deque[Job] = deque()
        self.wake = threading.Condition()
        self.generated = 0
        """Tokens generated since start (for /health)."""
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        """Start the decoding thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue ``job``; the loop takes it at its next step boundary."""
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()

    def _loop(self) -> None:
        raise NotImplementedError


class Scheduler(JobQueue):
    """The batching loop over one resident model; ``submit`` from any thread."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], max_batch: int) -> None:
        super().__init__("tunesmith-scheduler")
        self.model = model
        self.tok = tokenizer
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.cache_name = cache_arg(core_model(model))
        """The forward's (and its output's) name for the KV cache."""
        self.batch: _Batch | None = None

    def running(self) -> int:
        """Rows decoding now."""
        b = self.batch
        return len(b.jobs) if b is not None else 0

    # ---- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and self.batch is None:
                    self.wake.wait()
                if self.stopping:
                    return
                room = self.max_batch - self.running()
                new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            try:
                with torch.inference_mode():
                    self._admit(new)
                    if self.batch is not None:
                        self._step()
            except Exception as e:  # a failed step must not take the server down
                logger.exception("generation failed")
                jobs = (self.batch.jobs if self.batch else []) + new
                self.batch = None
                for job in jobs:
                    if not job.cancelled.is_set():
                        job.emit("error", f"generation failed: {error_line(e)}")

    def _admit(self, new: list[Job]) -> None:
        ready = []
        now = time.monotonic()
        for job in new:
            if job.cancelled.is_set():
                continue
            if now > job.deadline:  # waited in the queue for all of its time
                job.emit("done", ("timeout", 0))
                continue
            if job.adapter is not None and not self._ensure_adapter(job):
                continue
            ready.append(job)
        if not ready:
            return
        # A cache whose layers are not plain growing tensors (sliding window) cannot be
        # spliced: then newcomers wait for the running batch to finish.
        if self.batch is not None and not _spliceable(self.batch.cache):
            with self.wake:
                self.waiting.extendleft(reversed(ready))
            return
        fresh = self._prefill(ready)
        if fresh is None:
            return
        self.batch = fresh if self.batch is None else _merge(self.batch, fresh)

    def _ensure_adapter(self, job: Job) -> bool:
        from peft import PeftModel

        model = self.model
        if isinstance(model, PeftModel) and job.adapter in model.peft_config:
            return True
        if job.adapter_path is None:
            job.emit("error", f"adapter {job.adapter} is not loaded")
            return False
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(job.adapter_path), adapter_name=job.adapter)
            else:
                self.model = PeftModel.from_pretrained(
                    model, str(job.adapter_path), adapter_name=job.adapter
                )
            self.model.eval()
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            job.emit("error", f"the adapter does not load on this base model: {error_line(e)}")
            return False
        logger.info(f"loaded adapter {job.adapter_path} as {job.adapter}")
        return True

    def _forward(self, jobs: list[Job], **kw: Any) -> Any:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            kw["adapter_names"] = [j.adapter or BASE for j in jobs]
        return self.model(use_cache=True, **kw)

    def _prefill(self, jobs: list[Job]) -> _Batch | None:
        width = max(len(j.prompt) for j in jobs)
        pad = self.tok.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs])
        ids, mask = ids.to(self.device), mask.to(self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        for job in jobs:
            job.rng = torch.Generator(device="cpu")
            seed = job.sampling.seed
            job.rng.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
        out = self._forward(jobs, input_ids=ids, attention_mask=mask, position_ids=position,
                            logits_to_keep=1)  # fmt: skip
        nxt = self._choose(out.logits[:, -1, :], jobs)
        batch = _Batch(jobs, out[self.cache_name], mask, torch.tensor(nxt, device=self.device)
                       .unsqueeze(1), mask.sum(-1, keepdim=True))  # fmt: skip
        return self._retire(batch, nxt)

    def _step(self) -> None:
        b = self.batch
        assert b is not None
        now = time.monotonic()
        for job in b.jobs:
            if not job.cancelled.is_set() and now > job.deadline:
                job.emit("done", ("timeout", len(job.tokens)))
                job.cancelled.set()
        if any(j.cancelled.is_set() for j in b.jobs):
            self.batch = b = _select(
                b, [i for i, j in enumerate(b.jobs) if not j.cancelled.is_set()]
            )
            if b is None:
                return
        mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], dim=1)
        out = self._forward(b.jobs, input_ids=b.last, attention_mask=mask, position_ids=b.pos,
                            **{self.cache_name: b.cache})  # fmt: skip
        nxt = self._choose(out.logits[:, -1, :], b.jobs)
        b.cache, b.mask = out[self.cache_name], mask
        b.last = torch.tensor(nxt, device=self.device).unsqueeze(1)
        b.pos = b.pos + 1
        self.batch = self._retire(b, nxt)

    def _retire(self, b: _Batch, tokens: list[int]) -> _Batch | None:
        """Hand each row its new token; rows that finished leave the batch."""
        self.generated += len(tokens)
        keep = []
        for i, (job, token) in enumerate(zip(b.jobs, tokens, strict=True)):
            finish = self._advance(job, token)
            if finish is None:
                keep.append(i)
            else:
                job.emit("done", (finish, len(job.tokens)))
        return b if len(keep) == len(b.jobs) else _select(b, keep)

    # ---- per-request token handling ------------------------------------------------------

    def _advance(self, job: Job, token: int) -> str | None:
        """Record ``token``, emit the text that is final now; the finish reason, or None."""
        job.tokens.append(token)
        eos = token in self.eos_ids
        text = self.tok.decode(job.tokens, skip_special_tokens=True)
        cut = find_stop(text, job.stops, job.sent)
        if cut is not None:
            self._send(job, text[:cut])
            return "stop"
        if eos or len(job.tokens) >= job.max_tokens:
            self._send(job, text)
            return "stop" if eos else "length"
        if text.endswith("\ufffd"):
            return None  # half a UTF-8 character: wait for the rest
        self._send(job, text[: len(text) - partial_stop(text, job.stops)])
        return None

    def _send(self, job: Job, text: str) -> None:
        if len(text) > job.sent:
            job.emit("text", text[job.sent :])
            job.sent = len(text)

    def _choose(self, logits: torch.Tensor, jobs: list[Job]) -> list[int]:
        """Each row's next token under its own sampling settings and random generator."""
        logits = logits.float().cpu()
        return [pick(logits[i], job.sampling, job.prompt + job.tokens, job.rng)
                for i, job in enumerate(jobs)]  # fmt: skip


def pick(row: torch.Tensor, s: Sampling, seen: list[int], rng: torch.Generator | None) -> int:
    """One token from last-position logits ``row`` [V], as transformers' processors would:
    repetition penalty, then temperature, top-k, top-p, then a draw (argmax when greedy)."""
    if s.repetition_penalty != 1.0:
        ids = torch.tensor(seen, dtype=torch.long).unique()
        v = row[ids]
        row = row.clone()
        row[ids] = torch.where(v < 0, v * s.repetition_penalty, v / s.repetition_penalty)
    if s.temperature == 0:
        return int(row.argmax())
    row = row / s.temperature
    if s.top_k > 0 or s.top_p < 1.0:
        k = min(s.top_k, row.numel()) if s.top_k > 0 else row.numel()
        vals, idx = row.topk(k)  # sorted, most likely first
        if s.top_p < 1.0:
            probs = vals.softmax(-1)
            keep = (probs.cumsum(-1) - probs) < s.top_p  # the first one is always kept
            vals, idx = vals[keep], idx[keep]
    else:
        vals, idx = row, None
    choice = int(torch.multinomial(vals.softmax(-1), 1, generator=rng))
    return int(idx[choice]) if idx is not None else choice


def find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the earliest stop string starts in ``text`` (searching only near new text)."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s)))) >= 0]
    return min(found) if found else None


def partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string: held back."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


# ---- KV cache surgery ------------------------------------------------------------------------


def _spliceable(cache: Any) -> bool:
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of ``a``'s rows then ``b``'s, both left-padded to the longer cache."""
    ta, tb = a.mask.shape[1], b.mask.shape[1]
    t = max(ta, tb)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        la.keys = torch.cat([_pad_left(la.keys, t - ta, 2), _pad_left(lb.keys, t - tb, 2)])
        la.values = torch.cat([_pad_left(la.values, t - ta, 2), _pad_left(lb.values, t - tb, 2)])
    mask = torch.cat([_pad_left(a.mask, t - ta, 1), _pad_left(b.mask, t - tb, 1)])
    return _Batch(a.jobs + b.jobs, a.cache, mask, torch.cat([a.last, b.last]),
                  torch.cat([a.pos, b.pos]))  # fmt: skip


def _select(b: _Batch, keep: list[int]) -> _Batch | None:
    """The batch with only rows ``keep``, and the padding columns none of them needs cut."""
    if not keep:
        return None
    idx = torch.tensor(keep, device=b.mask.device)
    mask = b.mask.index_select(0, idx)
    first = int((mask.sum(0) > 0).nonzero()[0])
    for layer in b.cache.layers:
        layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
        layer.values = layer.values.index_select(0, idx)[:, :, first:]
    return _Batch([b.jobs[i] for i in keep], b.cache, mask[:, first:],
                  b.last.index_select(0, idx), b.pos.index_select(0, idx))  # fmt: skip
