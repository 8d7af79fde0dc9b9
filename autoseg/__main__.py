"""`python -m autoseg ...` runs the command line (also under torchrun)."""

from autoseg.cli import main

if __name__ == "__main__":
    main()
