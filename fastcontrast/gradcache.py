"""Gradient caching: a contrastive step over a large batch with the memory of one chunk.

Gao, Zhang, Han and Callan (2021), "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (GradCache), RepL4NLP 2021.

A contrastive loss couples every sample of the batch, so the usual gradient accumulation (sum
the losses of sub-batches) changes the objective. GradCache splits the step at the embeddings
instead, which are small (N x D) next to the encoder's activations:

1. embed every chunk of ``chunk_size`` samples without a graph (``torch.no_grad``), saving
   the RNG state before each chunk;
2. compute the loss on the full embeddings E and its gradient G = dL/dE (E are detached leaves,
   so this graph holds only the loss);
3. for each chunk again: restore its RNG state (so dropout draws the same masks), embed it with
   a graph and back-propagate the cached slice of G: ``torch.autograd.backward(e_chunk,
   G_chunk)``. By the chain rule the parameters receive exactly dL/dtheta of the full batch.

Peak memory is then the activations of one chunk plus O(N D) for E and G, instead of the
activations of the whole batch; the price is a second forward of every chunk.

    loss = gradcache_step((image_tower, text_tower), (images, tokens),
                          lambda img, txt: fastcontrast.clip_loss(img, txt, scale),
                          chunk_size=512)
    optimizer.step()

One encoder and two views (SimCLR-style): ``encoders=(model, model)``, ``inputs=(view_a,
view_b)``. Inputs are tensors or tuples / lists / dicts of tensors, chunked along dim 0; an
encoder maps a chunk to its (n, D) embeddings (a tensor, or a tuple of tensors).

Distributed: ``loss_fn`` sees this rank's embeddings; it may be a distributed loss
(``fastcontrast.distributed.clip_loss`` etc.), whose backward already gives each rank the
gradient of the sum of all ranks' losses, so step 2 yields each rank's slice of the global
gradient. Encoders wrapped in ``DistributedDataParallel`` all-reduce their gradients once per
step: every chunk's forward and backward runs under ``no_sync()`` except the last chunk that
uses each DDP module (the same module may embed several inputs). Parameters that only
``loss_fn`` uses (a learnable ``logit_scale`` outside the DDP modules) get their gradient in
step 2; pass them as ``loss_parameters`` to have it averaged over the process group, as DDP
does for the encoders.

Exactness conditions: the encoder must treat samples independently (no BatchNorm in training
mode: its batch statistics depend on the chunk; use LayerNorm / GroupNorm, or freeze BN);
randomness must come from torch's CPU and CUDA generators (restored per chunk), not from Python's
``random`` or NumPy. Dropout masks repeat exactly between the two passes of a chunk; they equal
those of one unchunked forward only when the chunked and unchunked draws consume the generator
alike (not guaranteed by torch), so "the plain step" it matches bit for bit is the same chunks
forwarded with a graph.
"""
import contextlib

import torch

__all__ = ["gradcache_step", "split_chunks"]


def split_chunks(inputs, chunk_size):
    """The chunks of ``inputs`` along dim 0: a list of objects of the same structure (tensor,
    tuple / list or dict of tensors), each of at most ``chunk_size`` samples."""
    n = _batch_size(inputs)
    return [_slice(inputs, start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _batch_size(x):
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError("inputs must have a batch dimension, got a 0-dim tensor")
        return x.shape[0]
    items = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(
        x, (tuple, list)) else None
    if not items:
        raise TypeError(f"inputs must be tensors or non-empty tuples / lists / dicts of tensors, "
                        f"got {type(x).__name__}")
    sizes = {_batch_size(item) for item in items}
    if len(sizes) != 1:
        raise ValueError(f"every tensor of one input must have the same batch size, got {sizes}")
    return sizes.pop()


def _slice(x, start, stop):
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if isinstance(x, dict):
        return {key: _slice(value, start, stop) for key, value in x.items()}
    return type(x)(_slice(item, start, stop) for item in x)


def _tensors(output):
    """The embedding tensors an encoder returned (a tensor or a tuple / list of tensors)."""
    items = (output,) if isinstance(output, torch.Tensor) else tuple(output)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"an encoder must return a tensor or a tuple of tensors, got "
                        f"{type(output).__name__}")
    return items


def _cuda_devices(chunk):
    if isinstance(chunk, torch.Tensor):
        return {chunk.device.index or 0} if chunk.is_cuda else set()
    items = chunk.values() if isinstance(chunk, dict) else chunk
    return set().union(*(_cuda_devices(item) for item in items))


def _rng_state(devices):
    return (torch.get_rng_state(),
            {d: torch.cuda.get_rng_state(d) for d in devices} if devices else {})


@contextlib.contextmanager
def _replayed_rng(state, devices):
    """Run the block from a saved RNG state, then put the generators back where they were."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=sorted(devices)):
        torch.set_rng_state(cpu)
        for d, s in cuda.items():
            torch.cuda.set_rng_state(s, d)
        yield


def _is_ddp(module):
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def gradcache_step(encoders, inputs, loss_fn, *, chunk_size, loss_parameters=(), group=None,
                   replay_rng=True):
    """One GradCache step: accumulates dL/dtheta of the whole batch into the encoders'
    ``.grad`` (call ``optimizer.zero_grad()`` before and ``optimizer.step()`` after) and returns
    the loss value (a detached tensor).

    encoders: one callable per input (an ``nn.Module``, possibly DDP-wrapped; the same module
        may appear several times), mapping a chunk of its input to embeddings.
    inputs: one batch per encoder (same length as ``encoders``): a tensor or a tuple / list /
        dict of tensors, chunked along dim 0. Different inputs may have different batch sizes.
    loss_fn: ``loss_fn(*embeddings)`` -> scalar tensor, called once on the full embeddings
        (one argument per encoder output tensor, in order); it may use distributed losses.
    chunk_size: samples per chunk (peak memory grows with it, not with the batch).
    loss_parameters: parameters ``loss_fn`` uses directly (e.g. a learnable logit scale) that
        are not part of a DDP module; with torch.distributed initialised their gradient is
        averaged over ``group`` (one all-reduce), like DDP's. Empty by default.
    replay_rng: restore each chunk's CPU / CUDA RNG state for its second forward (default True;
        without it dropout would draw new masks and the gradient would not match the loss).
    """
    if callable(encoders) and not isinstance(encoders, (tuple, list)):
        encoders = (encoders,)
        inputs = (inputs,)
    encoders, inputs = tuple(encoders), tuple(inputs)
    if len(encoders) != len(inputs) or not encoders:
        raise ValueError(f"need one input per encoder, got {len(encoders)} encoders and "
                         f"{len(inputs)} inputs")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    chunks = [split_chunks(x, chunk_size) for x in inputs]

    # 1. embeddings without a graph, and the RNG state each chunk started from
    states, embedded = [], []
    with torch.no_grad():
        for encoder, parts in zip(encoders, chunks):
            outputs, saved = [], []
            for part in parts:
                devices = _cuda_devices(part)
                saved.append((_rng_state(devices) if replay_rng else None, devices))
                outputs.append(_tensors(encoder(part)))
            states.append(saved)
            embedded.append([torch.cat(column) for column in zip(*outputs)])
    widths = [len(e) for e in embedded]

    # 2. the loss on the full embeddings and its gradient with respect to them
    leaves = [t.detach().requires_grad_() for e in embedded for t in e]
    loss = loss_fn(*leaves)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got "
                         f"{getattr(loss, 'shape', type(loss).__name__)}")
    loss.backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    del embedded, leaves

    # 3. replay each chunk with a graph and back-propagate its slice of the cached gradient;
    #    a DDP module synchronises only in the backward of the last chunk that uses it
    last_use = {}
    for i, encoder in enumerate(encoders):
        if _is_ddp(encoder):
            last_use[id(encoder)] = (i, len(chunks[i]) - 1)
    offset = 0
    for i, (encoder, parts) in enumerate(zip(encoders, chunks)):
        cached = grads[offset:offset + widths[i]]
        offset += widths[i]
        start = 0
        for c, part in enumerate(parts):
            state, devices = states[i][c]
            sync = not _is_ddp(encoder) or last_use[id(encoder)] == (i, c)
            with contextlib.ExitStack() as stack:
                if not sync:
                    stack.enter_context(encoder.no_sync())
                if state is not None:
                    stack.enter_context(_replayed_rng(state, devices))
                out = _tensors(encoder(part))
                n = out[0].shape[0]
                pairs = [(t, g[start:start + n]) for t, g in zip(out, cached) if t.requires_grad]
                if pairs:
                    torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            start += n
    _average_grads(loss_parameters, group)
    return loss.detach()


def _average_grads(parameters, group):
    import torch.distributed as dist

    parameters = [p for p in parameters if p.grad is not None]
    if not parameters or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat, group=group)
    flat /= world
    start = 0
    for p in parameters:
        p.grad.copy_(flat[start:start + p.grad.numel()].view_as(p.grad))
        start += p.grad.numel()
