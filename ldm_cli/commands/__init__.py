"""The `ldm` subcommands as Typer functions (parse, compose config, call in); `cli.py` registers them."""
