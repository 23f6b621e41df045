import sys

from sparsegpt.cli import main

sys.exit(main())
