"""The fidelity study: the same as `usi fidelity ...` (usi/fidelity.py), runnable from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from usi.fidelity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
