"""`python -m k1rl ...` runs the same CLI as the `k1rl` script."""

from k1rl.cli import main

if __name__ == "__main__":
    main()
