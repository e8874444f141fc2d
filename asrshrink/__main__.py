"""Entry point for ``python -m asrshrink``."""

from asrshrink.cli.main import main

if __name__ == "__main__":
    main()
