"""Compress a VGG with a PPO-chosen mix of tensor decompositions. See ``--help``."""

from agents.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
