from filo.cli.baselines import main

if __name__ == "__main__":
    raise SystemExit(main())
