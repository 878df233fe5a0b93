"""From bare hardware to a running stack: host facts and their checks (doctor), memory sizing
(plan), hardware profiles and writing sovctl.toml (init); the one-command path that strings
them together, `up`, is a use case (`sovctl.ops.up`). Nothing here prints."""
