"""the architecture-agnostic table: the same as `usi table ...` (usi/bench_table.py), runnable from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from usi.bench_table import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
