"""Small helpers every layer may use: atomic writes of files and folders, process-wide settings for the tools."""
