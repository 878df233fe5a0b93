"""The blackout audit: the operator's stack, started in a network namespace with only loopback,
checked, stopped, and a report filed under the home.

A use case above `sovctl.ops`: it starts stacks through `sovctl.ops.stack`, the one start
sequence, and creates its namespace with `sovctl.netns` (a leaf `sovctl doctor` also uses).

- `stack`: starting and stopping a stack the way `serve --detach` does, in a run directory of
  the audit's own;
- `baseline`: the fixed requests (temperature 0, fixed seed) and their recorded answers;
- `checks`: the eight checks, each a `CheckResult`;
- `inside`: the program that runs in the namespace (`python -m sovctl.audit.inside JOB`);
- `blackout`: the orchestration the CLI calls; `report`: the report and its JSON file.
"""
