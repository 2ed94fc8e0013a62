"""pcscbridge's command line: the only place that parses arguments and composes the program.

parser.py    the commands and their options
compose.py   what the options make: backend, host service and its checkpoints, limits
commands.py  each command, run
"""

from .commands import main
from .compose import checked_service
from .parser import build_parser

__all__ = ["build_parser", "checked_service", "main"]
