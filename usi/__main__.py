import sys

from usi.cli import main

sys.exit(main())
