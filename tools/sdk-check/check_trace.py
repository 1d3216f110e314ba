#!/usr/bin/env python3
"""Checks every event walkie sent (the "out" lines of a `walkie run --trace` file) against
the official OpenAI Python SDK's Realtime GA models (`openai.types.realtime`).

The SDK models accept unknown keys silently (the real server does not), so besides
validating, the parsed model is walked for `model_extra` and the re-serialised model is
compared key by key with what walkie sent.

usage: check_trace.py TRACE.jsonl
prints one line per problem, then `checked N events: TYPE,TYPE,...`; exit 1 on any problem.
"""
import json
import sys

from pydantic import BaseModel, TypeAdapter

from openai.types.realtime import RealtimeClientEvent

ADAPTER = TypeAdapter(RealtimeClientEvent)


def extras(value, path):
    """Paths of keys a model did not define."""
    found = []
    if isinstance(value, BaseModel):
        for key in (value.model_extra or {}):
            found.append(f"{path}.{key}")
        for name in type(value).model_fields:
            found.extend(extras(getattr(value, name), f"{path}.{name}"))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found.extend(extras(item, f"{path}[{i}]"))
    elif isinstance(value, dict):
        for k, item in value.items():
            found.extend(extras(item, f"{path}.{k}"))
    return found


def dropped(sent, parsed, path):
    """Keys walkie sent that did not survive a round trip through the model."""
    found = []
    if isinstance(sent, dict):
        if not isinstance(parsed, dict):
            return [path]
        for k, v in sent.items():
            if k not in parsed:
                found.append(f"{path}.{k}")
            else:
                found.extend(dropped(v, parsed[k], f"{path}.{k}"))
    elif isinstance(sent, list) and isinstance(parsed, list):
        for i, (a, b) in enumerate(zip(sent, parsed)):
            found.extend(dropped(a, b, f"{path}[{i}]"))
    return found


def main():
    problems = []
    kinds = []
    count = 0
    with open(sys.argv[1], encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            record = json.loads(line)
            if record.get("dir") != "out":
                continue
            event = record["event"]
            count += 1
            kind = event.get("type")
            if kind not in kinds:
                kinds.append(kind)
            where = f"line {lineno} ({kind})"
            try:
                model = ADAPTER.validate_python(event)
            except Exception as e:  # pydantic.ValidationError, with every field named
                problems.append(f"{where}: invalid: {e}")
                continue
            for p in extras(model, "event"):
                problems.append(f"{where}: key not in the SDK model: {p}")
            back = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
            for p in dropped(event, back, "event"):
                problems.append(f"{where}: key lost in the SDK model: {p}")
            if kind == "session.update" and getattr(model.session, "type", None) != "realtime":
                problems.append(f"{where}: session is not a realtime session")
    for p in problems:
        print(p)
    print(f"checked {count} events: {','.join(kinds)}")
    return 1 if problems or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
