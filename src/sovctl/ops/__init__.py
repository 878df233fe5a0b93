"""The use cases: what a command does, in one place, between the CLI and the core.

Each `sovctl.cli` module parses options, calls one of these (or a core function that reads or
computes), and renders the result. A use case composes the core packages; nothing below this
layer imports it (the import-linter contract in pyproject.toml holds that).

- `stack`: the one start sequence (admit: weights, refusals, API key; start: detached);
- `up`: `sovctl up`, from nothing to a verified, supervised stack;
- `tunnel`: `sovctl tunnel`, pinning the public host's key, rehearsing, restarting the stack
  with its public face.
- `bundle`: `sovctl bundle create` and `import`, the stack as a directory that rebuilds it
  with no network; `wheels` makes each installed distribution into a wheel for it.
"""
