import sys

from llmmo.cli import main

sys.exit(main())
