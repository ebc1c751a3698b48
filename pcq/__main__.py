"""``python -m pcq``: the ``pcq`` command."""

from pcq.cli import main

if __name__ == "__main__":
    main()
