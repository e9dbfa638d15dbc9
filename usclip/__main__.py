"""``python -m usclip`` is the ``usclip`` command."""

from usclip.cli import console_main

if __name__ == "__main__":
    console_main()
