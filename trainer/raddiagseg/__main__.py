import sys

from raddiagseg.cli import main

sys.exit(main())
