"""Nested training state (dicts, lists, tensors, numbers, text) as one safetensors file, with no pickle: the
tensors are its tensors, named by their place in the state ("optimizer.state.0.momentum_buffer"), and
everything else is JSON in its header, where each tensor stands as {"$tensor": name}. A dict whose keys are
not all text (an optimizer's state, keyed by parameter index) stands as {"$items": [[key, value], ...]}.
Reading one runs nothing it holds."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TENSOR, ITEMS = "$tensor", "$items"
HEADER = "state"   # the metadata entry that holds the JSON


def _split(value, name: str, tensors: dict):
    """`value` as JSON, its tensors moved to `tensors`."""
    def inner(key) -> str:
        return f"{name}.{key}" if name else str(key)
    if isinstance(value, torch.Tensor):
        if name in tensors:   # keys with dots can spell another place's name: {"a.b": x} and {"a": {"b": y}}
            raise ValueError(f"two tensors of the state would both be named {name!r}")
        tensors[name] = value.detach().to("cpu").contiguous()
        return {TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _split(v, inner(k), tensors) for k, v in value.items()}
        return {ITEMS: [[k, _split(v, inner(k), tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(v, inner(i), tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{name}: a {type(value).__name__} cannot be kept in a state file")


def _joined(tree, tensors: dict):
    """The state `_split` gave `tree` and `tensors` of."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            return tensors[tree[TENSOR]]
        if set(tree) == {ITEMS}:
            return {k: _joined(v, tensors) for k, v in tree[ITEMS]}
        return {k: _joined(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_joined(v, tensors) for v in tree]
    return tree


def save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file
    tensors: dict = {}
    tree = _split(state, "", tensors)
    save_file(_unshared(tensors), str(path), metadata={HEADER: json.dumps(tree)})


def _unshared(tensors: dict) -> dict:
    """Each tensor in memory of its own (safetensors refuses tensors that share it, e.g. a state dict held
    twice): a tensor whose memory an earlier one holds is copied."""
    seen, out = set(), {}
    for name, t in tensors.items():
        memory = t.untyped_storage().data_ptr()
        out[name] = t.clone() if memory and memory in seen else t
        seen.add(memory)
    return out


def load(path: Path) -> dict:
    """The state `save` wrote; ValueError (or safetensors' own error) for a file that is not one."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if HEADER not in metadata:
            raise ValueError(f"no '{HEADER}' entry in its header")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return _joined(json.loads(metadata[HEADER]), tensors)   # damage is a ValueError, one line at the callers
