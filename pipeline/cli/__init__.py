"""The command line: ``python -m pipeline`` and its subcommands, argument parsers, the torchrun launcher."""
