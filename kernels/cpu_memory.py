"""Memory for the CPU MoE path that the allocator never hands back to the kernel between calls.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping, which the kernel
zero-fills page by page on first touch: at T*K = 16k pairs one [P, 2H] fp32 temporary costs 16k minor page faults,
and a training step made of hundreds of them spends more time in the kernel than in matmuls. Two remedies:

- `workspace`: per-thread scratch buffers for temporaries that die inside one call, grown on demand, never freed.
- `pooled_empty`: outputs that outlive the call (the activation saved for backward, the expert weight gradients)
  come from a pool of exact-size storages; a storage is reused once no tensor but the pool refers to it, i.e.
  after autograd freed the saved activation or the optimizer's `zero_grad(set_to_none=True)` dropped the grad.
  Exact sizes keep every handed-out tensor a whole storage (`torch.save` writes no hidden bytes).
"""

import threading

import torch

_local = threading.local()
_pool_lock = threading.Lock()
_pool: dict[tuple[int, torch.dtype], list[torch.UntypedStorage]] = {}


def workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat scratch tensor of >= `numel` elements, the same storage on every call with the same name and dtype.

    Valid until the next call with the same name on this thread; callers view a prefix (`[:numel].view(...)`).
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        # Grow by 1/4 beyond the request so a slowly growing row count does not reallocate on every call.
        buf = buffers[key] = torch.empty(numel + numel // 4, dtype=dtype)
    return buf[:numel]


def pooled_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype) on CPU, backed by a pooled storage that no live tensor uses."""
    numel = 1
    for s in shape:
        numel *= s
    key = (numel, dtype)
    with _pool_lock:
        storages = _pool.setdefault(key, [])
        for storage in storages:
            if torch._C._storage_Use_Count(storage._cdata) == 1:  # only the pool holds it
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        out = torch.empty(shape, dtype=dtype)
        storages.append(out.untyped_storage())
        return out


def empty_cache() -> None:
    """Release every pooled storage no tensor uses and this thread's workspaces (the next call re-grows them)."""
    with _pool_lock:
        for key, storages in list(_pool.items()):
            kept = [s for s in storages if torch._C._storage_Use_Count(s._cdata) > 1]
            if kept:
                _pool[key] = kept
            else:
                del _pool[key]
    _local.__dict__.pop("buffers", None)


def pooled_bytes() -> int:
    """Bytes held by the pool (in use or free): the memory `empty_cache` can give back at most, plus live outputs."""
    with _pool_lock:
        return sum(s.nbytes() for storages in _pool.values() for s in storages)
