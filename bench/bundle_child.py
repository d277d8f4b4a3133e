"""One `hsmsign bundle encrypt` run for bench/bench_bundle_encrypt.py, in its own process.

Usage: python -m bench.bundle_child SRC DST KEY_HEX IV_HEX (SRC "-": only report the idle
RSS). Prints {"seconds", "hwm_kib"}: the time of encrypt_bundle alone, imports excluded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hsmsign.capgo.bundle import encrypt_bundle


def main() -> None:
    src, dst, key, iv = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
    t = time.perf_counter()
    if src != "-":
        encrypt_bundle(Path(src), Path(dst), key, bytes.fromhex(iv))
    seconds = time.perf_counter() - t
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    print(json.dumps({"seconds": seconds, "hwm_kib": int(hwm)}))


if __name__ == "__main__":
    main()
