"""Run every benchmark in bench/ in turn (`make bench`); each writes bench/results/<name>.json.

    python bench/run_all.py [NAME ...]     # all, or only the named ones (e.g. scan_cpu sp)
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("run_all", "__init__") and not p.stem.startswith("_"))
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        if not script.is_file():
            print(f"bench: no benchmark named '{name}' ({script} missing)", file=sys.stderr)
            return 2
        print(f"== bench/{name}.py", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(script)])
        print(f"== bench/{name}.py: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("bench: failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
