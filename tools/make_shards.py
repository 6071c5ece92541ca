"""image folders -> webdataset shards: the same as `usi shards ...` (usi/make_shards.py), runnable from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from usi.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
