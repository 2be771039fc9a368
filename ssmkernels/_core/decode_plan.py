"""Helpers of the decode ops' eager fast paths (state update, conv update): plans per kind of call,
and whether a call has the same tensor metadata as the call a plan was made for, checked in C++.

A decode step calls every layer with the same kinds of tensors, so each op keeps the plan of its
last call and matches the next call against it without building a Python key: dynamo's
``TensorGuards`` compares dispatch keys, dtype, device, requires_grad, sizes and strides of all the
call's tensors in one C++ call.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor

# Tensor types a plan is made for: Parameter disables __torch_function__, so it is a plain Tensor here.
PLAIN_TYPES = (Tensor, torch.nn.Parameter)
MAX_PLANS = 4096  # entries per plan cache; past this a cache starts over (shapes that never repeat)


class PlanKind:
    """The kind of call a plan serves: its key (flags + the tensors' signature) and, to match a call
    without building its key, the flags, which optional tensors are absent and a metadata guard over
    the present ones. ``tensors`` lists the call's tensors (None for an absent optional one; at
    least two are always present); ``absent`` tells for each optional one whether it is None, built
    by the op from its arguments (a tuple display: ~0.1 us, against ~0.3 us for a generic loop on
    the decode step's path); ``signature(*tensors)`` makes the key's tensor part."""
    __slots__ = ("key", "flags", "absent", "present", "guard", "signature")

    def __init__(self, key: tuple, flags: tuple, absent: tuple, tensors: tuple, signature):
        self.key, self.flags, self.absent, self.signature = key, flags, absent, signature
        present = [i for i, t in enumerate(tensors) if t is not None]
        if len(present) < 2:  # itemgetter of a single index returns a bare tensor, not a tuple
            raise ValueError("a plan's call has at least two present tensors")
        self.present = operator.itemgetter(*present)
        self.guard = metadata_guard(self.present(tensors))

    def matches(self, flags: tuple, absent: tuple, tensors: tuple) -> bool:
        if self.guard is None:
            return self.key == (*flags, self.signature(*tensors))
        return flags == self.flags and absent == self.absent and self.guard(*self.present(tensors))


def metadata_guard(tensors: tuple):
    """``check(*tensors) -> bool``: whether tensors have the dispatch keys (device type, autograd,
    subclass), dtype, device index, requires_grad, sizes and strides of ``tensors``, checked in C++
    by dynamo's ``TensorGuards`` (~0.9 us for a decode step's nine tensors on the CPU development
    machine, against ~3.1 us to build ``_signature`` in Python). None when this torch has no such
    class or it does not reject what ``guard_rejects_changes`` changes (then plans match by key)."""
    if not guard_rejects_changes():
        return None
    try:
        return tensor_guards(tensors).check
    except Exception:  # a tensor kind the guard cannot describe: match by key
        return None


def tensor_guards(tensors: tuple):
    from torch._C._dynamo.guards import TensorGuards  # private: see guard_rejects_changes

    return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors])


@functools.cache
def guard_rejects_changes() -> bool:
    """Whether this torch's TensorGuards accepts the tensors it was made from and rejects a change of
    each property a plan depends on (a private class: checked once, not assumed)."""
    try:
        base = torch.zeros(2, 3)
        check = tensor_guards((base,)).check
        changed = (torch.zeros(3, 2), torch.zeros(2, 3).t().contiguous().t(), torch.zeros(2, 3, dtype=torch.float64),
                   torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3).as_subclass(GuardProbe),
                   torch.zeros(2, 3, device="meta"), torch.zeros(2)[:, None].expand(2, 3), None, 0)
        return check(base) and check(torch.zeros(2, 3)) and not any(check(t) for t in changed)
    except Exception:
        return False


class GuardProbe(Tensor):
    """A tensor subclass, for guard_rejects_changes."""
