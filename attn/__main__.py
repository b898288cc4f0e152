"""`python -m attn [--family F]`: print the feature table of the registered mechanisms (Markdown).

`python -m attn NAME`: print one mechanism in full (paper, catalog number, fidelity and its reference, input kind,
claims, and every option with its default, doc and validator).
"""

import argparse
import sys

from attn.registry import feature_table, get


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn", description=__doc__)
    parser.add_argument("name", nargs="?", default=None, help="one mechanism to describe in full")
    parser.add_argument("--family", default=None, help="only this family (table only)")
    args = parser.parse_args(argv)
    if args.name is not None:
        if args.family is not None:
            parser.error("--family lists the table; it cannot be combined with a mechanism name")
        try:
            spec = get(args.name)
        except KeyError as error:
            print(error.args[0], file=sys.stderr)
            return 2
        print(spec)
        return 0
    try:
        print(feature_table(args.family))
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
