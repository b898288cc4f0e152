"""`python -m attn [--family F]`: print the feature table of the registered mechanisms (Markdown)."""

import argparse

from attn.registry import feature_table

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--family", default=None, help="only this family")
print(feature_table(parser.parse_args().family))
