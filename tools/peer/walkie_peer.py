#!/usr/bin/env python3
"""walkie_peer: walkie's job done the usual Python way, for rt-bench to compare against.

One asyncio event loop with the `websockets` client owns the Realtime link, the button,
the control socket and the agents; two threads move audio through ALSA (pyalsaaudio),
because blocking device IO cannot run on the loop. This is how a competent Python
developer writes a push-to-talk Realtime client (it follows the shape of OpenAI's own
Python examples): audio chunks cross into the loop with `call_soon_threadsafe`, are
base64'd into `input_audio_buffer.append` events and sent; deltas are decoded and queued
for the playback thread; tool calls spawn the agent with `asyncio.create_subprocess_exec`
and answer with `function_call_output`; a task per agent drains its stream-json output,
keeps its state and appends it to the task's log file.

What it does: the same wire protocol as walkie (GA events, server VAD off, the same tools
`start_task` and `list_tasks`), pre-roll of the last `preroll_ms` before a press, barge-in
(flush the speaker, `response.cancel`, `conversation.item.truncate` with what was heard),
one `response.create` after the outputs of a response, the button as a FIFO of
`struct input_event` records, walkie's control socket commands the bench uses (`status`,
`tasks`, `start`, `cancel`, `press`, `release`), SIGTERM stopping every agent
(SIGINT to its group, SIGTERM, SIGKILL after a grace time). What it does not do: the
conversation policy around announcements, session rotation, echo filtering of the
pre-roll, cgroups or descendant sweeps, redaction, a state file — none of which the
benchmark exercises. See tools/peer/README.md.

Clockless devices (ALSA `file`/`null` plugin PCMs) accept and deliver frames as fast as
asked; like walkie, the peer then holds playback to real time itself (`clockless: true`).
Capture needs no help in the bench: its microphone is a FIFO written in real time.

`--probe FILE` records the same instants as walkie's `probe` build (see rt-bench): each
line `KIND T_NS A B`, with T_NS on CLOCK_MONOTONIC.
"""

import argparse
import asyncio
import base64
import collections
import json
import os
import queue
import selectors
import signal
import ssl
import struct
import sys
import threading
import time

import alsaaudio
import websockets

RATE = 24_000
EV_KEY = 1
INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit Linux: 24 bytes

TOOLS = [
    {
        "type": "function",
        "name": "start_task",
        "description": "Start a coding agent in the background on a new task.",
        "parameters": {
            "type": "object",
            "properties": {
                "prompt": {"type": "string"},
                "name": {"type": "string"},
            },
            "required": ["prompt"],
        },
    },
    {
        "type": "function",
        "name": "list_tasks",
        "description": "List running and recently finished tasks.",
        "parameters": {"type": "object", "properties": {}},
    },
]


class Probe:
    """The instants rt-bench compares (kept in memory, written at exit)."""

    def __init__(self, path):
        self.path = path
        self.lines = []

    def __call__(self, kind, a=0, b=0):
        if self.path:
            # list.append is atomic under the GIL: the audio threads record too.
            self.lines.append((kind, time.monotonic_ns(), a, b))

    def write(self):
        if not self.path:
            return
        with open(self.path, "w") as f:
            for kind, t, a, b in self.lines:
                f.write(f"{kind} {t} {a} {b}\n")


class TimedSelector(selectors.EpollSelector):
    """Records how long the loop was busy between two waits (rt-bench's loop stall)."""

    def __init__(self, probe):
        super().__init__()
        self.probe = probe
        self.returned = None
        self.returned_cpu = 0

    def select(self, timeout=None):
        now = time.monotonic_ns()
        if self.returned is not None:
            # And how much of it the loop's thread was on a CPU.
            cpu = time.thread_time_ns() - self.returned_cpu
            self.probe("iter", now - self.returned, cpu)
        ready = super().select(timeout)
        self.returned = time.monotonic_ns()
        self.returned_cpu = time.thread_time_ns()
        return ready


class Capture(threading.Thread):
    """Reads the microphone one period at a time and hands each chunk to the loop."""

    def __init__(self, device, period, loop, on_chunk, probe):
        super().__init__(name="peer-capture", daemon=True)
        self.pcm = alsaaudio.PCM(
            alsaaudio.PCM_CAPTURE,
            alsaaudio.PCM_NORMAL,
            device=device,
            channels=1,
            rate=RATE,
            format=alsaaudio.PCM_FORMAT_S16_LE,
            periodsize=period,
            periods=4,
        )
        self.loop = loop
        self.on_chunk = on_chunk
        self.probe = probe
        self.frames = 0

    def run(self):
        while True:
            n, data = self.pcm.read()
            if n <= 0:
                continue
            self.frames += n
            self.probe("cap", self.frames)
            self.loop.call_soon_threadsafe(self.on_chunk, data)


class Playback(threading.Thread):
    """Plays queued speech; a flush (barge-in) drops what is queued and what the device
    holds. Counts the frames played so the truncation can say what was heard."""

    def __init__(self, device, period, clockless, probe):
        super().__init__(name="peer-playback", daemon=True)
        self.pcm = alsaaudio.PCM(
            alsaaudio.PCM_PLAYBACK,
            alsaaudio.PCM_NORMAL,
            device=device,
            channels=1,
            rate=RATE,
            format=alsaaudio.PCM_FORMAT_S16_LE,
            periodsize=period,
            periods=4,
        )
        self.period_bytes = period * 2
        self.clockless = clockless
        self.probe = probe
        self.queue = queue.Queue()
        self.lock = threading.Lock()
        self.epoch = 0
        self.queued = 0  # frames handed to play(), ever
        self.consumed = 0  # frames written or dropped, ever
        self.played_item = 0  # frames of the current item written

    def play(self, pcm_bytes):
        with self.lock:
            self.queued += len(pcm_bytes) // 2
            self.queue.put((self.epoch, pcm_bytes))

    def flush(self):
        with self.lock:
            self.epoch += 1
            self.consumed = self.queued
            while True:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
            self.queue.put((self.epoch, None))

    def playing(self):
        with self.lock:
            return self.consumed < self.queued

    def run(self):
        pending = b""
        due = None  # clockless devices: when the next period may be written
        epoch = 0
        while True:
            if not pending:
                item_epoch, chunk = self.queue.get()
                if item_epoch != self.epoch:
                    continue
                if chunk is None:
                    # The flush: drop what the device holds too.
                    self.pcm.drop()
                    self.probe("flush", item_epoch)
                    epoch = item_epoch
                    due = None
                    continue
                pending = chunk
            if epoch != self.epoch:
                pending = b""
                continue
            period, pending = pending[: self.period_bytes], pending[self.period_bytes :]
            if self.clockless:
                now = time.monotonic()
                if due is None or due < now:
                    due = now
                if due - now > 0.04:  # keep ~4 periods queued, like a sound card
                    time.sleep(due - now - 0.04)
                due += len(period) / 2 / RATE
            self.pcm.write(period)
            with self.lock:
                if epoch == self.epoch:
                    self.consumed += len(period) // 2
                    consumed = self.consumed
                else:
                    consumed = None
            if consumed is not None:
                self.probe("dev", consumed, len(period) // 2)


class Task:
    def __init__(self, name, prompt, proc, log):
        self.name = name
        self.prompt = prompt
        self.proc = proc
        self.log = log
        self.state = "running"
        self.activity = "starting"
        self.summary = None
        self.started = time.time()


class Peer:
    def __init__(self, cfg, probe):
        self.cfg = cfg
        self.probe = probe
        self.loop = asyncio.get_running_loop()
        self.ws = None
        self.link = "connecting"
        self.tasks = {}
        self.preroll = collections.deque(maxlen=max(1, cfg["preroll_ms"] // cfg["period_ms"]))
        self.streaming = False
        self.sent_ms = 0
        self.active_response = None
        self.playing_item = None
        self.item_frames_at_start = 0
        self.pending_outputs = False
        self.outgoing = asyncio.Queue()
        self.stopping = asyncio.Event()
        period = RATE * cfg["period_ms"] // 1000
        self.playback = Playback(cfg["playback_device"], period, cfg["clockless"], probe)
        self.capture = Capture(cfg["capture_device"], period, self.loop, self.on_chunk, probe)
        self.started = time.monotonic()

    # --- the link -------------------------------------------------------------------
    async def run_link(self):
        ctx = ssl.create_default_context(cafile=self.cfg.get("ca_file") or None)
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                async with websockets.connect(
                    self.cfg["url"],
                    ssl=ctx if self.cfg["url"].startswith("wss:") else None,
                    additional_headers={"Authorization": "Bearer " + self.cfg.get("api_key", "x")},
                    max_size=None,
                    ping_interval=15,
                ) as ws:
                    self.ws = ws
                    backoff = 0.5
                    await self.session(ws)
            except (OSError, websockets.WebSocketException) as e:
                print(f"peer: link: {e}", file=sys.stderr)
            self.ws = None
            self.link = "backoff"
            try:
                await asyncio.wait_for(self.stopping.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, 30)

    async def session(self, ws):
        sender = asyncio.create_task(self.send_loop(ws))
        try:
            async for message in ws:
                event = json.loads(message)
                await self.on_event(event)
        finally:
            sender.cancel()

    async def send_loop(self, ws):
        while True:
            event = await self.outgoing.get()
            await ws.send(json.dumps(event))

    def send(self, event):
        self.outgoing.put_nowait(event)

    async def on_event(self, event):
        kind = event.get("type")
        if kind == "session.created":
            self.link = "connected"
            self.send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "instructions": "You front coding agents for a person.",
                        "output_modalities": ["audio"],
                        "audio": {
                            "input": {
                                "format": {"type": "audio/pcm", "rate": RATE},
                                "turn_detection": None,
                            },
                            "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "marin"},
                        },
                        "tools": TOOLS,
                        "tool_choice": "auto",
                    },
                }
            )
        elif kind == "response.created":
            self.active_response = event["response"]["id"]
        elif kind == "response.output_audio.delta":
            if event.get("item_id") != self.playing_item:
                self.playing_item = event.get("item_id")
                self.item_frames_at_start = self.playback.consumed
            pcm = base64.b64decode(event["delta"])
            self.playback.play(pcm)
            self.probe("ring", self.playback.queued)
        elif kind == "response.function_call_arguments.done":
            output = await self.call_tool(event["name"], event.get("arguments") or "{}")
            self.send(
                {
                    "type": "conversation.item.create",
                    "item": {"type": "function_call_output", "call_id": event["call_id"], "output": json.dumps(output)},
                }
            )
            self.pending_outputs = True
        elif kind == "response.done":
            self.active_response = None
            if self.pending_outputs:
                self.pending_outputs = False
                self.send({"type": "response.create"})
        elif kind == "error":
            print(f"peer: server error: {event.get('error')}", file=sys.stderr)

    # --- audio ----------------------------------------------------------------------
    def on_chunk(self, data):
        self.preroll.append(data)
        if self.streaming:
            self.append(data)

    def append(self, data):
        self.sent_ms += len(data) * 1000 // (2 * RATE)
        self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()})

    def press(self):
        if self.streaming:
            return
        if self.playback.playing():
            heard_ms = (self.playback.consumed - self.item_frames_at_start) * 1000 // RATE
            self.playback.flush()
            if self.active_response:
                self.send({"type": "response.cancel"})
            if self.playing_item:
                self.send(
                    {
                        "type": "conversation.item.truncate",
                        "item_id": self.playing_item,
                        "content_index": 0,
                        "audio_end_ms": max(0, heard_ms),
                    }
                )
        self.send({"type": "input_audio_buffer.clear"})
        self.streaming = True
        self.sent_ms = 0
        for chunk in list(self.preroll):
            self.append(chunk)

    def release(self):
        if not self.streaming:
            return
        self.streaming = False
        if self.sent_ms >= 100:
            self.send({"type": "input_audio_buffer.commit"})
            self.send({"type": "response.create"})
        else:
            self.send({"type": "input_audio_buffer.clear"})

    def on_button(self, fd):
        try:
            data = os.read(fd, INPUT_EVENT.size * 64)
        except BlockingIOError:
            return
        if not data:
            # The writer closed the FIFO: reopen it so the next writer is heard.
            self.loop.remove_reader(fd)
            os.close(fd)
            self.open_button()
            return
        for off in range(0, len(data) - INPUT_EVENT.size + 1, INPUT_EVENT.size):
            _, _, etype, code, value = INPUT_EVENT.unpack_from(data, off)
            if etype == EV_KEY and code == self.cfg["button_code"]:
                if value == 1:
                    self.press()
                elif value == 0:
                    self.release()

    def open_button(self):
        path = self.cfg.get("button")
        if path:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            self.loop.add_reader(fd, self.on_button, fd)

    # --- tasks ----------------------------------------------------------------------
    async def start_task(self, prompt, name=None):
        name = name or "-".join(prompt.split()[:3]).lower() or "task"
        base, n = name, 2
        while name in self.tasks:
            name, n = f"{base}-{n}", n + 1
        if sum(t.state == "running" for t in self.tasks.values()) >= self.cfg["max_running"]:
            return None
        cwd = os.path.join(self.cfg["state_dir"], "scratch", name)
        os.makedirs(cwd, exist_ok=True)
        logdir = os.path.join(self.cfg["state_dir"], "tasks", name)
        os.makedirs(logdir, exist_ok=True)
        log = open(os.path.join(logdir, "output.jsonl"), "ab")
        cmd = [a.replace("{prompt}", prompt) for a in self.cfg["agent_command"]]
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        env["WALKIE_TASK"] = name
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        task = Task(name, prompt, proc, log)
        self.tasks[name] = task
        asyncio.create_task(self.drain(task))
        return name

    async def drain(self, task):
        async def stderr():
            async for line in task.proc.stderr:
                task.log.write(b"stderr: " + line)

        err = asyncio.create_task(stderr())
        async for line in task.proc.stdout:
            task.log.write(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("type") == "assistant":
                for part in event.get("message", {}).get("content", []):
                    if part.get("type") == "tool_use":
                        task.activity = f"using {part.get('name')}"
                    elif part.get("type") == "text":
                        task.activity = "writing"
            elif event.get("type") == "result":
                task.summary = (event.get("result") or "")[:400]
        await err
        code = await task.proc.wait()
        task.log.close()
        if task.state == "running":
            task.state = "succeeded" if code == 0 else "failed"

    async def call_tool(self, name, arguments):
        try:
            args = json.loads(arguments)
        except ValueError as e:
            return {"status": "rejected", "reason": f"arguments are not valid JSON: {e}"}
        if name == "start_task":
            if not args.get("prompt"):
                return {"status": "rejected", "reason": 'missing "prompt"'}
            task = await self.start_task(args["prompt"], args.get("name"))
            if task is None:
                return {"status": "rejected", "reason": "too many tasks running"}
            return {"status": "started", "task": task}
        if name == "list_tasks":
            return {"tasks": [{"name": t.name, "state": t.state, "activity": t.activity} for t in self.tasks.values()]}
        return {"status": "rejected", "reason": f'unknown tool "{name}"'}

    async def stop_tasks(self):
        running = [t for t in self.tasks.values() if t.proc.returncode is None]
        for t in running:
            t.state = "interrupted"
            try:
                os.killpg(t.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        grace = self.cfg["cancel_grace_ms"] / 1000
        for sig in (signal.SIGTERM, signal.SIGKILL):
            waits = [t.proc.wait() for t in running if t.proc.returncode is None]
            if not waits:
                return
            done, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=grace)
            for t in running:
                if t.proc.returncode is None:
                    try:
                        os.killpg(t.proc.pid, sig)
                    except ProcessLookupError:
                        pass
            grace = 1

    # --- the control socket ---------------------------------------------------------
    async def on_client(self, reader, writer):
        try:
            async for line in reader:
                try:
                    req = json.loads(line)
                    reply = await self.on_request(req)
                except ValueError as e:
                    reply = {"ok": False, "error": f"not JSON: {e}"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        finally:
            writer.close()

    async def on_request(self, req):
        cmd = req.get("cmd")
        if cmd == "status":
            running = sum(t.state == "running" for t in self.tasks.values())
            return {
                "ok": True,
                "status": {
                    "link": self.link if self.ws else "connecting",
                    "tasks": {"running": running, "finished": len(self.tasks) - running},
                    "uptime_s": int(time.monotonic() - self.started),
                    "pid": os.getpid(),
                    "conversation": {"playing": self.playback.playing(), "session_ready": self.ws is not None},
                },
            }
        if cmd == "tasks":
            return {"ok": True, "tasks": [{"name": t.name, "state": t.state, "pid": t.proc.pid} for t in self.tasks.values()]}
        if cmd == "start":
            name = await self.start_task(req.get("prompt", ""), req.get("name"))
            return {"ok": True, "task": name} if name else {"ok": False, "error": "too many tasks running"}
        if cmd == "cancel":
            t = self.tasks.get(req.get("name"))
            if not t:
                return {"ok": False, "error": "no such task"}
            t.state = "cancelled"
            os.killpg(t.proc.pid, signal.SIGTERM)
            return {"ok": True, "task": t.name}
        if cmd == "press":
            self.press()
            return {"ok": True}
        if cmd == "release":
            self.release()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def run(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self.playback.start()
        self.capture.start()
        self.open_button()
        sock = self.cfg["control"]
        os.makedirs(os.path.dirname(sock), exist_ok=True)
        if os.path.exists(sock):
            os.unlink(sock)
        server = await asyncio.start_unix_server(self.on_client, path=sock)
        os.chmod(sock, 0o600)
        link = asyncio.create_task(self.run_link())
        await self.stopping.wait()
        server.close()
        await self.stop_tasks()
        link.cancel()
        if self.ws is not None:
            await self.ws.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON configuration (see README.md)")
    parser.add_argument("--probe", help="record rt-bench's instants to this file")
    args = parser.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    cfg.setdefault("period_ms", 10)
    cfg.setdefault("preroll_ms", 300)
    cfg.setdefault("button_code", 183)  # KEY_F13
    cfg.setdefault("max_running", 64)
    cfg.setdefault("cancel_grace_ms", 3000)
    cfg.setdefault("clockless", False)
    probe = Probe(args.probe)
    loop = asyncio.SelectorEventLoop(TimedSelector(probe) if args.probe else selectors.EpollSelector())
    asyncio.set_event_loop(loop)

    async def go():
        await Peer(cfg, probe).run()

    try:
        loop.run_until_complete(go())
    finally:
        probe.write()
    # The audio threads are daemons blocked in ALSA calls: leave without joining them.
    os._exit(0)


if __name__ == "__main__":
    main()
