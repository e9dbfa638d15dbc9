"""Commands of the ``usclip`` program that are not LightningCLI subcommands (argparse; logic in the library)."""
