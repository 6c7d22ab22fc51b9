"""The command-line tools, installed as `pcaa-*` commands (pyproject.toml) and wrapped by scripts/ in a checkout."""
