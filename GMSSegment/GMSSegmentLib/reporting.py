"""Progress and messages of the command line: a tqdm bar for people, JSON lines for the Slicer worker protocol
(one object per stdout line: start, progress, log, result, error, done)."""
from __future__ import annotations

import json
import sys
import time


class Reporter:
    def __init__(self, mode: str = "bar"):
        self.mode = mode  # "bar", "json" or "none"
        self._bar = None
        self._last = 0.0

    def emit(self, event: str, **fields):
        if self.mode == "json":
            sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
            sys.stdout.flush()

    def log(self, message: str, **fields):
        if self.mode == "json":
            self.emit("log", message=message, **fields)
        elif self.mode == "bar":
            print(message, file=sys.stderr, flush=True)

    def start(self, total: int, desc: str = "", **fields):
        self.emit("start", total=total, **fields)
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, leave=True)

    def progress(self, done: int, total: int, **fields):
        if self.mode == "json":
            now = time.monotonic()
            if done in (0, total) or now - self._last > 0.2:  # at most 5 lines a second
                self._last = now
                self.emit("progress", done=done, total=total, **fields)
        elif self._bar is not None:
            self._bar.update(done - self._bar.n)

    def close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def error(self, message: str, **fields):
        self.close_bar()
        if self.mode == "json":
            self.emit("error", message=message, **fields)
        print(f"gms: error: {message}", file=sys.stderr, flush=True)

    def download_progress(self, what: str):
        """A callback for weight downloads."""
        if self.mode != "json":
            return None

        def cb(done, total):
            self.emit("download", what=what, done=done, total=total)
        return cb
