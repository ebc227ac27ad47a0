"""`python -m ldm_cli`: the `ldm` command."""

from ldm_cli.cli import main

main()
