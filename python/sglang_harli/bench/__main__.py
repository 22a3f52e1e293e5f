"""``python -m sglang_harli.bench {replay,simulate} ...``"""

from __future__ import annotations

import argparse
import sys

from sglang_harli.bench import replay, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_harli.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (replay, simulate):
        name = module.__name__.rsplit(".", 1)[-1]
        sub = commands.add_parser(name, help=module.__doc__.split("\n")[0])
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
