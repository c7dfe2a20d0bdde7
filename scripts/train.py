#!/usr/bin/env python3
"""Classic WronAI entry point: `python scripts/train.py --config configs/default.yaml`.

A thin wrapper around `wronai train`; every option of `wronai train` is accepted after --config.
"""

import argparse
import sys
from pathlib import Path

try:
    from wronai.cli import main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from wronai.cli import main


def parse(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(
        description="WronAI training (classic entry point; same as `wronai train CONFIG`)"
    )
    parser.add_argument(
        "--config", default="configs/default.yaml", help="path to the training configuration file"
    )
    args, rest = parser.parse_known_args(argv)
    return ["train", args.config, *rest]


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
