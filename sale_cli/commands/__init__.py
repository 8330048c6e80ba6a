"""The `sale` commands, one module per command or small group; `sale_cli.cli` registers them on the app.

A command parses and checks its options, calls library code (the runner, calibration, `sale_cli.eval`) and
prints what it returns; option mistakes become Typer usage errors naming the option.
"""
