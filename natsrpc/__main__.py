"""``python -m natsrpc``: the command-line tool (see :mod:`natsrpc.cli`)."""

import sys

from natsrpc.cli import main

sys.exit(main())
