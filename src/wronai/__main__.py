import sys

from wronai.cli import main

sys.exit(main())
