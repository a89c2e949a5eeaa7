"""What commands read from disk that describes itself (a cache's attributes, model.json): parsed, and
checked against a declared schema of types, ranges and list lengths, so that anything else is one error
line naming the file and the field instead of a traceback deep inside the code that trusted it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pipeline.runtime.errors import InputError, quote


@dataclass(frozen=True)
class Field:
    """The form of one value: its type, bounds (numbers), choices, and for lists their length and items."""
    kind: type | tuple[type, ...]
    min: float | None = None          # inclusive
    above: float | None = None        # exclusive
    max: float | None = None
    choices: tuple = ()
    length: int | None = None         # a list of exactly this many
    items: "Field | None" = None      # the form of each item of a list, or of each value of a dict

    def problem(self, value) -> str | None:
        """What is wrong with `value`, in words, or None."""
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            return f"must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {quote(value)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or (self.min is not None and value < self.min) or \
                    (self.above is not None and value <= self.above) or (self.max is not None and value > self.max):
                return f"is out of range, got {quote(value)}"
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                return f"must list {self.length} values, got {len(value)}"
            return next((f"item {i} {why}" for i, item in enumerate(value)
                         if self.items and (why := self.items.problem(item))), None)
        if isinstance(value, dict) and self.items:
            return next((f"entry {quote(k)} {why}" for k, v in value.items() if (why := self.items.problem(v))),
                        None)
        return None


def checked(data, schema: dict[str, Field], where: str) -> dict:
    """`data` if it is an object holding every field of `schema` in its form; else an InputError naming
    `where` (the file, and the attribute or key within it) and the first field that is not."""
    if not isinstance(data, dict):
        raise InputError(f"{where} must be an object, got {type(data).__name__}")
    for key, field in schema.items():
        if key not in data:
            raise InputError(f"{where} lacks '{key}'")
        why = field.problem(data[key])
        if why:
            raise InputError(f"{where}: '{key}' {why}")
    return data


def parsed(text, field: Field, where: str):
    """The JSON value in `text` (str or bytes) if it has the form `field`; else an InputError naming `where`."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where} is not valid JSON: {str(exc)[:120]}") from None
    why = field.problem(value)
    if why:
        raise InputError(f"{where} {why}")
    return value


SAFETENSORS_HEADER_LIMIT = 100 << 20   # bytes of a .safetensors header (the format's own reader caps it so)


def check_safetensors(path) -> None:
    """Refuse (one InputError naming `path`) a .safetensors file whose layout is not the format's: an
    8-byte little-endian header length, a JSON object of tensors {dtype, shape, data_offsets} whose
    offsets lie within the file. Read without blocking and without loading any tensor."""
    from pipeline.runtime.files import open_regular
    where = f"weights file {path}"
    try:
        with open(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(SAFETENSORS_HEADER_LIMIT, size - 8):
                raise InputError(f"{where} is not a safetensors file: {size} bytes, header length "
                                f"{length if length >= 0 else 'missing'}")
            header = f.read(length)
    except OSError as exc:
        raise InputError(f"cannot read {where}: {exc.strerror or exc}") from None
    tensors = parsed(header, Field(dict, items=Field(dict)), f"{where}: the header")
    tensors.pop("__metadata__", None)
    for name, tensor in tensors.items():
        checked(tensor, TENSOR, f"{where}: tensor {quote(name)}")
        start, end = tensor["data_offsets"]
        if not start <= end <= size - 8 - length:
            raise InputError(f"{where} is truncated: tensor {quote(name)} ends at byte {end} of "
                            f"{size - 8 - length}")


TENSOR = {"dtype": Field(str), "shape": Field(list, items=Field(int, min=0)),
          "data_offsets": Field(list, length=2, items=Field(int, min=0))}


JSON_LIMIT = 64 << 20   # bytes of a JSON file a command reads (model.json, metrics.json, summary.json)


def read_json(path, field: Field, what: str = ""):
    """The JSON value in the file `path`, read without blocking and only if it is a regular file of at most
    JSON_LIMIT bytes, with the form `field`; else an InputError naming `path` (and `what` it is)."""
    from pipeline.runtime.files import read_regular
    where = f"{what} {path}".strip()
    try:
        text = read_regular(path, JSON_LIMIT)
    except OSError as exc:
        raise InputError(f"cannot read {where}: {exc.strerror or exc}") from None
    return parsed(text, field, where)
