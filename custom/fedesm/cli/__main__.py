import sys

from fedesm.cli import main

sys.exit(main())
