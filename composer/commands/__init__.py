"""One module per subcommand of the command line; see composer/cli.py."""
