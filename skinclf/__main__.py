"""`python -m skinclf` runs the command-line interface."""

from skinclf.cli import main

if __name__ == "__main__":
    main()
