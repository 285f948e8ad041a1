"""Run `-m MODULE ARGS` or `-c CODE`; write its peak RSS (VmHWM, kB) to $PEAK_RSS_FILE.

``ru_maxrss`` of a child started by fork/exec also counts the parent's memory before the exec, so
the peak is read from /proc/self/status after the exec instead.
"""

import atexit
import os
import runpy
import sys


def _write_peak() -> None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(os.environ["PEAK_RSS_FILE"], "w") as out:
                    out.write(line.split()[1])  # kB


atexit.register(_write_peak)
mode, target, *rest = sys.argv[1:]
if mode == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<benchmark>", "exec"), {"__name__": "__main__"})
