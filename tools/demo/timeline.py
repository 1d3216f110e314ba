#!/usr/bin/env python3
"""Prints the timeline of a walkie demo run from its trace file (one line per Realtime event,
audio deltas and transcript deltas folded into counts)."""
import json
import sys

def main(path):
    rows = []
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        ev = rec.get("event") or {}
        kind = ev.get("type", "?")
        arrow = "→ server" if rec["dir"] == "out" else "← server"
        if kind in ("response.output_audio_transcript.delta", "response.function_call_arguments.delta"):
            continue
        if kind in ("input_audio_buffer.append", "response.output_audio.delta"):
            if rows and rows[-1][2] == kind and rows[-1][1] == arrow:
                rows[-1][3] += 1
                continue
            rows.append([rec["t_ms"], arrow, kind, 1, ""])
            continue
        detail = ""
        if kind == "conversation.item.create":
            item = ev.get("item", {})
            if item.get("type") == "function_call_output":
                detail = "function_call_output " + item.get("output", "")
            else:
                text = (item.get("content") or [{}])[0].get("text", "")
                detail = f"{item.get('role')}: {' '.join(text.split())[:100]}"
        elif kind == "response.function_call_arguments.done":
            detail = f"{ev.get('name')}({ev.get('arguments', '')[:80]}…)"
        elif kind == "response.output_audio_transcript.done":
            detail = f"\"{ev.get('transcript', '')}\""
        elif kind == "conversation.item.input_audio_transcription.completed":
            detail = f"\"{ev.get('transcript', '')}\""
        elif kind == "response.done":
            detail = (ev.get("response") or {}).get("status", "")
        elif kind in ("conversation.item.added", "conversation.item.done", "response.output_item.added",
                      "response.output_item.done", "response.content_part.added",
                      "response.content_part.done", "response.output_audio.done",
                      "session.updated", "rate_limits.updated"):
            continue
        rows.append([rec["t_ms"], arrow, kind, 1, detail])
    for t, arrow, kind, n, detail in rows:
        count = f" ×{n}" if n > 1 else ""
        print(f"  {t/1000:7.2f}s  {arrow}  {kind}{count}  {detail}".rstrip())

if __name__ == "__main__":
    main(sys.argv[1])
