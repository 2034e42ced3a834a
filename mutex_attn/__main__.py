import sys

from mutex_attn.cli import main

sys.exit(main())
