"""GPU check of issue 3 (run on the H100 host from the repository root, bundle env sourced):

    NVFP4LIB_COMMIT=<sha> python3 scripts/gpu/scales_check.py [--quick]

Kernel == CPU reference bit for bit (one group and grouped, static and dynamic, M in {1, 16, 300, 8192}),
graph replay with new data == eager, and the two speed cases (M=8192 and M=16 at K=7168) plus grouped
timings. Writes $OUT/scales_h100.json (copy it to data/bench/) and prints a table last.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nvfp4lib.bench.scales import main  # noqa: E402

if __name__ == "__main__":
    out = os.path.join(os.environ.get("OUT", "."), "scales_h100.json")
    sys.exit(main(["--out", out, *sys.argv[1:]]))
