"""`python -m conversion`: the same command as `blockmarket convert`."""

from __future__ import annotations

import argparse
import sys

from conversion import cli


def run() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conversion",
        description=cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.configure_parser(parser)
    try:
        return cli.main(parser.parse_args())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run())
