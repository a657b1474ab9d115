"""Shared by the benchmark scripts: emit the one JSON line last and save it for RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """Architecture, cores, CPU model and its widest vector unit: the same training step has taken
    0.28 s on one 2-core VM and 0.53 s on another (AMD EPYC, AVX2), so a record says which ran it."""
    model, isa = "", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
        isa = next((f for f in ("amx_tile", "avx512f", "avx2") if f in flags), "")
    except OSError:
        pass
    return " ".join(x for x in (f"{platform.machine()} {os.cpu_count()} cpu", model, isa) if x)


def emit(name: str, figures: dict, command: str) -> None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent).stdout.strip()
    except OSError:
        commit = ""
    record = {"benchmark": name, "command": command, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine(), **figures}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), flush=True)
