"""The run directory: one run per `out_dir`, resumed only by itself, with a metrics log that holds each step once.

    out_dir/.lock                   PID and host of the run using the directory (a dead holder's lock is taken over)
    out_dir/config.yaml             the resolved config of the run
    out_dir/metrics.jsonl           one record per step (and per evaluation); trimmed to the resumed step on resume
    out_dir/checkpoints/, export/   rmcore/training/checkpoints.py
    out_dir/replaced-<time>/        an earlier run's files, moved aside by run.resume=never
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from rmcore.errors import CheckpointError, RunDirError
from rmcore.training.checkpoints import Checkpointer, check_identity, read_trainer_json, run_identity
from rmcore.training.distributed import Dist, broadcast_object


class RunLock:
    """`with RunLock(out_dir, dist):` one run at a time per directory. Rank 0 creates out_dir/.lock atomically; a lock
    whose holder is a dead process on this host is taken over (said out loud); a live holder is an error naming it."""

    def __init__(self, out_dir: str | Path, dist: Dist):
        self.path, self.dist, self.held = Path(out_dir) / ".lock", dist, False

    def __enter__(self):
        error = None
        if self.dist.is_main:
            try:
                self._acquire()
            except RunDirError as e:
                error = str(e)
        error = broadcast_object(error)
        if error:
            raise RunDirError(error)
        return self

    def _acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._dead(holder):
                    raise RunDirError(
                        f"{self.path.parent} is in use by another run (PID {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since')}); wait for it, or choose another "
                        f"run.out_dir. If that process is gone, delete {self.path}.") from None
                print(f"taking over {self.path}: its holder ({holder or 'unreadable lock'}) is no longer running",
                      flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirError(f"could not take {self.path}: another run took it at the same moment")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _dead(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: its liveness cannot be checked from here
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False


def prepare_run_dir(cfg, dist: Dist) -> None:
    """Before the run writes anything: with resume=auto (or a path), the checkpoint to resume must be this run's;
    with resume=never, an earlier run's files are moved aside to out_dir/replaced-<time>/ and that is printed."""
    out = Path(cfg.run.out_dir)
    ckpt = Checkpointer(out, dist)
    error = None
    if dist.is_main:
        if cfg.run.resume == "never":
            old = [p for p in (out / "checkpoints", out / "metrics.jsonl", out / "export", out / "config.yaml")
                   if p.exists()]
            if old:
                aside = out / time.strftime("replaced-%Y%m%d-%H%M%S")
                aside.mkdir(parents=True)
                for p in old:
                    shutil.move(str(p), aside / p.name)
                print(f"run.resume=never: the earlier run's {', '.join(p.name for p in old)} moved to {aside}",
                      flush=True)
        else:
            candidates = ckpt.candidates(cfg.run.resume)
            if candidates:
                try:
                    check_identity(candidates[-1], read_trainer_json(candidates[-1]).get("identity"),
                                   run_identity(cfg, dist.world_size))
                except CheckpointError:
                    pass  # unreadable: the Trainer reports it and falls back
                except RunDirError as e:
                    error = str(e)
    error = broadcast_object(error)
    if error:
        raise RunDirError(error)


def trim_metrics(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` (where a resumed run picks up); return how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(x + "\n" for x in kept))
    return len(lines) - len(kept)
