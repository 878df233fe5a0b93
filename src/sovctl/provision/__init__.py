"""From bare hardware to a running stack: host facts (doctor), memory sizing (plan), hardware
profiles, writing sovctl.toml (init) and the one-command path (up). Nothing here prints."""
