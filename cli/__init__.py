"""The `moral` command: parse the arguments, call the pipeline, print the result (`cli.main:main`)."""
