"""Each decoder layer's forward and backward replayed as CUDA graphs (``--fast graphs``).

At seq 2048 a 7B LoRA step does 162 ms of GPU work in 211-300 ms of wall time: the host
issues ~4,100 kernels a step and the GPU waits for it (bench/RESULTS.md, issue 17). A CUDA
graph replays a captured kernel sequence with one launch, so each layer costs two launches a
step (forward, backward) instead of ~140 kernels' worth of Python, dispatcher and driver work.

Per layer, for the one hidden-state shape the run trains on (the first shape that every layer
has seen ``WARMUP_CALLS`` times, so Triton kernels are compiled and attention plans exist):

- with gradient checkpointing (``recompute``): the forward graph runs the layer under
  ``no_grad`` (nothing saved but its input, the checkpoint); the backward graph recomputes the
  layer with grad and runs ``autograd.grad`` for the input and the LoRA weights: the same
  work as ``torch.utils.checkpoint``'s non-reentrant recompute, captured once;
- without it (``keep``): the forward graph keeps its activations (the captured autograd graph
  holds them) and the backward graph is ``autograd.grad`` over them.

The graphs share one memory pool and chain through static buffers: layer i's static input
*is* layer i-1's static output (no copy), and the backward graphs hand ``dx`` down through two
ping-pong buffers. Everything else (embedding, final norm, loss, optimizer) stays eager. The
gradients of the LoRA weights come back through autograd as usual (one flat clone per layer),
so accumulation and clipping are unchanged. The math is the eager layer's: the same kernels
on the same inputs.

A layer runs eagerly (HF's own checkpointing, replicated here) whenever the graphs cannot
serve the call: another shape, more than ``MAX_TOKENS`` tokens, an attention mask, a KV cache,
eval mode, no grad, attention dropout or a dropout outside the fused LoRA layers (a replay
would repeat a captured draw), full fine-tuning, or several processes. The fused layers' LoRA
dropout hashes a step seed the graphs read from device memory (``dropout.py``).

Captures differentiate w.r.t. fresh aliases of the LoRA weights (``aliases.py`` says why).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from tunesmith.model.fast.aliases import aliased
from tunesmith.model.fast.dropout import graph_unsafe_dropout

WARMUP_CALLS = 1
"""Eager calls of every layer at the graphed shape before the capture (Triton's JIT and cuDNN's
plans must exist: neither can be built while a graph is captured); the second call captures."""
MAX_TOKENS = 4096
"""Rows x length above which the layers stay eager: a longer step is GPU-bound (8192: 726 ms of
GPU work in 760 ms), and the pool keeps one layer's backward scratch (~0.4 GiB at 2,048)."""
EMULATE = False
"""Tests only: a CPU stand-in for CUDA graphs (replay re-runs the captured function and copies
its results into the tensors the capture returned). CI has no GPU."""


class _Emulated:
    """What a CUDA graph does to its static tensors, for the CPU tests."""

    def __init__(self, fn: Callable[[], list[torch.Tensor]]) -> None:
        self.fn = fn
        self.outs = fn()

    def replay(self) -> None:
        new = self.fn()
        with torch.no_grad():
            for old, value in zip(self.outs, new, strict=True):
                old.copy_(value.detach())


@dataclass
class LayerGraphs:
    """One layer's captured graphs and the static tensors they read and write."""

    fwd: Any
    """The forward graph (``torch.cuda.CUDAGraph``)."""
    bwd: Any
    """The backward graph."""
    x: torch.Tensor
    """Static input: the previous layer's static output, or a buffer of its own."""
    out: torch.Tensor
    """Static output."""
    gy: torch.Tensor
    """Static gradient of the output (a ping-pong buffer)."""
    gx: torch.Tensor
    """Static gradient of the input (the other ping-pong buffer)."""
    flat: torch.Tensor
    """The LoRA weights' gradients, flattened into one buffer."""
    params: list[torch.Tensor]
    """The layer's trained parameters, in ``flat``'s order."""
    held: Any = None
    """Without recompute: the captured forward's autograd graph, whose saved activations the
    backward graph reads (dropping it would hand their memory back to the pool)."""


@dataclass
class GraphSet:
    """The graphs of one model's decoder layers and what they share."""

    n_layers: int
    """Decoder layers patched."""
    shape: tuple[int, ...] | None = None
    """The graphed hidden-state shape (one per run; other shapes run eagerly)."""
    pool: Any = None
    """The memory pool every graph of the set captures into."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    """Static cos/sin of the rotary embedding, shared by all layers."""
    rope_src: tuple[torch.Tensor, torch.Tensor] | None = None
    """The last cos/sin copied in (held, so its identity is a safe test)."""
    ping: list[torch.Tensor] = field(default_factory=list)
    """Two buffers the backward graphs pass ``dx`` down through."""
    layers: dict[int, LayerGraphs] = field(default_factory=dict)
    """Captured layers by index."""
    calls: dict[tuple[int, tuple[int, ...]], int] = field(default_factory=dict)
    """Eager calls per (layer, shape) before capture."""
    disabled: str = ""
    """Why the graphs are off for this model (empty: not off)."""
    slack_bytes: int = 0
    """Pool memory reserved but not held by live tensors after the capture: the graphs'
    scratch, which ``max_memory_allocated`` does not see during replays."""


SLACK: list[int] = [0]
"""Graph-pool scratch of the models in this process (``track.memory_gb`` adds it)."""


def enable_layer_graphs(model: nn.Module) -> str:
    """Route every decoder layer of a (peft-wrapped) causal LM through ``_graphed_forward``;
    returns what was done ('' when there is no CUDA or no decoder layer list)."""
    from tunesmith.model.lora import hf_model

    if not torch.cuda.is_available() and not EMULATE:
        return ""
    layers = getattr(hf_model(model).get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return ""
    gs = GraphSet(n_layers=len(layers))
    for index, layer in enumerate(layers):
        # HF's checkpointing is switched off on the layer and done here instead, so that the
        # graphs (which recompute by construction) are not checkpointed a second time.
        layer._ts_ckpt = bool(getattr(layer, "gradient_checkpointing", False))  # type: ignore[assignment]
        if layer._ts_ckpt:
            layer.gradient_checkpointing = False  # type: ignore[assignment]
        layer._ts_graphs = gs  # type: ignore[assignment]
        layer._ts_index = index  # type: ignore[assignment]
        layer.forward = types.MethodType(_graphed_forward, layer)  # type: ignore[method-assign]
    mode = "recompute" if layers[0]._ts_ckpt else "keep"
    return f"CUDA graphs per decoder layer ({len(layers)} layers, {mode})"


def _graphed_forward(self: nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    gs: GraphSet = self._ts_graphs  # type: ignore[assignment]
    if getattr(self, "gradient_checkpointing", False):  # re-enabled by someone since: ours now
        self._ts_ckpt, self.gradient_checkpointing = True, False
    if not args and _servable(self, gs, hidden, kwargs):
        index: int = self._ts_index  # type: ignore[assignment]
        lg = gs.layers.get(index)
        if lg is None:
            key = (index, tuple(hidden.shape))
            gs.calls[key] = gs.calls.get(key, 0) + 1
            if gs.calls[key] > WARMUP_CALLS:
                lg = _try_capture(self, gs, hidden, kwargs)
        if lg is not None:
            _copy_rope(gs, kwargs["position_embeddings"])
            return _Replay.apply(hidden, lg, *lg.params)
    return _eager(self, hidden, *args, **kwargs)


def _eager(self: nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The layer as HF runs it: checkpointed (non-reentrant) when training with grad."""
    forward = type(self).forward
    if self._ts_ckpt and self.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            forward, self, hidden, *args, use_reentrant=False, **kwargs
        )
    return forward(self, hidden, *args, **kwargs)


def _servable(self: nn.Module, gs: GraphSet, hidden: torch.Tensor, kwargs: dict) -> bool:
    """Whether this call can replay (or capture) the layer's graphs."""
    if gs.disabled or not (self.training and torch.is_grad_enabled()):
        return False
    if not (hidden.is_cuda or EMULATE) or (gs.shape is not None and hidden.shape != gs.shape):
        return False
    if hidden.numel() // hidden.shape[-1] > MAX_TOKENS:
        return False
    rope = kwargs.get("position_embeddings")
    if not (isinstance(rope, tuple) and len(rope) == 2):
        return False
    for key, value in kwargs.items():
        if key in ("position_embeddings", "position_ids", "cache_position", "use_cache"):
            continue
        if value is not None:  # an attention mask, a KV cache, anything not modelled
            return False
    if gs.shape is None:  # first servable call of the run: checks that hold for all layers
        gs.disabled = _why_not(self)
        if gs.disabled:
            from tunesmith.utils import logger

            logger.info(f"fast path: CUDA graphs off ({gs.disabled}); the layers run eagerly")
    return not gs.disabled


def _why_not(layer: nn.Module) -> str:
    """'' when the graphs can serve the model of ``layer``, else the reason."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "several processes"
    if any(p.requires_grad and "lora_" not in n for n, p in layer.named_parameters()):
        return "weights other than LoRA trained"  # static gradients as large as those weights
    why = graph_unsafe_dropout(layer)
    if why:
        return why
    attn = getattr(layer, "self_attn", None)
    if float(getattr(getattr(attn, "config", None), "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout"
    if getattr(getattr(attn, "config", None), "_attn_implementation", "sdpa") != "sdpa":
        return "attention other than SDPA"  # flash-attention reads position_ids for packing
    return ""


def _copy_rope(gs: GraphSet, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Bring the static cos/sin up to this forward's (once a forward: all layers share it)."""
    assert gs.rope is not None
    if gs.rope_src is not None and rope[0] is gs.rope_src[0] and rope[1] is gs.rope_src[1]:
        return
    with torch.no_grad():
        gs.rope[0].copy_(rope[0])
        gs.rope[1].copy_(rope[1])
    gs.rope_src = rope


@contextlib.contextmanager
def _capturing(gs: GraphSet) -> Iterator[None]:
    """While a graph is captured: no cached compute-dtype copies of the adapter (a cast
    must be captured, else replays would read a stale copy) and no autocast cache."""
    from tunesmith.model.fast import lora_fused

    old = lora_fused.CACHE_COPIES
    lora_fused.CACHE_COPIES = False
    try:
        if EMULATE or not torch.is_autocast_enabled("cuda"):
            yield
        else:
            dtype = torch.get_autocast_dtype("cuda")
            with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                yield
    finally:
        lora_fused.CACHE_COPIES = old


def _capture(gs: GraphSet, fn: Callable[[], list[torch.Tensor]]) -> tuple[Any, list[torch.Tensor]]:
    """Capture ``fn`` into a graph of the set's pool; (graph, its static outputs)."""
    if EMULATE:
        with _capturing(gs):
            g = _Emulated(fn)
        return g, g.outs
    graph = torch.cuda.CUDAGraph()
    with _capturing(gs), torch.cuda.graph(graph, pool=gs.pool):
        outs = fn()
    if gs.pool is None:
        gs.pool = graph.pool()
    return graph, outs


def _try_capture(
    layer: nn.Module, gs: GraphSet, hidden: torch.Tensor, kwargs: dict
) -> LayerGraphs | None:
    """``_capture_layer``, or None with the graphs switched off for the run when a capture
    fails (an operation CUDA cannot capture: the layers then run eagerly, as without graphs;
    layers already replayed in this step finish their backward through their graphs)."""
    try:
        return _capture_layer(layer, gs, hidden, kwargs)
    except Exception as e:  # any capture failure means: run eagerly
        from tunesmith.utils import logger

        gs.disabled = f"capture failed: {str(e).splitlines()[0][:200]}"
        gs.layers.clear()  # graphs still in this step's autograd graph stay alive through it
        logger.warning(f"fast path: CUDA graphs off ({gs.disabled}); the layers run eagerly")
        return None


def _capture_layer(
    layer: nn.Module, gs: GraphSet, hidden: torch.Tensor, kwargs: dict
) -> LayerGraphs:
    """Capture ``layer``'s forward and backward graphs at ``hidden``'s shape."""
    index: int = layer._ts_index  # type: ignore[assignment]
    cos, sin = kwargs["position_embeddings"]
    if gs.shape is None:  # before any capture: outside the pool, never reused by a graph
        gs.shape = tuple(hidden.shape)
        gs.ping = [torch.empty_like(hidden) for _ in range(2)]
        gs.rope = (cos.detach().clone(), sin.detach().clone())
        gs.rope_src = (cos, sin)
    # Layer i reads layer i-1's static output in place; the first layer gets a buffer.
    prev = gs.layers.get(index - 1)
    shared = prev is not None and prev.out.data_ptr() == hidden.data_ptr()
    x = prev.out if shared else hidden.detach().clone()  # type: ignore[union-attr]
    call = dict(kwargs, position_embeddings=gs.rope, position_ids=None)
    call.pop("cache_position", None)
    params = [p for p in layer.parameters() if p.requires_grad]
    # Fresh leaves on the parameters' storage: replays read the optimizer's updates in place.
    aliases = {id(p): p.detach().requires_grad_(True) for p in params}
    leaves = [aliases[id(p)] for p in params]
    forward = type(layer).forward
    recompute = bool(layer._ts_ckpt)
    held = types.SimpleNamespace(x=None, out=None)

    def fwd() -> list[torch.Tensor]:
        if recompute:  # nothing saved: the backward graph recomputes
            with torch.no_grad():
                return [forward(layer, x, **call)]
        held.x = x.detach().requires_grad_(True)
        with torch.enable_grad(), aliased(layer, aliases):
            held.out = forward(layer, held.x, **call)
        return [held.out]

    fwd_graph, (out,) = _capture(gs, fwd)
    gy, gx = gs.ping[index % 2], gs.ping[(index + 1) % 2]

    def bwd() -> list[torch.Tensor]:
        if recompute:
            held.x = x.detach().requires_grad_(True)
            with torch.enable_grad(), aliased(layer, aliases):
                held.out = forward(layer, held.x, **call)
        # Backward outside autocast, as the eager backward runs.
        with torch.autocast(held.out.device.type, enabled=False):
            grads = torch.autograd.grad(held.out, [held.x, *leaves], gy,
                                        retain_graph=not recompute)  # fmt: skip
        gx.copy_(grads[0])
        if recompute:
            held.x = held.out = None
        return [torch.cat([g.reshape(-1) for g in grads[1:]]) if params else gx.new_empty(0)]

    bwd_graph, (flat,) = _capture(gs, bwd)
    lg = LayerGraphs(fwd_graph, bwd_graph, x, out.detach(), gy, gx, flat, params,
                     held=None if recompute else held)  # fmt: skip
    gs.layers[index] = lg
    if len(gs.layers) == gs.n_layers and not EMULATE:
        gs.slack_bytes = _pool_slack(gs.pool)
        SLACK[0] += gs.slack_bytes
    return lg


def _pool_slack(pool: Any) -> int:
    """Bytes reserved by ``pool`` but not held by live tensors."""
    try:
        segments = torch.cuda.memory._snapshot()["segments"]
    except Exception:  # the snapshot is a diagnostic: no slack known then
        return 0
    return sum(s["total_size"] - s["allocated_size"] for s in segments
               if tuple(s.get("segment_pool_id", ())) == tuple(pool))  # fmt: skip


class _Replay(torch.autograd.Function):
    """A captured layer as one autograd node: replay forward, replay backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lg: LayerGraphs, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Copy ``x`` in (unless it is the static input already) and replay the forward."""
        if x.data_ptr() != lg.x.data_ptr():
            lg.x.copy_(x)
        lg.fwd.replay()
        ctx.lg = lg
        return lg.out.detach()

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """Replay the backward; the LoRA gradients leave as a fresh copy (the static buffer
        is rewritten by the next replay, while accumulation may still hold them)."""
        lg: LayerGraphs = ctx.lg
        if gy.data_ptr() != lg.gy.data_ptr():
            lg.gy.copy_(gy)
        lg.bwd.replay()
        flat = lg.flat.clone()
        grads, start = [], 0
        for p in lg.params:
            grads.append(flat[start : start + p.numel()].view(p.shape))
            start += p.numel()
        gx = lg.gx.detach() if ctx.needs_input_grad[0] else None
        return (gx, None, *grads)
