"""``python -m usclip`` is the ``usclip`` command."""

from usclip.cli import main

if __name__ == "__main__":
    main()
