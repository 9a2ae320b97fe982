"""``python -m nvfp4lib.bench <name> [args]``: run the benchmark module ``nvfp4lib.bench.<name>``."""
import importlib
import pkgutil
import sys

import nvfp4lib.bench as bench_pkg


def _available() -> list:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name not in ("harness", "__main__"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _available():
        print(f"usage: python -m nvfp4lib.bench {{{','.join(_available())}}} [args]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"nvfp4lib.bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
