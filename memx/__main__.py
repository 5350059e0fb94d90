import sys

from memx.cli import main

sys.exit(main())
