"""Train FiLo (heads, prompt learners, adapter). See `python train.py --help`."""

from filo.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
