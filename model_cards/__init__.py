"""The model-card templates (Jinja Markdown), shipped inside the package as `pcaa_hf.model_cards` (pyproject.toml)."""
