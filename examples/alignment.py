"""The alignment experiment on the embedded family, as a script.

    python examples/alignment.py                       # all held-out prompts
    python examples/alignment.py --prompts 32 --out /tmp/alignment

Same as ``proxytune experiment alignment``: writes results.md, results.json
and PNG plots to ``--out`` and prints the Markdown tables.
"""

import argparse
import logging

from proxytune.experiments.alignment import run_alignment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/alignment", help="folder for the results")
    parser.add_argument("--prompts", type=int, default=None,
                        help="test prompts per domain (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=None,
                        help="steering strength of every pair (default: the family's, "
                             "chosen on validation prompts by the build)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(run_alignment(args.out, n_prompts=args.prompts, seed=args.seed, alpha=args.alpha))


if __name__ == "__main__":
    main()
