"""``diffinv serve``: the browser editor. :mod:`.session` does the work (no Gradio), :mod:`.ui` is the page."""
