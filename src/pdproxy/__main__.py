"""`python -m pdproxy` is the same as the `pdproxy` console script."""

from pdproxy.cli import main

if __name__ == "__main__":
    main()
